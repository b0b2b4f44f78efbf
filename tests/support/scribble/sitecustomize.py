"""Loaded as sitecustomize (this directory first on PYTHONPATH) by the crishim processes of
the tests that prove no view of the loop's read buffer (crishim.flow.read_buffer) is kept
past the callback that read into it: once each read's callback returns, the bytes it read
are overwritten with 0xEE. A view kept anywhere (a transport's buffer, a window's queue, a
codec's output) then carries those bytes on, and a digest fails however the timing falls.
Active only with CRISHIM_TEST_SCRIBBLE set; every read buffer of both sides is covered:
crishim serve's pod and client reads, crishim port-forward's session and local reads."""

import os

if os.environ.get("CRISHIM_TEST_SCRIBBLE"):
    from crishim import flow

    def _scribbling(cls: type) -> None:
        read = cls.buffer_updated

        def buffer_updated(self, nbytes: int) -> None:
            try:
                read(self, nbytes)
            finally:
                flow.read_buffer()[:nbytes] = b"\xee" * nbytes

        cls.buffer_updated = buffer_updated

    from crishim.client.portforward import _LocalSide
    from crishim.client.transports.base import UpgradeProtocol
    from crishim.forward import _PodProtocol
    from crishim.stream.session import SessionProtocol

    for _cls in (_PodProtocol, SessionProtocol, UpgradeProtocol, _LocalSide):
        _scribbling(_cls)
