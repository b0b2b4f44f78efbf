"""Hostile CRI requests: oversized sandbox ids, too many ports, bytes that are not a
protobuf message. Each gets INVALID_ARGUMENT with a short message, one log line and no
traceback; the server keeps serving and its memory stays bounded."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from crishim.cri import api_pb2
from tests.support import SANDBOX
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

PORT_FORWARD = "/runtime.v1.RuntimeService/PortForward"
VERSION = "/runtime.v1.RuntimeService/Version"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _port_forward(proc, sandbox_id: str, ports=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        proc.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id,
                                                            port=list(ports)), timeout=10)
    return e.value


def _still_serves(proc) -> None:
    with SpdyPortForwardClient(proc.port_forward_url(SANDBOX, [ECHO_PORT])) as client:
        fwd = client.roundtrip(ECHO_PORT, b"fine")
        assert bytes(fwd.received) == b"fine"


def _short_and_bounded(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:200])
    assert len(err.details()) < 300
    assert sum(len(str(v)) for _, v in err.trailing_metadata() or ()) < 1024


@pytest.mark.parametrize("size,limit", [(257, "max_sandbox_id_length"),
                                        (4096, "max_sandbox_id_length"),
                                        (1 << 20, "max_request_bytes")])
def test_long_sandbox_id_is_invalid_argument_without_echo(crishim, size, limit):
    offset = len(crishim.log())
    err = _port_forward(crishim, "x" * size)
    _short_and_bounded(err)
    assert limit in err.details()
    _still_serves(crishim)
    assert "Traceback" not in crishim.log()[offset:]


@pytest.mark.parametrize("sandbox_id", ["abc\x00def", "\x00", "line\nbreak", "del\x7f"])
def test_sandbox_id_with_control_characters_is_invalid_argument(crishim, sandbox_id):
    offset = len(crishim.log())
    err = _port_forward(crishim, sandbox_id)
    _short_and_bounded(err)
    assert "control characters" in err.details()
    _still_serves(crishim)
    assert "Traceback" not in crishim.log()[offset:]


def test_sandbox_id_of_the_limit_is_looked_up(crishim):
    err = _port_forward(crishim, "y" * 256)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_too_many_ports_is_invalid_argument_and_costs_no_token(crishim):
    offset = len(crishim.log())
    before = _rss_kib(crishim.proc.pid)
    for ports, limit in ((range(1, 66), "max_port_forward_ports"),
                         ([80] * 2000, "16 x max_port_forward_ports"),
                         (list(range(1, 65536)) * 30, "max_request_bytes")):
        for _ in range(3):
            err = _port_forward(crishim, SANDBOX, ports)
            _short_and_bounded(err)
            assert limit in err.details()
    # duplicates collapse: 500 copies of two ports are two ports
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT, 8080] * 500)
    assert "/portforward/" in url
    grown_mib = (_rss_kib(crishim.proc.pid) - before) / 1024
    assert grown_mib < 40, f"RSS grew {grown_mib:.0f} MiB"  # was +80 MiB per request
    _still_serves(crishim)
    assert "Traceback" not in crishim.log()[offset:]


@pytest.mark.parametrize("method", [PORT_FORWARD, VERSION])
@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",  # not a protobuf message
    b"\x0a\x05\xff\xfe\xfd\xfc\xfb",  # field 1 (pod_sandbox_id / version): invalid UTF-8
    b"\x12\x80",  # a truncated field
])
def test_undecodable_request_is_invalid_argument_with_one_warning(crishim, method, payload):
    offset = len(crishim.log())
    call = crishim.channel.unary_unary(method, request_serializer=None,
                                       response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(payload, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "not a valid" in e.value.details()
    _still_serves(crishim)
    log = crishim.log()[offset:]
    assert "Traceback" not in log
    assert log.count("undecodable request") == 1


@pytest.mark.parametrize("payload", [b"\x0a\xff", b"\xff\xff\xff\xff"])
def test_an_undecodable_health_check_is_invalid_argument_without_a_traceback(crishim,
                                                                             payload):
    """grpc.health.v1 was grpc_health's stock registration: its deserializer raised, and
    grpc answered UNKNOWN and logged an ERROR with a traceback for every such call."""
    from grpc_health.v1 import health_pb2

    offset = len(crishim.log())
    check = crishim.channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=None, response_deserializer=None)
    watch = crishim.channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=None, response_deserializer=None)
    for call in (lambda: check(payload, timeout=10),
                 lambda: next(iter(watch(payload, timeout=10)))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    answer = health_pb2.HealthCheckResponse.FromString(
        check(health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=10))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stream = watch(health_pb2.HealthCheckRequest(service="runtime.v1.RuntimeService")
                   .SerializeToString(), timeout=10)
    assert health_pb2.HealthCheckResponse.FromString(next(iter(stream))).status == \
        health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    log = crishim.log()[offset:]
    assert "Traceback" not in log and "ERROR" not in log


def test_oversized_metadata_leaves_no_grpc_core_lines_in_the_log(crishim):
    """500 metadata entries: RESOURCE_EXHAUSTED, and gRPC's C core wrote an `E...
    hpack_encoder.cc] Ignoring key value pair due to size limit` line per call into
    crishim's log, unbounded."""
    import re

    offset = len(crishim.log())
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as e:
            crishim.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=SANDBOX),
                                        metadata=[(f"x-{i}", "a") for i in range(500)],
                                        timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serves(crishim)
    log = crishim.log()[offset:]
    assert not re.search(r"^[EWF]\d{4} ", log, re.M), log


def test_a_flood_of_undecodable_requests_is_logged_within_the_line_budget(podnet):
    """A WARNING per undecodable request: 5,000 garbage calls a second wrote 5,000 lines.
    They are within log_lines_per_second (bursts of 10x) now, the rest counted."""
    from tests.support.crishim_proc import CrishimProcess

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--log-lines-per-second", "2") as proc:
        call = proc.channel.unary_unary(PORT_FORWARD, request_serializer=None,
                                        response_deserializer=None)
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as e:
                call(b"\xff\xff\xff\xff", timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _still_serves(proc)
        deadline = time.monotonic() + 10
        while "refused CRI requests not logged" not in proc.log():
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.1)
        log = proc.log()
    assert 20 <= log.count("refusing an undecodable request") < 60
    assert "Traceback" not in log


def test_connections_to_the_cri_socket_past_max_cri_connections_are_closed(podnet):
    """Connections to the CRI socket were not bounded: 21,000 idle ones took every
    descriptor, and the stream server and every session's new connections failed. Past
    max_cri_connections a new one is closed before its handshake; the others, and the
    stream server, go on."""
    import socket

    from tests.support.crishim_proc import CrishimProcess

    def fds(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--max-cri-connections", "4") as proc:
        proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)  # the test's own: 1
        before = fds(proc.proc.pid)
        held = []
        closed = 0
        try:
            for _ in range(40):
                s = socket.socket(socket.AF_UNIX)
                held.append(s)
                s.connect(proc.socket)
                try:
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\4\0\0\0\0\0")  # SETTINGS
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed already: the server may close it before the preface
            for s in held:
                s.settimeout(2)
                try:
                    while s.recv(4096):  # the server's SETTINGS, then it waits for more
                        pass
                except TimeoutError:
                    continue  # open
                except ConnectionResetError:
                    pass
                closed += 1
            assert closed == 40 - 3, closed  # 4 with the test's own
            assert fds(proc.proc.pid) - before <= 8
            _still_serves(proc)
            proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)  # its own goes on
        finally:
            for s in held:
                s.close()
        log = proc.log()
    assert "Traceback" not in log


def test_a_refused_port_forward_is_logged_with_its_reason(crishim):
    """containerd logs every failed PortForward; crishim logged none, at any level: the
    operator saw nothing of a kubectl user's `NOT_FOUND`."""
    offset = len(crishim.log())
    assert _port_forward(crishim, "nosuch-sandbox").code() == grpc.StatusCode.NOT_FOUND
    assert _port_forward(crishim, SANDBOX, [0]).code() == grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 10
    while crishim.log()[offset:].count("PortForward sandbox=") < 2:
        assert time.monotonic() < deadline, crishim.log()[offset:]
        time.sleep(0.05)
    lines = [line for line in crishim.log()[offset:].splitlines() if "PortForward" in line]
    assert "WARNING" in lines[0] and "sandbox='nosuch-sandbox' ports=[] refused: NOT_FOUND: " \
        in lines[0], lines
    assert f"sandbox={SANDBOX!r} ports=[0] refused: INVALID_ARGUMENT: " in lines[1], lines


def test_an_idle_cri_connection_is_closed_and_a_grpc_client_connects_again(podnet):
    """Established idle connections held max_cri_connections for good (64 of them locked
    out a kubelet that reconnected): one with no call in progress for cri_idle_timeout
    gets GOAWAY and is closed; a gRPC client's next call connects again."""
    import socket

    from tests.support.crishim_proc import CrishimProcess

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--cri-idle-timeout", "1s") as proc:
        proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(proc.socket)
        idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\4\0\0\0\0\0")  # SETTINGS
        idle.settimeout(15)
        start = time.monotonic()
        frames = b""
        try:
            while chunk := idle.recv(4096):
                frames += chunk
        except ConnectionResetError:
            pass
        idle.close()
        assert time.monotonic() - start < 10
        assert b"\x07\x00\x00\x00\x00\x00" in frames  # a GOAWAY frame header (type 7)
        time.sleep(1.5)  # the test's own channel went idle too
        proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)
        log = proc.log()
    assert "Traceback" not in log
