"""The server's other doors, held by clients that never finish: TLS handshakes that never
come, idle connections to the metrics endpoint, CRI messages far larger than any the
kubelet takes. Each holds a bounded amount, for a bounded time, and logs no traceback."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import grpc
import pytest

from tests.integration.test_operations import _free_port
from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_tls_handshakes_that_never_come_are_dropped_at_the_request_timeout(podnet):
    """100 connections to the TLS stream port that send nothing: each is closed by
    stream_request_timeout (here 1 s), not held for the loop's default of 60 s."""
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--enable-tls-streaming",
                        "--stream-request-timeout", "1s") as proc:
        u = urlsplit(proc.port_forward_url(SANDBOX))
        base = _fds(proc.proc.pid)
        silent = [socket.create_connection((u.hostname, u.port), timeout=10)
                  for _ in range(100)]
        assert _wait_for(lambda: _fds(proc.proc.pid) >= base + 100, 10)
        try:
            # each is closed by the server: EOF (or a reset) on every one
            for sock in silent:
                sock.settimeout(15)
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
            assert _wait_for(lambda: _fds(proc.proc.pid) <= base + 2, 10), \
                (_fds(proc.proc.pid), base)
        finally:
            for sock in silent:
                sock.close()
        log = proc.log()
    assert "Traceback" not in log


def test_the_metrics_endpoint_holds_a_bounded_number_of_idle_connections(podnet):
    port = _free_port()
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--metrics-address", f"127.0.0.1:{port}") as proc:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        threads = _threads(proc.proc.pid)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
        try:
            time.sleep(1)
            held = _threads(proc.proc.pid) - threads
            # the port-forward path does not care
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
                assert bytes(client.roundtrip(ECHO_PORT, b"ok").received) == b"ok"
        finally:
            for sock in idle:
                sock.close()
        # once they are gone, scrapes are served again
        assert _wait_for(lambda: _scrape(port), 15)
        log = proc.log()
    print(f"100 idle metrics connections held {held} threads")
    assert held <= 8, held  # prometheus_client's own server: one thread per connection
    assert "Traceback" not in log


def _scrape(port: int) -> bool:
    try:
        return b"crishim_build_info" in urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return False


def test_a_cri_message_larger_than_the_kubelet_takes_is_refused(crishim):
    """17 MiB: over the 16 MiB the kubelet's CRI client accepts, refused by gRPC itself
    (RESOURCE_EXHAUSTED) before any handler runs; the server keeps serving."""
    channel = grpc.insecure_channel(f"unix://{crishim.socket}",
                                    options=[("grpc.max_send_message_length", 64 << 20)])
    call = channel.unary_unary("/runtime.v1.RuntimeService/Version")
    with pytest.raises(grpc.RpcError) as e:
        call(b"\x0a" + b"\xff" * 3 + b"\x07" + b"x" * (17 << 20), timeout=30)
    channel.close()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as client:
        assert bytes(client.roundtrip(ECHO_PORT, b"ok").received) == b"ok"
    assert "Traceback" not in crishim.log()
