"""Hostile input at the stream server's door: connections that hold resources before
presenting a token. Real sockets against a real `crishim serve`; each test checks what
the hostile client gets, that a valid client is still served afterwards, and that the
server logged no traceback."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.h2_pf_client import H2Client
from tests.support.podnet import ECHO_PORT

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, SETTINGS, GOAWAY, CONTINUATION = 0x1, 0x4, 0x7, 0x9
END_HEADERS = 0x4
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) \
        + struct.pack(">I", stream_id) + payload


def read_frames_until_eof(sock: socket.socket, timeout: float) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it closes; TimeoutError if it never does."""
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise TimeoutError(f"the server kept the connection open for {timeout}s") from None
        if not chunk:
            break
        data += chunk
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], bytes(data[9: 9 + length])))
        del data[: 9 + length]
    return frames


def goaway_code(frames: list[tuple[int, bytes]]) -> int | None:
    codes = [struct.unpack(">II", payload[:8])[1] for kind, payload in frames if kind == GOAWAY]
    return codes[-1] if codes else None


def stream_address(proc: CrishimProcess) -> tuple[str, int]:
    url = urlsplit(proc.port_forward_url(SANDBOX))
    return url.hostname, url.port


def echo_served(proc: CrishimProcess, mode: str = "prior", payload: bytes = b"still serving",
                url: str | None = None) -> bytes:
    """A valid client's round trip through the echo server in the pod (on `url`, else a
    new one)."""
    async def go() -> bytes:
        client = await H2Client.connect(url or proc.port_forward_url(SANDBOX), mode)
        try:
            fwd = await client.forward(ECHO_PORT)
            await fwd.write(payload, end_stream=True)
            return await fwd.read_all(timeout=30)
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(go(), 60))


def assert_no_traceback(proc: CrishimProcess) -> None:
    assert "Traceback" not in proc.log()


def open_fds(proc: CrishimProcess) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


@pytest.fixture
def serve(podnet):
    procs: list[CrishimProcess] = []

    def start(*args: str) -> CrishimProcess:
        proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", *args).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def test_preface_only_http2_connections_are_not_sessions_and_time_out(serve):
    proc = serve("--max-sessions", "3", "--stream-request-timeout", "3s")
    address = stream_address(proc)
    idle = []
    for _ in range(6):  # twice max_sessions, none ever sends a stream
        sock = socket.create_connection(address)
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        idle.append(sock)
    try:
        assert echo_served(proc) == b"still serving"  # was 429: the idle ones were sessions
        for sock in idle:  # was held for the 4 h idle timeout
            frames = read_frames_until_eof(sock, timeout=60)
            assert goaway_code(frames) == 0
    finally:
        for sock in idle:
            sock.close()
    assert echo_served(proc) == b"still serving"
    assert "no token redeemed within 3s" in proc.log()
    assert_no_traceback(proc)


def _unended_header_block(sock: socket.socket, stream_id: int, size: int, count: int,
                          timeout: float) -> list:
    """HEADERS of `size` bytes without END_HEADERS, then `count` CONTINUATION frames as
    big, none ending the block; the frames the server sent until it closed."""
    sock.sendall(frame(HEADERS, 0, stream_id, b"\x82" * size))
    try:
        for _ in range(count):
            sock.sendall(frame(CONTINUATION, 0, stream_id, b"\x82" * size))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server already closed: what the tests want
    return read_frames_until_eof(sock, timeout=timeout)


def test_continuation_flood_before_a_token_is_cut_at_the_head_limit(serve):
    proc = serve()
    sock = socket.create_connection(stream_address(proc))
    try:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        # a header block that never ends: 20 x 4 KiB, well below h2's own CONTINUATION cap
        frames = _unended_header_block(sock, 1, 4096, 20, timeout=60)  # was: held, unanswered
        assert goaway_code(frames) == ENHANCE_YOUR_CALM
    finally:
        sock.close()
    assert echo_served(proc) == b"still serving"
    log = proc.log()
    # the head limit (16 KiB), or the header block's own (32 KiB) when one read carried it
    assert "bytes of frames before a token was redeemed" in log or \
        "without END_HEADERS" in log
    assert_no_traceback(proc)


def test_continuation_flood_after_a_token_is_cut_at_twice_the_header_list_size(serve):
    """Once admitted, a header block waiting for END_HEADERS may hold twice the
    MAX_HEADER_LIST_SIZE crishim advertises (16 KiB), not h2's 64 CONTINUATION frames of
    up to 256 KiB each (16 MiB per connection, for the idle timeout)."""
    proc = serve()
    url = proc.port_forward_url(SANDBOX)
    host, port = stream_address(proc)
    sock = socket.create_connection((host, port))
    try:
        block = H2Client._new_conn().encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"),
            (":path", urlsplit(url).path), ("streamtype", "error"),
            ("port", str(ECHO_PORT)), ("requestid", "1")])
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS | 1, 1,
                                                             block))
        _read_until_response(sock, stream_id=1)  # the token is redeemed: a session
        # 176 KiB, well below h2's own 64-frame cap
        frames = _unended_header_block(sock, 3, 16384, 10, timeout=20)  # was: held, unanswered
        assert goaway_code(frames) == ENHANCE_YOUR_CALM
    finally:
        sock.close()
    assert echo_served(proc) == b"still serving"
    lines = _lines_with(proc.log(), "without END_HEADERS")
    assert len(lines) == 1 and "a header block of more than 32768 bytes" in lines[0], lines
    assert " WARNING " in lines[0]
    assert_no_traceback(proc)


def _read_until_response(sock: socket.socket, stream_id: int) -> None:
    """Read the server's frames until a HEADERS frame on stream_id."""
    sock.settimeout(30)
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before answering"
        data += chunk
        while len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            if len(data) < 9 + length:
                break
            kind, sid = data[3], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            del data[: 9 + length]
            if kind == HEADERS and sid == stream_id:
                return


# not base64url; not whole settings; 65 settings, past the 64 a SETTINGS frame may carry
@pytest.mark.parametrize("settings", ["!!!!", "AAMAAABk!", "AAMAAAB+",
                                      base64.urlsafe_b64encode(b"\x00\x03\x00\x00\x00\x64"
                                                               * 65).decode().rstrip("=")])
def test_http2_settings_that_is_not_base64url_settings_is_400(serve, settings):
    proc = serve()
    url = urlsplit(proc.port_forward_url(SANDBOX))
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(f"GET {url.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, "
                     f"HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: {settings}\r\n\r\n"
                     .encode())
        sock.settimeout(30)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 400 "), head  # was 101 for the first three
    assert echo_served(proc, "upgrade") == b"still serving"
    assert_no_traceback(proc)


def test_slow_clients_without_a_token_are_capped(serve):
    cap, slow = 20, 50
    proc = serve("--max-unadmitted", str(cap), "--stream-request-timeout", "60s")
    address = stream_address(proc)
    assert echo_served(proc, "upgrade") == b"still serving"  # warm: plugin, pod dial
    baseline = open_fds(proc)
    live = [socket.create_connection(address) for _ in range(slow)]
    answers: list[bytes] = []  # what the server said to the ones it dropped
    peak = [0]
    stop = threading.Event()

    def trickle() -> None:
        """One header byte per connection every 0.2 s, for at most 10 s."""
        head = b"GET /portforward/x HTTP/1.1\r\nHost: slow\r\n"
        for i in range(50):
            if stop.is_set():
                return
            for sock in list(live):
                try:
                    answer = sock.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:  # nothing said yet: one more byte
                    sock.send(head[i % len(head): i % len(head) + 1])
                    continue
                except OSError as e:
                    answer = repr(e).encode()
                answers.append(answer)
                live.remove(sock)
                sock.close()
            peak[0] = max(peak[0], open_fds(proc))
            time.sleep(0.2)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(1)
        for _ in range(3):  # valid clients are served while the slow ones trickle
            assert echo_served(proc, "upgrade") == b"still serving"
            assert echo_served(proc, "prior") == b"still serving"
    finally:
        stop.set()
        thread.join()
        for sock in live:
            sock.close()
    # the server never holds more than the cap (+ one valid client's connection and its
    # pod socket at a time); before: one descriptor per slow client
    assert peak[0] - baseline <= cap + 4, (baseline, peak[0])
    assert len(live) <= cap
    assert sum(a.startswith(b"HTTP/1.1 503 ") for a in answers) >= slow - cap - 5, answers
    assert echo_served(proc, "upgrade") == b"still serving"
    assert_no_traceback(proc)


def _token(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[1]


def _lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def _refusal(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    return sock.recv(4096).split(b"\r\n", 1)[0]


def test_refused_requests_are_logged_without_their_whole_token(serve):
    """docs/protocol.md 1.2: a log line shows only a token's first 4 characters, however
    the path around it is shaped. Each of these is refused and leaves its token valid."""
    proc = serve()
    host, port = stream_address(proc)
    tokens = []
    # a WebSocket upgrade to /portforward/<token>/ (a trailing slash)
    token = _token(proc.port_forward_url(SANDBOX))
    tokens.append(token)
    with socket.create_connection((host, port)) as sock:
        sock.sendall((f"GET /portforward/{token}/ HTTP/1.1\r\nHost: x\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        assert _refusal(sock) == b"HTTP/1.1 404 Not Found"
    # a request line h11 cannot parse, which its error message quotes
    token = _token(proc.port_forward_url(SANDBOX))
    tokens.append(token)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"GET /portforward/{token} HTTP/1.1 extra\r\nHost: x\r\n\r\n".encode())
        assert _refusal(sock) == b"HTTP/1.1 400 Bad Request"
    # an HTTP/2 first stream with :path //portforward/<token>
    token = _token(proc.port_forward_url(SANDBOX))
    tokens.append(token)
    with socket.create_connection((host, port)) as sock:
        block = H2Client._new_conn().encoder.encode([
            (":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"),
            (":path", f"//portforward/{token}"), ("streamtype", "error"),
            ("port", str(ECHO_PORT)), ("requestid", "1")])
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS | 1, 1,
                                                             block))
        read_frames_until_eof(sock, timeout=60)  # 404 and GOAWAY: refused, then closed
    log = proc.log()
    refused = _lines_with(log, "refused")
    assert len(_lines_with(log, "stream request GET /portforward/")) >= 1, log
    assert len(_lines_with(log, "h2 stream request POST //portforward/")) == 1, log
    assert len(_lines_with(log, "malformed HTTP request")) == 1, log
    for token in tokens:
        assert _lines_with(log, token[:4] + "…"), (token, refused)
        assert not _lines_with(log, token[:5]), (token, _lines_with(log, token[:5]))
    assert echo_served(proc) == b"still serving"
    assert_no_traceback(proc)


def test_debug_log_shows_no_header_fields_of_http2_requests(serve):
    """At --log-level debug (as every test server runs), hpack and h2 log every decoded
    header field, the token in :path among them: their loggers stay at INFO. The test
    client encodes its headers as h2 does by default (indexed, Huffman), so crishim's
    decoder hands them to hpack."""
    proc = serve()
    assert "--log-level" in proc.proc.args and "debug" in proc.proc.args
    url = proc.port_forward_url(SANDBOX)
    token = _token(url)

    assert echo_served(proc, payload=b"debug", url=url) == b"debug"
    log = proc.log()
    assert _lines_with(log, "h2 session admitted"), log  # the server did log at debug
    assert not _lines_with(log, " hpack."), _lines_with(log, " hpack.")[:5]
    assert not _lines_with(log, " h2."), _lines_with(log, " h2.")[:5]
    assert not _lines_with(log, token[:5])
    assert_no_traceback(proc)


def test_a_request_head_with_bare_lf_line_ends_is_read_at_once(serve):
    """Line ends of a bare LF are taken as h11 and Go's server take them: the upgrade is
    answered at once, not after the request timeout as a head never ended."""
    proc = serve("--stream-request-timeout", "60s")
    url = urlsplit(proc.port_forward_url(SANDBOX))
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST {url.path} HTTP/1.1\nHost: x\nConnection: Upgrade\n"
                     "Upgrade: SPDY/3.1\nX-Stream-Protocol-Version: portforward.k8s.io\n"
                     "\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 101 ")
    assert_no_traceback(proc)


def test_a_request_target_that_does_not_parse_is_400_without_a_traceback(serve):
    """`//[/portforward/x` (an unbalanced IPv6 bracket in the authority urlsplit sees) made
    urlsplit raise: a 500 and an ERROR traceback per request over HTTP/1.1, the same on
    HTTP/2's first stream, none of it budgeted."""
    proc = serve()
    host, port = stream_address(proc)
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"GET //[/portforward/abc HTTP/1.1\r\nHost: x\r\nUpgrade: SPDY/3.1\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        sock.settimeout(30)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"malformed request target" in head

    async def h2_first_stream() -> int | None:
        client = await H2Client.connect(proc.port_forward_url(SANDBOX), "prior")
        try:
            client.path = "//[/portforward/abc"
            sid = client.open_stream(client.request_headers(streamtype="error", port="80"))
            await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
            return client.streams[sid].status
        finally:
            await client.close()

    assert asyncio.run(h2_first_stream()) == 400
    assert echo_served(proc) == b"still serving"
    log = proc.log()
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.parametrize("split", [15000, 0])
def test_a_request_head_past_16_kib_is_431_however_it_arrives(serve, split):
    """The 16 KiB limit was checked only while the head's end had not come: a 45 KB head
    whose end came in the same read as its 16th KiB (in one write, or 15,000 bytes and
    then the rest) was parsed, before any token check, and upgraded."""
    proc = serve()
    url = urlsplit(proc.port_forward_url(SANDBOX))
    head = (f"POST {url.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n"
            + "".join(f"X-Filler-{i}: {i}\r\n" for i in range(2200)) + "\r\n").encode()
    assert 40_000 < len(head) < 60_000  # in one read of the server's
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        if split:
            sock.sendall(head[:split])
            time.sleep(0.2)  # read on its own: no end in it, under the limit
        try:
            sock.sendall(head[split:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while the rest was still going out
        answer = _refusal(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert_no_traceback(proc)
