"""Port-forward over WebSocket, end to end: kubectl 1.33's SPDY-over-WebSocket tunnel and
the Python `kubernetes` client's v4 channel protocol through the API server + kubelet
stand-in, and raw channel-protocol clients straight at crishim's stream URL. Everything
is real: `crishim serve`, gRPC over its unix socket, the pod netns and its servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest

from crishim.protocols import websocket as ws
from tests.support import SANDBOX, missing, peers
from tests.support.podnet import (
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_BODY,
    HTTP_PORT,
    RESET_PORT,
    SINK_PORT,
    SOURCE_PORT,
    source_bytes,
)
from tests.support.standin import KubeStandIn, run_kubectl_port_forward
from tests.support.ws_channel_client import RawChannelClient

KUBECTL_133 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"
MiB = 1 << 20
BIG = 64 * MiB
POD = "wspod"


# --------------------------------------------------------------------------- local peers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_exactly_sha(s: socket.socket, size: int) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while n < size:
        data = s.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def standin(crishim):
    with KubeStandIn({POD: SANDBOX}, crishim.port_forward_url) as s:
        yield s


def _need_kubectl() -> str:
    if not os.access(KUBECTL_133, os.X_OK):
        missing(KUBECTL_133)
    return KUBECTL_133


@pytest.fixture(scope="module")
def kubectl_ws(standin):
    """One kubectl 1.33 forwarding every pod test port over its WebSocket SPDY tunnel."""
    kubectl = _need_kubectl()
    before = len(standin.requests)
    ports = [HTTP_PORT, ECHO_PORT, SINK_PORT, SOURCE_PORT, RESET_PORT]
    with run_kubectl_port_forward(kubectl, standin.server_url, POD,
                                  [f"0:{p}" for p in ports]) as pf:
        pf.first_request = before
        yield pf


# --------------------------------------------------------------------------- 1. kubectl


def test_kubectl_uses_the_websocket_tunnel_without_spdy_fallback(standin, kubectl_ws):
    with peers.connect(kubectl_ws.local_ports[HTTP_PORT]) as s:
        assert peers.http_request(s).endswith(HTTP_BODY)
    mine = standin.requests[kubectl_ws.first_request:]
    portforward = [r for r in mine if r.path.endswith("/portforward")]
    assert portforward, [r.target for r in mine]
    assert all(r.method == "GET" for r in portforward), [(r.method, r.target) for r in mine]
    assert all(r.header("upgrade", "").lower() == "websocket" for r in portforward)
    ups = [u for u in standin.upgrades if u.pod == POD and u in portforward]
    assert len(ups) == 1
    assert ups[0].transport == "websocket"
    assert "SPDY/3.1+portforward.k8s.io" in ups[0].header("sec-websocket-protocol")
    assert ups[0].backend_status == 101
    assert not any(r.method == "POST" for r in mine)


def test_kubectl_http_get(kubectl_ws):
    with peers.connect(kubectl_ws.local_ports[HTTP_PORT]) as s:
        for _ in range(3):  # keep-alive: several requests on one forwarded connection
            reply = peers.http_request(s)
            assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(HTTP_BODY)


def test_kubectl_64mib_up_and_down(kubectl_ws):
    payload = source_bytes(BIG)
    with peers.connect(kubectl_ws.local_ports[SINK_PORT]) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = peers.recv_all(s).decode()
    assert answer == f"{BIG} {_sha(payload)}\n"
    with peers.connect(kubectl_ws.local_ports[SOURCE_PORT]) as s:
        s.sendall(b"%d\n" % BIG)
        n, digest = _read_exactly_sha(s, BIG)
        assert s.recv(1) == b""  # and then the pod's EOF
    assert (n, digest) == (BIG, _sha(payload))


def test_kubectl_100_concurrent_connections(kubectl_ws):
    count = 100
    port = kubectl_ws.local_ports[ECHO_PORT]
    socks = [peers.connect(port) for _ in range(count)]
    payloads = [hashlib.sha256(b"%d" % i).digest() * 256 for i in range(count)]
    results: list[bytes | None] = [None] * count

    def run(i: int) -> None:
        s = socks[i]
        try:
            s.sendall(payloads[i])
            s.shutdown(socket.SHUT_WR)
            results[i] = peers.recv_all(s)
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r == p for r, p in zip(results, payloads, strict=True)] == [True] * count


def test_kubectl_half_close_still_reads_the_echo(kubectl_ws):
    payload = os.urandom(3 * MiB)
    with peers.connect(kubectl_ws.local_ports[ECHO_PORT]) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert peers.recv_all(s) == payload


def test_kubectl_reset_from_pod_ends_only_that_connection(kubectl_ws):
    with peers.connect(kubectl_ws.local_ports[ECHO_PORT]) as other:
        other.sendall(b"before")
        assert other.recv(100) == b"before"
        assert peers.reset_by_pod(kubectl_ws.local_ports[RESET_PORT]) == b""
        other.sendall(b"after")  # a connection open across the reset carries on
        assert other.recv(100) == b"after"
    time.sleep(0.2)
    assert kubectl_ws.returncode is None, kubectl_ws.output()
    with peers.connect(kubectl_ws.local_ports[HTTP_PORT]) as s:  # and new ones still work
        assert peers.http_request(s).endswith(HTTP_BODY)
    with peers.connect(kubectl_ws.local_ports[ECHO_PORT]) as s:
        s.sendall(b"next")
        assert s.recv(100) == b"next"


# --------------------------------------------------------------------------- 2. kubernetes


@pytest.fixture(scope="module")
def core_api(standin):
    import kubernetes  # a test extra: its absence is a failure
    cfg = kubernetes.client.Configuration(host=standin.server_url)
    with kubernetes.client.ApiClient(cfg) as api:
        yield kubernetes.client.CoreV1Api(api)


def _kube_forward(core_api, *ports: int):
    from kubernetes.stream import portforward

    return portforward(core_api.connect_get_namespaced_pod_portforward, POD, "default",
                       ports=",".join(str(p) for p in ports))


def _wait_closed(pf, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pf.connected and time.monotonic() < deadline:
        time.sleep(0.02)


def test_kubernetes_client_http_get(standin, core_api):
    before = len(standin.upgrades)
    pf = _kube_forward(core_api, HTTP_PORT)
    s = pf.socket(HTTP_PORT)
    s.settimeout(30)
    reply = peers.http_request(s)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(HTTP_BODY)
    s.close()
    _wait_closed(pf)
    assert not pf.connected
    assert pf.error(HTTP_PORT) is None
    up = standin.upgrades[before]
    assert up.transport == "websocket" and up.ports == [HTTP_PORT]
    assert up.backend_status == 101


def test_kubernetes_client_64mib_down(core_api):
    pf = _kube_forward(core_api, SOURCE_PORT)
    s = pf.socket(SOURCE_PORT)
    s.settimeout(60)
    s.sendall(b"%d\n" % BIG)
    n, digest = _read_exactly_sha(s, BIG)
    # The pod's EOF on the only port ends the WebSocket (1000); the client then ends the
    # socket after delivering everything.
    assert s.recv(1) == b""
    assert (n, digest) == (BIG, _sha(source_bytes(BIG)))
    assert pf.error(SOURCE_PORT) is None
    s.close()


def test_kubernetes_client_64mib_up_through_the_echo(core_api):
    # The client cannot half-close (a local EOF closes its end of the port), so the sink's
    # answer-at-EOF is out of reach: 64 MiB go up to the echo and come back, both hashed.
    payload = source_bytes(BIG)
    pf = _kube_forward(core_api, ECHO_PORT)
    s = pf.socket(ECHO_PORT)
    s.settimeout(60)
    result: dict[str, object] = {}

    def reader() -> None:
        result["got"] = _read_exactly_sha(s, BIG)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    t.join(120)
    assert result["got"] == (BIG, _sha(payload))
    s.close()
    _wait_closed(pf)
    assert pf.error(ECHO_PORT) is None


def test_kubernetes_client_several_ports_and_a_reset(core_api):
    pf = _kube_forward(core_api, HTTP_PORT, ECHO_PORT, RESET_PORT, SOURCE_PORT)
    for port in (HTTP_PORT, ECHO_PORT, RESET_PORT, SOURCE_PORT):
        pf.socket(port).settimeout(30)
    reset = pf.socket(RESET_PORT)
    reset.sendall(b"hello")
    assert peers.recv_all(reset) == b""  # the library closes the port on error text
    deadline = time.monotonic() + 10
    while pf.error(RESET_PORT) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    err = pf.error(RESET_PORT)
    assert err is not None and f"error forwarding port {RESET_PORT}" in err, err
    # the other ports of the same WebSocket carry on
    assert peers.http_request(pf.socket(HTTP_PORT)).endswith(HTTP_BODY)
    echo = pf.socket(ECHO_PORT)
    echo.sendall(b"still here")
    assert echo.recv(100) == b"still here"
    source = pf.socket(SOURCE_PORT)
    source.sendall(b"100000\n")
    assert _read_exactly_sha(source, 100000) == (100000, _sha(source_bytes(100000)))
    assert pf.error(HTTP_PORT) is None and pf.error(ECHO_PORT) is None
    pf.close()
    _wait_closed(pf)
    assert not pf.connected


def test_kubernetes_client_local_half_close_ends_the_port(core_api):
    """The v4 channel protocol has no per-port half-close: this client treats its
    application's shutdown(SHUT_WR) as the end of the port (its socket pair end is
    closed), so nothing more is read; crishim sees the WebSocket's close as the client's
    half-close of every port and passes a FIN to the pod."""
    pf = _kube_forward(core_api, ECHO_PORT)
    s = pf.socket(ECHO_PORT)
    s.settimeout(30)
    s.sendall(b"ping")
    assert s.recv(100) == b"ping"
    s.shutdown(socket.SHUT_WR)
    assert peers.recv_all(s) == b""
    _wait_closed(pf)
    assert not pf.connected
    assert pf.error(ECHO_PORT) is None


# --------------------------------------------------------------------------- 3. raw clients


def _frame(payload: bytes, opcode: int = 0x2, mask: bool = True) -> bytes:
    """One client frame, FIN set, written by hand."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    if n >= 4096:  # an all-zero key is a valid mask and keeps big payloads cheap
        return head + bytes(4) + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_raw_base64_round_trip(crishim):
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT, HTTP_PORT])
    c = RawChannelClient(url, [ECHO_PORT, HTTP_PORT], [ws.CHANNEL_BASE64], base64_mode=True)
    try:
        assert c.response.subprotocol == ws.CHANNEL_BASE64
        c.pump(lambda: len(c.prefaces()) == 4)
        assert sorted(c.prefaces()) == [(0, ECHO_PORT, False), (0, ECHO_PORT, True),
                                        (1, HTTP_PORT, False), (1, HTTP_PORT, True)]
        payload = bytes(range(256)) * 1000
        c.send(0, payload)
        c.pump(lambda: len(c.data(0)) >= len(payload))
        assert c.data(0) == payload
        c.send(1, b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n")
        c.pump(lambda: c.data(1).endswith(HTTP_BODY))
        assert c.errors(0) == c.errors(1) == ""
    finally:
        c.close()


def test_raw_base64_messages_are_text_with_a_digit_channel(crishim):
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT])
    c = RawChannelClient(url, [ECHO_PORT], [ws.CHANNEL_BASE64], base64_mode=True)
    try:
        # a hand-made masked text frame: '0' + base64
        c.sock.sendall(_frame(b"0" + base64.b64encode(b"by hand"), opcode=0x1))
        c.pump(lambda: c.data(0) == b"by hand")
        assert c.data(0) == b"by hand"
    finally:
        c.close()


def test_raw_no_subprotocol_is_binary_and_ports_come_from_the_query(crishim):
    url = crishim.port_forward_url(SANDBOX)  # no ports in the CRI request
    c = RawChannelClient(url, [SOURCE_PORT, ECHO_PORT], [],
                         query=f"port={SOURCE_PORT}&ports={ECHO_PORT}")
    try:
        assert c.response.status == 101 and c.response.subprotocol is None
        c.pump(lambda: len(c.prefaces()) == 4)
        c.send(0, b"%d\n" % (3 * MiB))
        c.send(1, b"binary")
        c.pump(lambda: len(c.data(0)) >= 3 * MiB and c.data(1) == b"binary")
        assert c.data(0) == source_bytes(3 * MiB)
        assert c.data(1) == b"binary"
    finally:
        c.close()


def test_raw_pod_eof_on_every_port_closes_the_websocket_normally(crishim):
    url = crishim.port_forward_url(SANDBOX, [SOURCE_PORT])
    c = RawChannelClient(url, [SOURCE_PORT], [ws.CHANNEL_BINARY])
    try:
        c.pump(lambda: len(c.prefaces()) == 2)
        c.send(0, b"1000\n")
        c.pump(lambda: False)
        assert c.closed is not None and c.closed.code == 1000
        assert c.data(0) == source_bytes(1000)
        assert c.errors(0) == ""
    finally:
        c.close()


def test_raw_refused_port_writes_the_error_channel_and_others_carry_on(crishim):
    url = crishim.port_forward_url(SANDBOX, [CLOSED_PORT, ECHO_PORT])
    c = RawChannelClient(url, [CLOSED_PORT, ECHO_PORT], [ws.CHANNEL_BINARY])
    try:
        c.pump(lambda: c.errors(0) != "")
        assert f"error forwarding port {CLOSED_PORT}" in c.errors(0)
        assert f"connect to port {CLOSED_PORT}" in c.errors(0)
        c.send(1, b"alive")
        c.pump(lambda: c.data(1) == b"alive")
        assert c.closed is None
    finally:
        c.close()


RECORDER_PORT = 9017


class _Recorder(asyncio.Protocol):
    """Records what one connection brought: byte count, sha256, and whether a FIN came."""

    seen: list[dict] = []

    def connection_made(self, transport):
        self.t = transport
        self.rec = {"n": 0, "sha": hashlib.sha256(), "eof": False, "lost": False}
        _Recorder.seen.append(self.rec)

    def data_received(self, data):
        self.rec["n"] += len(data)
        self.rec["sha"].update(data)

    def eof_received(self):
        self.rec["eof"] = True
        return False

    def connection_lost(self, exc):
        self.rec["lost"] = True


@pytest.fixture(scope="module")
def recorder(podnet):
    podnet.listen_extra("127.0.0.1", RECORDER_PORT, _Recorder)
    return _Recorder.seen


def test_raw_client_close_is_a_half_close_towards_the_pod(crishim, recorder):
    """The client's close frame is its half-close of every port: the pod gets every byte
    sent before it, then a FIN (not a reset)."""
    before = len(recorder)
    url = crishim.port_forward_url(SANDBOX, [RECORDER_PORT])
    c = RawChannelClient(url, [RECORDER_PORT], [ws.CHANNEL_BINARY])
    payload = os.urandom(5 * MiB)
    try:
        c.pump(lambda: len(c.prefaces()) == 2)
        c.send(0, payload)
        c.codec.close(1000, "done")
        c.sock.sendall(c.codec.data_to_send())
        c.pump(lambda: False)
        assert c.closed is not None and c.closed.code == 1000
    finally:
        c.close()
    deadline = time.monotonic() + 10
    while not (len(recorder) > before and recorder[-1]["lost"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    rec = recorder[-1]
    assert (rec["n"], rec["sha"].hexdigest(), rec["eof"]) == (len(payload), _sha(payload), True)


@pytest.mark.parametrize("name,raw,code", [
    ("unknown channel", _frame(b"\x09abc"), 1002),
    ("write to the error channel", _frame(b"\x01abc"), 1002),
    ("empty message", _frame(b""), 1002),
    ("garbage bytes", b"\xff\xfe\xfd\xfc garbage that is not a frame", 1002),
    ("unmasked client frame", _frame(b"\x00abc", mask=False), 1002),
    ("invalid utf-8 text", _frame(b"\x00\xff\xfe", opcode=0x1), 1007),
])
def test_raw_malformed_input_gets_its_close_code_and_the_server_lives(crishim, name, raw, code):
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT])
    c = RawChannelClient(url, [ECHO_PORT], [ws.CHANNEL_BINARY])
    try:
        c.pump(lambda: len(c.prefaces()) == 2)
        c.sock.sendall(raw)
        c.pump(lambda: False)
        assert c.closed is not None and c.closed.code == code, (name, c.closed)
    finally:
        c.close()
    _second_session_works(crishim)


def test_raw_bad_base64_is_1007(crishim):
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT])
    c = RawChannelClient(url, [ECHO_PORT], [ws.CHANNEL_BASE64], base64_mode=True)
    try:
        c.pump(lambda: len(c.prefaces()) == 2)
        c.sock.sendall(_frame(b"0!!not base64!!", opcode=0x1))
        c.pump(lambda: False)
        assert c.closed is not None and c.closed.code == 1007
    finally:
        c.close()
    _second_session_works(crishim)


def test_raw_oversized_message_is_1009(crishim):
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT])
    c = RawChannelClient(url, [ECHO_PORT], [ws.CHANNEL_BINARY])
    try:
        c.pump(lambda: len(c.prefaces()) == 2)
        # one message just over the 16 MiB limit, in two frames, nothing sent after it
        first = b"\x00" + b"a" * (8 * MiB)
        second = b"b" * (8 * MiB)
        c.sock.sendall(_fragment(first, 0x2, fin=False) + _fragment(second, 0x0, fin=True))
        c.pump(lambda: False)
        assert c.closed is not None and c.closed.code == 1009
    finally:
        c.close()
    _second_session_works(crishim)


def _fragment(payload: bytes, opcode: int, fin: bool) -> bytes:
    frame = _frame(payload, opcode)
    return bytes([(0x80 if fin else 0) | opcode]) + frame[1:]


def _second_session_works(crishim) -> None:
    url = crishim.port_forward_url(SANDBOX, [ECHO_PORT])
    c = RawChannelClient(url, [ECHO_PORT], [ws.CHANNEL_BINARY])
    try:
        c.send(0, b"second session")
        c.pump(lambda: c.data(0) == b"second session")
        assert c.data(0) == b"second session"
    finally:
        c.close()


def test_raw_handshake_failures_are_http_errors(crishim):
    # no port anywhere
    c = RawChannelClient(crishim.port_forward_url(SANDBOX), [], [ws.CHANNEL_BINARY])
    assert c.response.status == 400
    assert b"no port to forward" in c.body()
    c.close()
    # only unknown subprotocols
    c = RawChannelClient(crishim.port_forward_url(SANDBOX, [ECHO_PORT]), [],
                         ["v9.nothing.k8s.io"])
    assert c.response.status == 403
    assert b"v9.nothing.k8s.io" in c.body()
    c.close()
    # a bad port in the query
    c = RawChannelClient(crishim.port_forward_url(SANDBOX), [], [], query="port=70000")
    assert c.response.status == 400
    assert b"70000" in c.body()
    c.close()
    # a broken upgrade: wrong WebSocket version
    u = urlsplit(crishim.port_forward_url(SANDBOX, [ECHO_PORT]))
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {u.path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 8\r\n\r\n".encode())
        answer = peers.recv_all(s)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"Sec-WebSocket-Version: 13" in answer and b"only 13" in answer


def test_raw_idle_session_is_closed_with_1001(podnet):
    from tests.support.crishim_proc import CrishimProcess

    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--stream-idle-timeout",
                        "1s") as proc:
        c = RawChannelClient(proc.port_forward_url("sb", [ECHO_PORT]), [ECHO_PORT],
                             [ws.CHANNEL_BINARY])
        try:
            c.send(0, b"once")
            c.pump(lambda: c.data(0) == b"once")
            t0 = time.monotonic()
            c.pump(lambda: False, timeout=10)
            assert c.closed is not None and c.closed.code == 1001
            assert "idle" in c.closed.reason
            assert time.monotonic() - t0 > 0.5
        finally:
            c.close()


def test_raw_session_is_closed_with_1001_when_the_server_stops(podnet):
    import signal

    from tests.support.crishim_proc import CrishimProcess

    proc = CrishimProcess("--sandboxes", f"sb={podnet.path}", "--drain-timeout", "300ms")
    with proc:
        c = RawChannelClient(proc.port_forward_url("sb", [ECHO_PORT]), [ECHO_PORT],
                             [ws.CHANNEL_BINARY])
        try:
            c.send(0, b"before")
            c.pump(lambda: c.data(0) == b"before")
            proc.proc.send_signal(signal.SIGTERM)
            c.pump(lambda: False, timeout=10)
            assert c.closed is not None and c.closed.code == 1001
            assert "shutting down" in c.closed.reason
        finally:
            c.close()
        assert proc.proc.wait(20) == 0


# --------------------------------------------------------------------------- buffer budget
_PONG = b"\x8a\x00"


def _budget_session(proc) -> RawChannelClient:
    c = RawChannelClient(proc.port_forward_url(SANDBOX, [ECHO_PORT]), [ECHO_PORT],
                         [ws.CHANNEL_BINARY])
    c.pump(lambda: len(c.prefaces()) == 2)
    return c


def _hold_unfinished(c: RawChannelClient, size: int) -> bytes:
    """Send the first fragment (no FIN) of a data message of `size` bytes for port 0 and
    an empty ping; what the server sent back until its pong or its close (the server
    answers the ping only after it has read the fragment)."""
    payload = b"\x00" + b"u" * (size - 1)
    first = bytes([0x02, 0x80 | 127]) + struct.pack(">Q", size) + bytes(4) + payload
    try:
        c.sock.sendall(first + bytes([0x89, 0x80]) + bytes(4))
    except OSError:
        pass  # closed by the server already: what it wrote tells why
    got = b""
    c.sock.settimeout(30)
    while _PONG not in got:
        try:
            chunk = c.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        got += chunk
    return got


def test_channel_sessions_hold_against_the_servers_buffer_budget(podnet):
    """What channel sessions hold towards pods (here unfinished messages) beyond 64 KiB
    each comes from the server's buffer_budget, as HTTP/2's windows do: a session that
    would pass it is closed 1013 with a reason, a small one is still served, and what a
    session held comes back to the budget once its pod took it."""
    from tests.support.crishim_proc import CrishimProcess

    mib = 1 << 20
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--buffer-budget", str(8 * mib)) as proc:
        first = _budget_session(proc)
        assert _PONG in _hold_unfinished(first, 6 * mib)  # 5 MiB of the budget's 8
        second = _budget_session(proc)
        answer = _hold_unfinished(second, 6 * mib)  # 5 more would pass it
        assert _PONG not in answer
        second._feed(answer)
        second.pump(lambda: False)
        assert second.closed is not None and second.closed.code == 1013
        assert "buffer budget" in second.closed.reason
        small = _budget_session(proc)  # within its free 64 KiB: served
        small.send(0, b"small")
        small.pump(lambda: small.data(0) == b"small")
        # the first message ends: the echo pod takes it, and the budget is whole again
        first.sock.sendall(bytes([0x80, 0x80]) + bytes(4))  # empty continuation, FIN
        first.pump(lambda: len(first.data(0)) == 6 * mib - 1)
        third = _budget_session(proc)
        assert _PONG in _hold_unfinished(third, 6 * mib)
        assert third.closed is None
        for c in (first, second, small, third):
            c.close()
        log = proc.log()
    warnings = [line for line in log.splitlines()
                if " WARNING " in line and "buffer_budget" in line]
    assert len(warnings) == 1 and "ending session" in warnings[0], warnings
    assert "Traceback" not in log


def test_what_a_channel_session_holds_past_64_kib_is_charged(podnet):
    """Unfinished messages just under 1 MiB: the first four of a 4 MiB budget hold, the
    fifth would pass it and is closed 1013 (the first 1 MiB of each was free: 300
    sessions held 319 MiB outside every budget)."""
    from tests.support.crishim_proc import CrishimProcess

    mib = 1 << 20
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--buffer-budget", str(4 * mib)) as proc:
        sessions = [_budget_session(proc) for _ in range(5)]
        for held in sessions[:4]:
            assert _PONG in _hold_unfinished(held, mib - 16)
            assert held.closed is None
        last = sessions[4]
        answer = _hold_unfinished(last, mib - 16)
        last._feed(answer)
        last.pump(lambda: False)
        assert last.closed is not None and last.closed.code == 1013
        for c in sessions:
            c.close()
        assert "Traceback" not in proc.log()


def test_idle_sessions_leave_the_budget_towards_pods_whole(podnet):
    """Each admitted session's output towards its client is taken from a pool of its own:
    10 idle SPDY sessions (2 MiB of output each, 20 MiB, past the 16 MiB budget) leave a
    channel session the budget towards pods (from one pool, 8 of them got it closed 1013
    although nothing held a byte)."""
    from tests.support.crishim_proc import CrishimProcess
    from tests.support.spdy_pf_client import SpdyPortForwardClient

    mib = 1 << 20
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--buffer-budget", str(16 * mib)) as proc:
        idle = [SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) for _ in range(10)]
        try:
            session = _budget_session(proc)
            assert _PONG in _hold_unfinished(session, 6 * mib)  # 6 MiB less its free 64 KiB
            assert session.closed is None
            session.close()
        finally:
            for client in idle:
                client.close()
        log = proc.log()
    assert "buffer budget" not in log
    assert "Traceback" not in log
