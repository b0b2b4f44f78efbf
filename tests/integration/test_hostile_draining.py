"""While a SIGTERM drain lasts, PortForward must not issue URLs that can no longer be
redeemed: it answers UNAVAILABLE with the reason."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from crishim.cri import api_pb2
from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def test_port_forward_while_draining_is_unavailable(podnet):
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s")
    with proc:
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        live = client.forward(ECHO_PORT)
        live.send(b"ping")
        assert client.wait(lambda: bytes(live.received) == b"ping")
        stub = proc.runtime
        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "draining" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.wait(lambda: client.goaway, 10)  # the drain has begun
        with pytest.raises(grpc.RpcError) as e:
            stub.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=SANDBOX,
                                                        port=[ECHO_PORT]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "shutting down" in e.value.details()
        # the live connection still works through the drain
        live.send(b" pong")
        assert client.wait(lambda: bytes(live.received) == b"ping pong")
        client.close()
        assert proc.proc.wait(30) == 0
    assert "Traceback" not in proc.log()
