"""A sandbox's netns path that is not a network namespace (the `sandboxes` map, or the
upstream runtime's PodSandboxStatus, can name any file): crishim serve opens nothing but
a namespace file, so a FIFO there cannot stop its one event loop (it did, until a writer
came) and a device is never opened. The connection ends as for a sandbox that is gone."""

from __future__ import annotations

import os
import time

from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def test_a_fifo_as_a_sandbox_netns_ends_that_connection_and_stalls_nothing(podnet, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    try:
        with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path},fifo={fifo}") as proc:
            with SpdyPortForwardClient(proc.port_forward_url("fifo")) as client:
                fwd = client.forward(ECHO_PORT)
                assert client.wait(fwd.finished, 5)
                assert f"{fifo} is not a network namespace" in fwd.error_text
            start = time.monotonic()
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
                assert bytes(other.roundtrip(ECHO_PORT, b"still served").received) \
                    == b"still served"
            assert time.monotonic() - start < 2
            log = proc.log()
        assert "Traceback" not in log
    finally:
        try:  # an old crishim sits in open() until a writer comes
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
