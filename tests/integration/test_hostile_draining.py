"""While a SIGTERM drain lasts, PortForward must not issue URLs that can no longer be
redeemed: it answers UNAVAILABLE with the reason; connections that have not presented a
token are refused as the drain begins, not held through it."""

from __future__ import annotations

import signal
import socket
import time
from urllib.parse import urlsplit

import grpc
import pytest

from crishim.cri import api_pb2
from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def _live_session(proc: CrishimProcess):
    """A session with one live connection that has echoed "ping"."""
    client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
    live = client.forward(ECHO_PORT)
    live.send(b"ping")
    assert client.wait(lambda: bytes(live.received) == b"ping")
    return client, live


def test_port_forward_while_draining_is_unavailable(podnet):
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s")
    with proc:
        client, live = _live_session(proc)
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


def test_connections_without_a_token_are_refused_as_the_drain_begins(podnet):
    """A connection still sending its request head when SIGTERM comes can only be refused:
    it gets its 503 at once, while a live session goes on through the drain (60 s here),
    instead of waiting for the drain's end."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s",
                          "--stream-request-timeout", "60s")
    with proc:
        url = proc.port_forward_url(SANDBOX)
        client = SpdyPortForwardClient(url)
        live = client.forward(ECHO_PORT)
        live.send(b"ping")
        assert client.wait(lambda: bytes(live.received) == b"ping")
        u = urlsplit(url)
        slow = socket.create_connection((u.hostname, u.port), timeout=10)
        slow.sendall(b"POST /portforward/")  # a head that is not finished
        time.sleep(0.2)
        proc.proc.send_signal(signal.SIGTERM)
        assert client.wait(lambda: client.goaway, 10)  # the drain has begun
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
        slow.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"shutting down" in answer, answer
        # the live session is still being drained, not closed
        live.send(b" pong")
        assert client.wait(lambda: bytes(live.received) == b"ping pong")
        client.close()
        assert proc.proc.wait(30) == 0
    assert "Traceback" not in proc.log()


def test_a_second_signal_closes_live_sessions_without_waiting_for_the_drain(podnet):
    """A second Ctrl-C while draining was neither acknowledged nor acted on: the operator
    waited for drain_timeout (60 s here) or reached for SIGKILL. It closes the live
    sessions now and serve exits 0, with a last line saying so."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "60s")
    with proc:
        client, _ = _live_session(proc)
        proc.proc.send_signal(signal.SIGINT)
        assert client.wait(lambda: client.goaway, 10)  # the drain has begun
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(30) == 0
        assert time.monotonic() - start < 10  # not the 60 s drain
        client.close()
        log = proc.log()
    assert "SIGINT received again: closing live sessions now" in log
    assert log.rstrip().endswith("crishim stopped")
    assert "Traceback" not in log
