"""The SPDY port-forward session's stream rules, driven over a real socket by crishim's own
codec: bad streams are refused alone, pairs are matched by request id (or by stream id for
very old clients), an incomplete pair times out with a message."""

import socket
import time
from urllib.parse import urlsplit

import pytest

from crishim.protocols import spdy
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT


class RawSpdy:
    """A SPDY client session on a socket, recording every event."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=10)
        self.sock.sendall(f"POST {u.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                          "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io"
                          "\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.codec = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
        self.events: list = []
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            self.events += self.codec.receive_data(rest)

    def open(self, headers: dict[str, str], fin: bool = False) -> int:
        sid = self.codec.open_stream(headers, fin=fin)
        self.flush()
        return sid

    def flush(self) -> None:
        out = self.codec.data_to_send()
        if out:
            self.sock.sendall(out)

    def wait(self, condition, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            self.events += self.codec.receive_data(data)
            self.flush()
        return condition()

    def of(self, kind, stream_id: int) -> list:
        return [e for e in self.events if isinstance(e, kind)
                and getattr(e, "stream_id", None) == stream_id]

    def data(self, stream_id: int) -> bytes:
        return b"".join(bytes(e.data) for e in self.of(spdy.DataReceived, stream_id))

    def fin(self, stream_id: int) -> bool:
        return any(e.fin for e in self.of(spdy.DataReceived, stream_id))

    def reset(self, stream_id: int) -> int | None:
        resets = self.of(spdy.StreamReset, stream_id)
        return resets[0].status if resets else None

    def echo_pair(self, request_id: str, payload: bytes) -> bytes:
        err = self.open({"streamtype": "error", "port": str(ECHO_PORT),
                         "requestid": request_id}, fin=True)
        data = self.open({"streamtype": "data", "port": str(ECHO_PORT),
                          "requestid": request_id})
        self.codec.send_data(data, payload, fin=True)
        self.flush()
        assert self.wait(lambda: self.fin(data) and self.fin(err))
        return self.data(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session(crishim):
    from tests.support import SANDBOX

    s = RawSpdy(crishim.port_forward_url(SANDBOX))
    yield s
    s.close()


@pytest.mark.parametrize("headers", [
    {"streamtype": "data", "port": "0", "requestid": "1"},
    {"streamtype": "data", "port": "70000", "requestid": "1"},
    {"streamtype": "data", "port": "http", "requestid": "1"},
    {"streamtype": "data", "requestid": "1"},
    {"streamtype": "bogus", "port": "9000", "requestid": "1"},
    {"port": "9000", "requestid": "1"},
])
def test_invalid_stream_headers_are_refused_and_the_session_lives_on(session, headers):
    sid = session.open(headers)
    assert session.wait(lambda: session.reset(sid) is not None)
    assert session.reset(sid) == spdy.PROTOCOL_ERROR
    assert session.echo_pair("2", b"still here") == b"still here"


def test_second_stream_of_a_type_for_one_request_is_refused(session):
    first = session.open({"streamtype": "error", "port": str(ECHO_PORT), "requestid": "7"},
                         fin=True)
    second = session.open({"streamtype": "error", "port": str(ECHO_PORT), "requestid": "7"},
                          fin=True)
    assert session.wait(lambda: session.reset(second) is not None)
    assert session.reset(first) is None
    data = session.open({"streamtype": "data", "port": str(ECHO_PORT), "requestid": "7"})
    session.codec.send_data(data, b"paired with the first", fin=True)
    session.flush()
    assert session.wait(lambda: session.fin(data))
    assert session.data(data) == b"paired with the first"


def test_a_requestid_cannot_write_lines_into_the_log(crishim):
    """The requestid went into the refusal's log line as it came: one with a newline
    wrote a whole forged line (an ERROR one here) into crishim's log."""
    from tests.support import SANDBOX

    forged = "FORGED LINE from a client"
    request_id = f"7\n2026-12-06 00:00:00,000 ERROR crishim: {forged}\x1b[2J"
    offset = len(crishim.log())
    s = RawSpdy(crishim.port_forward_url(SANDBOX))
    try:
        headers = {"streamtype": "error", "port": str(ECHO_PORT), "requestid": request_id}
        s.open(headers, fin=True)
        second = s.open(headers, fin=True)
        assert s.wait(lambda: s.reset(second) is not None)
        assert s.echo_pair("8", b"after it") == b"after it"
    finally:
        s.close()
    log = crishim.log()[offset:]
    [line] = [line for line in log.splitlines() if forged in line]
    assert "refusing stream" in line and "\\n2026" in line and "\x1b" not in line


def test_streams_without_requestid_pair_by_stream_id(session):
    """Very old clients: the error stream's request id is its stream id, the data
    stream's its stream id minus 2."""
    err = session.open({"streamtype": "error", "port": str(ECHO_PORT)}, fin=True)
    data = session.open({"streamtype": "data", "port": str(ECHO_PORT)})
    assert data == err + 2
    session.codec.send_data(data, b"legacy", fin=True)
    session.flush()
    assert session.wait(lambda: session.fin(data) and session.fin(err))
    assert session.data(data) == b"legacy"


def test_incomplete_pair_times_out_with_a_message_on_its_error_stream(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--stream-creation-timeout", "300ms") as proc:
        s = RawSpdy(proc.port_forward_url("sb"))
        try:
            err = s.open({"streamtype": "error", "port": str(ECHO_PORT), "requestid": "9"},
                         fin=True)
            assert s.wait(lambda: s.fin(err), timeout=5)
            assert b"timed out waiting for the data stream of request 9" in s.data(err)
            assert s.echo_pair("10", b"next one works") == b"next one works"
        finally:
            s.close()


def test_many_pairs_timing_out_log_a_bounded_number_of_lines(podnet):
    """Pairs that never complete are a client's protocol errors: the first
    protocol_error_log_lines are logged, the rest counted in one line at the session's
    end (a line each was 180,000 lines for 20 sessions within their budgets)."""
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--stream-creation-timeout", "300ms",
                        "--protocol-error-log-lines", "5") as proc:
        s = RawSpdy(proc.port_forward_url("sb"))
        try:
            errors = [s.open({"streamtype": "error", "port": str(ECHO_PORT),
                              "requestid": str(i)}, fin=True) for i in range(200)]
            assert s.wait(lambda: all(s.fin(err) for err in errors), timeout=10)
            assert all(b"timed out waiting for the data stream" in s.data(err)
                       for err in errors)
        finally:
            s.close()
        deadline = time.monotonic() + 5
        while "more protocol errors suppressed" not in proc.log() and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        log = proc.log()
    assert log.count("timed out waiting for the data stream") == 5
    assert "195 more protocol errors suppressed" in log
