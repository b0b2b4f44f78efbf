"""Floods: one client must not cost anyone else a byte, a slot or a millisecond.

- answers a client does not read: crishim stops reading it (its output buffer above the
  high-water mark), so answers never pile up in memory;
- control frames (PING, SETTINGS, resets, frames in error) past a per-session budget end
  the session: SPDY GOAWAY PROTOCOL_ERROR, HTTP/2 GOAWAY ENHANCE_YOUR_CALM, WebSocket 1008;
  also SETTINGS floods and rapid reset (CVE-2023-44487) on HTTP/2;
- bad frames: the first few are logged, then only counted, once, at the session's end;
- a pod that never reads: what crishim holds towards it is bounded per session (HTTP/2:
  by the windows it grants; SPDY: by pausing the client's reading).

Each test asserts what the client was told, that a second client is served afterwards,
that the server's RSS stayed bounded, and that the log has no traceback."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import threading
import time
from typing import cast
from urllib.parse import urlsplit

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, SettingsFrame

from crishim.netns import bind_udp_in_netns, listen_in_netns, open_netns, socket_in_netns
from crishim.protocols import websocket as ws
from crishim.protocols.datagram import encode_datagram
from crishim.protocols.spdy import GoAwayReceived, SpdyConfig, SpdyConnection, StreamReset
from tests.support import SANDBOX, status_mib
from tests.support.crishim_proc import CrishimProcess
from tests.support.h2_pf_client import H2Client
from tests.support.podnet import CLOSED_PORT, ECHO_PORT, SOURCE_PORT, source_bytes
from tests.support.spdy_pf_client import SpdyPortForwardClient

STALLED_PORT = 9010  # accepts and never reads
UNANSWERED_PORT = 9011  # never accepts: dials hang
SPDY_GOAWAY_PROTOCOL_ERROR = 1
POLICY_VIOLATION = 1008  # WebSocket close code
UNLIMITED = "1000000000"  # a budget no test reaches: what is left is backpressure alone


class _NeverReads(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stalled_pod(podnet):
    podnet.listen_extra("127.0.0.1", STALLED_PORT, _NeverReads)
    return podnet


def _serve(podnet, *args: str) -> CrishimProcess:
    return CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--max-tokens", "1000",
                          *args)


def _rss_mib(pid: int) -> float:
    return status_mib(pid)


def _log_lines(proc: CrishimProcess) -> int:
    return proc.log().count("\n")


def _second_client_is_served(proc: CrishimProcess) -> None:
    with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
        fwd = other.roundtrip(ECHO_PORT, b"still serving")
        assert bytes(fwd.received) == b"still serving", (fwd.error_text, fwd.reset_status)


def _warm(proc: CrishimProcess) -> float:
    """RSS after one ordinary session: the level floods are measured from."""
    _second_client_is_served(proc)
    time.sleep(0.2)
    return _rss_mib(proc.proc.pid)


def _flood(sock: socket.socket, unit: bytes, total: int, timeout: float = 3.0) -> int:
    """Send `unit` repeated up to `total` bytes without reading; returns the bytes the
    kernel took before the peer closed or stopped reading for `timeout` seconds."""
    block = unit * max(1, (64 * 1024) // len(unit))
    sock.settimeout(timeout)
    sent = 0
    try:
        while sent < total:
            sock.sendall(block)
            sent += len(block)
    except (TimeoutError, OSError):
        pass
    return sent


def _read_to_end(sock: socket.socket, out: bytearray, limit: int = 64 << 20) -> None:
    try:
        while len(out) < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, OSError):
        pass


def _flood_reading(sock: socket.socket, unit: bytes, total: int) -> tuple[int, bytes]:
    """_flood while another thread reads the answers (so that they can arrive before the
    server closes); returns the bytes sent and everything read."""
    answer = bytearray()
    reader = threading.Thread(target=_read_to_end, args=(sock, answer), daemon=True)
    reader.start()
    sent = _flood(sock, unit, total, timeout=10)
    reader.join(20)
    sock.close()
    return sent, bytes(answer)


def _spdy_goaways(data: bytes) -> list[int]:
    codec = SpdyConnection(SpdyConfig(client=True))
    return [e.status for e in codec.receive_data(data) if isinstance(e, GoAwayReceived)]


def _spdy_ping(ping_id: int) -> bytes:
    return struct.pack(">IIL", 0x80030006, 4, ping_id)


def _spdy_unknown_stream_data(count: int) -> bytes:
    """Empty DATA frames, each for a stream that was never opened (odd: the client's)."""
    return b"".join(struct.pack(">II", 2 * i + 1001, 0) for i in range(count))


# --------------------------------------------------------------------------- class 2


def test_spdy_ping_flood_ends_the_session_with_goaway(podnet):
    with _serve(podnet) as proc:
        before = _warm(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        sent, answer = _flood_reading(
            client.sock, b"".join(_spdy_ping(2 * i + 1) for i in range(64)), 16 << 20)
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    print(f"sent {sent} bytes of PINGs, read {len(answer)}, RSS +{grown:.1f} MiB")
    assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR]
    assert len(answer) < 1 << 20  # the answers stopped with the session
    assert grown < 16, grown
    assert "control_frames_per_second" in log
    assert "Traceback" not in log


def test_spdy_streams_opened_past_the_budget_end_the_session_with_goaway(podnet):
    """stream_opens_per_second / stream_open_burst: a session that opens streams faster
    ends with GOAWAY and says which setting; the next client is served."""
    with _serve(podnet, "--stream-opens-per-second", "5", "--stream-open-burst", "100") as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            for _ in range(60):  # 120 streams: past the burst of 100
                client.forward(ECHO_PORT)
            client.flush()
            assert client.wait(lambda: client.goaway, 10)
        _second_client_is_served(proc)
        log = proc.log()
    assert "stream_opens_per_second" in log and "more than 100 streams opened" in log
    assert "Traceback" not in log


def test_spdy_repeated_storms_stay_within_the_default_stream_budget(podnet):
    """The defaults let a load test through: 4 x 2,000 connections at once on one session
    (16,000 streams in a few seconds; the old defaults, 10,000 at once and 1,000 a second,
    ended it)."""
    with _serve(podnet) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=60) as client:
            for round_ in range(4):
                forwards = [client.forward(ECHO_PORT) for _ in range(2000)]
                for fwd in forwards:
                    fwd.send(b"+")
                assert client.wait(lambda fs=forwards: all(f.received == b"+" for f in fs),
                                   60), (round_, client.goaway)
                for fwd in forwards:
                    fwd.close_write()
                assert client.wait(lambda fs=forwards: all(f.finished() for f in fs), 60)
            assert not client.goaway
        log = proc.log()
    assert "stream_opens_per_second" not in log
    assert "Traceback" not in log


def test_unread_answers_stop_crishim_reading_the_client(podnet):
    # budgets out of the way: only the output backpressure bounds the answers
    with _serve(podnet, "--control-frame-burst", UNLIMITED,
                "--control-frames-per-second", UNLIMITED) as proc:
        before = _warm(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        sent = _flood(client.sock, b"".join(_spdy_ping(2 * i + 1) for i in range(64)),
                      24 << 20)
        time.sleep(0.5)
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        # the client was stalled, not dropped: once it reads, its answers come
        client.sock.settimeout(10)
        assert client.sock.recv(65536)
        client.sock.close()
        log = proc.log()
    print(f"sent {sent} bytes of PINGs before the server stopped reading, "
          f"RSS +{grown:.1f} MiB")
    assert sent < 24 << 20, sent  # the client was stalled: kernel buffers and 1 MiB of output
    assert grown < 24, grown
    assert "Traceback" not in log


def test_spdy_unknown_stream_data_ends_the_session_with_goaway(podnet):
    with _serve(podnet) as proc:
        before = _warm(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        sent, answer = _flood_reading(client.sock, _spdy_unknown_stream_data(1 << 19),
                                      4 << 20)
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    print(f"sent {sent} bytes of DATA for unknown streams, read {len(answer)}, "
          f"RSS +{grown:.1f} MiB")
    assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR]
    assert len(answer) < 1 << 20
    assert grown < 16, grown
    assert "Traceback" not in log


@pytest.mark.parametrize("frame", [
    # RST_STREAM for streams never opened: the codec returned before reporting them
    struct.pack(">IIII", 0x80030003, 8, 1001, 5),
    # session WINDOW_UPDATE of 1: no SPDY client returns credit for DATA it never got
    struct.pack(">IIII", 0x80030009, 8, 0, 1),
], ids=["rst-stream-never-opened", "window-update-of-1"])
def test_spdy_free_frame_floods_end_the_session_with_goaway(podnet, frame):
    """Frames that cost work and carry nothing were free: 14-34 M accepted in 20 s, a
    core busy. Each is now charged to the control budget once it is not the credit of a
    stream just closed or of DATA sent."""
    with _serve(podnet) as proc:
        before = _warm(proc)
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as live:
            fwd = live.forward(ECHO_PORT)
            fwd.send(b"live")
            assert live.wait(lambda: bytes(fwd.received) == b"live")
            client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
            sent, answer = _flood_reading(client.sock, frame * 8192, 16 << 20)
            fwd.send(b" still")  # another session's connection is unharmed
            assert live.wait(lambda: bytes(fwd.received) == b"live still")
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    print(f"sent {sent} bytes, read {len(answer)}, RSS +{grown:.1f} MiB")
    assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR]
    assert sent < 8 << 20  # ended within the budget, not at the end of the flood
    assert "control_frames_per_second" in log and "an ignored control frame" in log
    assert grown < 16, grown
    assert "Traceback" not in log


def _ws_connect(url: str, protocol: str = ws.CHANNEL_BINARY) -> tuple[socket.socket, bytes]:
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    request, accept = ws.client_handshake_request(u.netloc, u.path, [protocol])
    sock.sendall(request)
    buf = b""
    response = None
    while response is None:
        data = sock.recv(65536)
        assert data, f"closed during the handshake: {buf!r}"
        buf += data
        response = ws.parse_handshake_response(buf, accept, [protocol])
    assert response.status == 101
    return sock, response.leftover


def _ws_close_code(data: bytes) -> int | None:
    framing = ws.WebSocketFraming(client=True)
    for event in framing.receive_data(data):
        if isinstance(event, ws.Closed):
            return event.code
    return None


def _masked_empty(b0: int) -> bytes:
    return bytes([b0, 0x80]) + os.urandom(4)


def _channel_byte_alone() -> bytes:
    """A binary message of channel 0's byte and no data: it forwards nothing."""
    mask = os.urandom(4)
    return bytes([0x82, 0x81]) + mask + bytes([mask[0]])


TUNNEL = "SPDY/3.1+portforward.k8s.io"


@pytest.mark.parametrize("protocol, first, unit", [
    (ws.CHANNEL_BINARY, b"", _masked_empty(0x89)),  # pings
    (ws.CHANNEL_BINARY, b"", _masked_empty(0x8A)),  # unsolicited pongs
    # a fragmented message that never grows: empty continuation frames
    (ws.CHANNEL_BINARY, _masked_empty(0x02), _masked_empty(0x00)),
    # data messages with no data (300,000 were all read, the session went on)
    (ws.CHANNEL_BINARY, b"", _channel_byte_alone()),
    (TUNNEL, b"", _masked_empty(0x89)),
    (TUNNEL, b"", _masked_empty(0x8A)),
    (TUNNEL, b"", _masked_empty(0x82)),  # empty binary frames: no tunnel bytes
], ids=["channels-ping", "channels-pong", "channels-empty-fragment", "channels-no-data",
        "tunnel-ping", "tunnel-pong", "tunnel-empty-binary"])
def test_websocket_floods_of_frames_that_carry_nothing_close_with_1008(podnet, protocol,
                                                                       first, unit):
    with _serve(podnet) as proc:
        before = _warm(proc)
        url = proc.port_forward_url(SANDBOX, [ECHO_PORT] if protocol != TUNNEL else [])
        sock, leftover = _ws_connect(url, protocol)
        sock.sendall(first)
        sent, answer = _flood_reading(sock, unit, 16 << 20)
        answer = leftover + answer
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    print(f"sent {sent} bytes of {unit[:1].hex()} frames, read {len(answer)}, "
          f"RSS +{grown:.1f} MiB")
    assert _ws_close_code(answer) == POLICY_VIOLATION
    assert len(answer) < 1 << 20
    assert grown < 16, grown
    assert "Traceback" not in log


def test_malformed_spdy_in_the_websocket_tunnel_closes_it_1002(podnet):
    """SPDY the session cannot parse (a control frame of SPDY/2) ends the tunnel with a
    protocol error's close, 1002 (RFC 6455 7.4.1), not 1000 as though all went well."""
    with _serve(podnet) as proc:
        sock, leftover = _ws_connect(proc.port_forward_url(SANDBOX), TUNNEL)
        spdy2 = b"\x80\x02\x00\x01\x00\x00\x00\x0a" + bytes(10)  # SYN_STREAM, version 2
        mask = os.urandom(4)
        sock.sendall(bytes([0x82, 0x80 | len(spdy2)]) + mask
                     + bytes(b ^ mask[i % 4] for i, b in enumerate(spdy2)))
        answer = leftover
        sock.settimeout(10)
        while not answer or _ws_close_code(answer) is None:  # b"" reads as 1006
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        sock.close()
        _second_client_is_served(proc)
        log = proc.log()
    assert _ws_close_code(answer) == 1002
    assert "Traceback" not in log


async def _h2_flood(url: str, frames: bytes, total: int,
                    refused: bool = False) -> tuple[H2Client, int]:
    """An admitted HTTP/2 connection (one live forward; with `refused`, then one to a
    closed port), then `frames` repeated up to `total` bytes; waits for the connection
    to end."""
    client = await H2Client.connect(url)
    await client.forward(ECHO_PORT)  # streams 1 and 3
    if refused:
        fwd = await client.forward(CLOSED_PORT)  # 5 and 7: crishim resets 7, the data
        await asyncio.wait_for(client.streams[fwd.data_id].ended.wait(), 10)
    sent = 0
    block = frames * max(1, (64 * 1024) // len(frames))
    while sent < total and not client.closed.is_set():
        client.write_raw(block)
        sent += len(block)
        try:
            await asyncio.wait_for(client.writer.drain(), 3)
        except (TimeoutError, ConnectionError):
            break
    await asyncio.wait_for(client.closed.wait(), 20)
    return client, sent


def _h2_answer(proc: CrishimProcess, frames: bytes, total: int, refused: bool = False) -> int:
    client, sent = asyncio.run(_h2_flood(proc.port_forward_url(SANDBOX), frames, total,
                                         refused))
    assert client.terminated is not None, "no GOAWAY"
    print(f"sent {sent} bytes, GOAWAY {client.terminated.error_code!r}")
    return int(client.terminated.error_code)


def _h2_frame(kind: int, flags: int, stream_id: int, body: bytes) -> bytes:
    return struct.pack(">HBBBL", len(body) >> 8, len(body) & 0xFF, kind, flags,
                       stream_id) + body


def _h2_ping() -> bytes:
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    return cast(bytes, ping.serialize())


@pytest.mark.parametrize("frames,total", [
    (_h2_ping(), 16 << 20),  # each answered
    (SettingsFrame(0).serialize(), 100_000 * 9),  # each acknowledged
    # one SETTINGS frame of 40,000 entries (within the advertised 256 KiB MAX_FRAME_SIZE):
    # h2 spent ~350 ms on each, and every session on the event loop waited
    (_h2_frame(0x4, 0, 0, struct.pack(">HL", 0x2, 0) * 40_000), 3 * 240_009),
    # WINDOW_UPDATE of 1 on the connection, none of it credit for DATA received: free
    # until now (millions a second, a core busy)
    (_h2_frame(0x8, 0, 0, struct.pack(">L", 1)), 200_000 * 13),
    # DATA on the live data stream with only padding: counted as data, so free
    (_h2_frame(0x0, 0x8, 3, b"\x00"), 200_000 * 10),
    # DATA on a stream crishim reset (a refused dial): h2 answers each with RST_STREAM;
    # free past what may have been in flight, 20,000 frames got 20,000 free answers
    (_h2_frame(0x0, 0, 7, b"x"), 200_000 * 10),
], ids=["ping", "settings", "settings-of-40000-entries", "window-update-of-1",
        "padding-only-data", "data-on-a-reset-stream"])
def test_h2_frames_that_cost_work_and_carry_nothing_get_enhance_your_calm(podnet, frames,
                                                                          total):
    with _serve(podnet) as proc:
        before = _warm(proc)
        # the frames on stream 7 need it to be a stream crishim reset
        code = _h2_answer(proc, frames, total, refused=frames[5:9] == b"\0\0\0\x07")
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    assert code == ErrorCodes.ENHANCE_YOUR_CALM
    assert grown < 16, grown
    assert "Traceback" not in log


def test_h2_rapid_reset_gets_goaway_enhance_your_calm(podnet):
    with _serve(podnet) as proc:
        before = _warm(proc)

        async def go() -> H2Client:
            client = await H2Client.connect(proc.port_forward_url(SANDBOX))
            await client.forward(ECHO_PORT)
            headers = client.request_headers(streamtype="error", port=str(ECHO_PORT))
            conn = client.conn
            for n in range(20_000):
                if client.closed.is_set() or client.terminated is not None:
                    break  # the server's GOAWAY arrived
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                conn.reset_stream(sid)
                if n % 100 == 99:
                    client.flush()
                    try:
                        await asyncio.wait_for(client.writer.drain(), 3)
                    except (TimeoutError, ConnectionError):
                        break
            client.flush()
            await asyncio.wait_for(client.closed.wait(), 20)
            return client

        client = asyncio.run(go())
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    assert client.terminated is not None, "no GOAWAY"
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert grown < 16, grown
    assert "Traceback" not in log


# --------------------------------------------------------------------------- class 3


def test_bad_frames_grow_the_log_by_a_bounded_number_of_lines(podnet):
    # budgets out of the way: every bad frame is answered, only its log line is spared
    with _serve(podnet, "--control-frame-burst", UNLIMITED,
                "--control-frames-per-second", UNLIMITED) as proc:
        _warm(proc)
        lines = _log_lines(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        junk = _spdy_unknown_stream_data(1 << 19)  # 4 MiB: half a million bad frames
        answer = bytearray()
        reader = threading.Thread(target=_read_to_end, args=(client.sock, answer, 1 << 30),
                                  daemon=True)
        reader.start()
        sent = _flood(client.sock, junk, len(junk), timeout=10)
        client.sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        client.sock.close()
        deadline = time.monotonic() + 10
        while "protocol errors suppressed" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        _second_client_is_served(proc)
        log = proc.log()
        grown = _log_lines(proc) - lines
    print(f"sent {sent} bytes of bad frames; the log grew {grown} lines")
    assert sent == len(junk)
    assert grown < 60, grown
    assert "more protocol errors suppressed" in log
    assert "Traceback" not in log


# --------------------------------------------------------------------------- class 5


async def _fill_stalled(url: str, streams: int, per_stream: int) -> int:
    """`streams` forwards to the stalled pod on one HTTP/2 connection, each sent up to
    `per_stream` bytes as fast as the windows allow; returns the bytes crishim took."""
    client = await H2Client.connect(url)
    forwards = [await client.forward(STALLED_PORT) for _ in range(streams)]
    chunk = memoryview(bytes(256 * 1024))
    sent = dict.fromkeys((f.data_id for f in forwards), 0)
    conn = client.conn
    progress = True
    while progress:
        progress = False
        for sid in sent:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            n = min(window, per_stream - sent[sid], len(chunk))
            if n > 0:
                conn.send_data(sid, chunk[:n])
                sent[sid] += n
                progress = True
        client.flush()
        await client.writer.drain()
        if not progress:  # windows closed: give crishim time to acknowledge more
            client.window_opened.clear()
            try:
                await asyncio.wait_for(client.window_opened.wait(), 2)
                progress = True
            except TimeoutError:
                pass
    total = sum(sent.values())
    await client.close()
    return total


def test_h2_stalled_pod_holds_a_bounded_amount(stalled_pod):
    with _serve(stalled_pod) as proc:
        before = _warm(proc)
        url = proc.port_forward_url(SANDBOX)

        async def two() -> list[int]:
            urls = [url, proc.port_forward_url(SANDBOX)]
            return list(await asyncio.gather(*(_fill_stalled(u, 8, 24 << 20)
                                               for u in urls)))

        taken = asyncio.run(two())
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        log = proc.log()
    print(f"crishim took {taken} bytes for a pod that never reads, RSS +{grown:.1f} MiB")
    # 16 MiB connection windows (session_buffer_size); the kernel holds the rest
    assert grown < 96, grown
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def unanswered_port(podnet):
    """A port whose accept queue is full and never served: dials to it hang."""
    sock = listen_in_netns(podnet.path, "127.0.0.1", UNANSWERED_PORT, backlog=0)
    fillers = []
    for _ in range(4):  # fill the accept queue from inside the netns (SYNs then drop)
        fd = open_netns(podnet.path)
        try:
            filler = socket_in_netns(fd, socket.AF_INET)
        finally:
            os.close(fd)
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", UNANSWERED_PORT))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.2)
    yield UNANSWERED_PORT
    for filler in fillers:
        filler.close()
    sock.close()


def test_spdy_connections_still_dialling_hold_one_buffer_per_session(podnet,
                                                                     unanswered_port):
    """SPDY has no flow control: what crishim holds for connections still dialling is
    bounded by pausing the client's reading once the session holds buffer_size."""
    with _serve(podnet) as proc:
        before = _warm(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        forwards = [client.forward(unanswered_port) for _ in range(100)]
        client.sock.settimeout(3)
        chunk = bytes(64 * 1024)
        sent = 0
        try:
            for _ in range(16):
                for fwd in forwards:
                    client.session.send_data(fwd.data_sid, chunk)
                    client.sock.sendall(client.session.data_to_send())
                    sent += len(chunk)
        except (TimeoutError, OSError):
            pass
        time.sleep(0.5)
        grown = _rss_mib(proc.proc.pid) - before
        _second_client_is_served(proc)
        client.sock.close()
        log = proc.log()
    print(f"sent {sent} bytes for connections still dialling, RSS +{grown:.1f} MiB")
    assert grown < 12, grown
    assert "Traceback" not in log


UDP_FLOOD_PORT = 9012  # answers each datagram with a burst of the biggest datagrams


def _udp_answers_with_bursts(podnet, stop: threading.Event, burst: int) -> None:
    sock = bind_udp_in_netns(podnet.path, "127.0.0.1", UDP_FLOOD_PORT)
    sock.setblocking(True)
    sock.settimeout(0.2)
    biggest = b"F" * 65507
    try:
        while not stop.is_set():
            try:
                _, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            for _ in range(burst):
                try:
                    sock.sendto(biggest, peer)
                except OSError:
                    pass
    finally:
        sock.close()


async def _h2_udp_flows_never_given_window(url: str, flows: int, watch) -> float:
    """One HTTP/2 session (the connection window left at 64 KiB, no DATA acknowledged)
    opening `flows` UDP flows, each sending one datagram; the peak of watch() meanwhile."""
    u = urlsplit(url)
    conn = H2Client._new_conn()
    conn.initiate_connection()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    client = H2Client(reader, writer, conn, u.path)
    client.flush()
    client._task = asyncio.get_running_loop().create_task(client._read_loop())
    headers = {"x-stream-protocol-version": "portforward.crishim.dev/v1, portforward.k8s.io",
               "protocol": "udp", "port": str(UDP_FLOOD_PORT)}
    peak = watch()
    try:
        for i in range(flows):
            client.open_stream(client.request_headers(streamtype="error", requestid=str(i),
                                                      **headers), end_stream=True)
            sid = client.open_stream(client.request_headers(streamtype="data",
                                                            requestid=str(i), **headers))
            client.hold_acks.add(sid)
            client.conn.send_data(sid, encode_datagram(b"go"))
            client.flush()
            if i % 10 == 9:
                await asyncio.sleep(0.05)
                peak = max(peak, watch())
        for _ in range(12):
            await asyncio.sleep(0.25)
            peak = max(peak, watch())
    finally:
        await client.close()
    return peak


def test_h2_udp_flows_whose_client_gives_no_window_hold_a_write_each(podnet):
    """A pod answering with bursts of 64 KiB datagrams, a client that never opens its
    window: each flow stops reading its pod socket after one write of about 64 KiB (it
    read 64 datagrams first: 4 MiB a flow held in the stream's queue)."""
    stop = threading.Event()
    pod = threading.Thread(target=_udp_answers_with_bursts, args=(podnet, stop, 40),
                           daemon=True)
    pod.start()
    try:
        with _serve(podnet, "--udp-flow-idle-timeout", "60s") as proc:
            before = _warm(proc)
            peak = asyncio.run(asyncio.wait_for(_h2_udp_flows_never_given_window(
                proc.port_forward_url(SANDBOX), 60, lambda: _rss_mib(proc.proc.pid)), 60))
            _second_client_is_served(proc)
            log = proc.log()
    finally:
        stop.set()
        pod.join(5)
    print(f"60 UDP flows without window: RSS peak +{peak - before:.1f} MiB")
    assert peak - before < 40, peak - before
    assert "Traceback" not in log


ENDLESS_PORT = 9013  # sends without end to whoever connects


class _Endless(asyncio.Protocol):
    CHUNK = b"e" * 65536

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.paused = False
        self._fill()

    def _fill(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(self.CHUNK)  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()


def test_clients_that_never_read_hold_output_from_the_buffer_budget(podnet):
    """30 sessions whose pods send without end to clients that never read: each session's
    output may hold 1 MiB only while the buffer budget (here 4 MiB) lasts, 64 KiB after,
    and pods are read no further than that room. Each held ~2 MiB (its 1 MiB mark and a
    pod read past it), with no bound but max_sessions."""
    podnet.listen_extra("127.0.0.1", ENDLESS_PORT, _Endless)
    with _serve(podnet, "--buffer-budget", str(4 << 20)) as proc:
        before = _warm(proc)
        clients = []
        try:
            for _ in range(30):
                client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.forward(ENDLESS_PORT)
                clients.append(client)
            peak = before
            for _ in range(20):  # the pods fill what they may
                time.sleep(0.1)
                peak = max(peak, _rss_mib(proc.proc.pid))
            _second_client_is_served(proc)
        finally:
            for client in clients:
                client.sock.close()
        log = proc.log()
    print(f"30 sessions not reading: RSS peak +{peak - before:.1f} MiB")
    assert peak - before < 30, peak - before
    assert "Traceback" not in log


def test_a_session_admitted_while_the_output_budget_is_spent_gets_it_as_it_frees(podnet):
    """--buffer-budget 2 MiB is one session's output allowance (4 x buffer_size and a pod
    read). A second session admitted meanwhile works within 64 KiB; when the first ends it
    is granted the allowance (before, it kept 64 KiB for its whole life) and goes on."""
    with _serve(podnet, "--buffer-budget", str(2 << 20)) as proc:
        first = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        second = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        try:
            assert first.roundtrip(ECHO_PORT, b"one").received == b"one"
            fwd = second.roundtrip(SOURCE_PORT, b"%d\n" % (4 << 20))
            assert bytes(fwd.received) == source_bytes(4 << 20)
            time.sleep(0.2)
            assert "granted after waiting" not in proc.log()
            first.close()
            deadline = time.monotonic() + 10
            while "granted after waiting" not in proc.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "output allowance granted after waiting for the buffer budget" \
                in proc.log()
            fwd = second.roundtrip(SOURCE_PORT, b"%d\n" % (8 << 20))
            assert bytes(fwd.received) == source_bytes(8 << 20)
        finally:
            first.close()
            second.close()
        log = proc.log()
    assert log.count("granted after waiting") == 1
    assert "Traceback" not in log


def test_connection_lines_past_log_lines_per_second_are_counted_not_written(podnet):
    """A session opening connections to a closed port within its stream budget wrote a
    line each (4,481 a second from one session); past log_lines_per_second (bursts of
    10x) they are counted and the count written. Another session's lines have their own
    budget."""

    with _serve(podnet, "--log-lines-per-second", "5") as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            forwards = [client.forward(CLOSED_PORT) for _ in range(200)]
            assert client.wait(lambda: all(f.finished() for f in forwards), 30)
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
                fwd = other.forward(ECHO_PORT)
                fwd.send(b"x")
                assert other.wait(lambda: bytes(fwd.received) == b"x")
        deadline = time.monotonic() + 10
        while "more connection lines not logged" not in proc.log() and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        log = proc.log()
    refused = log.count(f"port={CLOSED_PORT} transport=spdy ended")
    counted = [int(n) for n in re.findall(r"(\d+) more connection lines not logged", log)]
    print(f"{refused} lines written, {counted} counted")
    assert 50 <= refused < 100  # the burst, and what the rate gave meanwhile
    assert refused + sum(counted) == 200  # every connection is a line or counted
    assert f"port={ECHO_PORT} transport=spdy ended" in log  # the other session's own
    assert "Traceback" not in log


def test_refused_requests_past_log_lines_per_second_are_counted_not_written(podnet):
    """Connections with a malformed request need no token: 2,246 lines a second. The
    server's refusal lines share one budget."""
    with _serve(podnet, "--log-lines-per-second", "5") as proc:
        host, port = urlsplit(proc.port_forward_url(SANDBOX)).netloc.split(":")
        for _ in range(300):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"GARBAGE\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 400")
        _second_client_is_served(proc)
        deadline = time.monotonic() + 10
        while "refused stream requests not logged" not in proc.log() and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        log = proc.log()
    written = log.count("stream request refused: 400")
    counted = [int(n) for n in re.findall(
        r"(\d+) more lines about refused stream requests not logged", log)]
    print(f"{written} lines written, {counted} counted")
    assert 50 <= written < 150
    assert written + sum(counted) == 300
    assert "Traceback" not in log


def test_stream_pairs_waiting_for_their_other_stream_are_bounded_per_session(podnet):
    """Error streams whose data stream never comes were held up to the transport's stream
    limit (10,000 on SPDY, 8,200 on HTTP/2, ~1 KiB each for stream_creation_timeout);
    now no more than max_connections_per_session wait: the next is refused, alone, and
    once the waiting ones time out the session pairs again."""
    with _serve(podnet, "--max-connections-per-session", "100",
                "--stream-creation-timeout", "1s") as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            sids = [client.session.open_stream({"streamtype": "error", "port": str(ECHO_PORT),
                                                "requestid": f"lone-{i}"})
                    for i in range(150)]
            client.flush()
            refused: dict[int, int] = {}
            # these streams are not the test client's forwards: read their resets raw
            deadline = time.monotonic() + 10
            while len(refused) < 50 and time.monotonic() < deadline:
                client.sock.settimeout(1)
                try:
                    data = client.sock.recv(65536)
                except TimeoutError:
                    continue
                for ev in client.session.receive_data(data):
                    if isinstance(ev, StreamReset):
                        refused[ev.stream_id] = ev.status
            assert sorted(refused) == sids[100:], sorted(refused)[:5]
            assert not client.goaway
            time.sleep(1.5)  # the 100 waiting pairs time out
            fwd = client.forward(ECHO_PORT)
            fwd.send(b"paired again")
            assert client.wait(lambda: bytes(fwd.received) == b"paired again")
        log = proc.log()
    assert "100 stream pairs already wait for their other stream" in log
    assert "Traceback" not in log
