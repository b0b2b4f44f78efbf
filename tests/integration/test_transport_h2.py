"""HTTP/2 port-forward end to end: a real `crishim serve`, the real pod netns, and a client
on the `h2` library over a real socket, by h2c prior knowledge, Upgrade: h2c and TLS+ALPN."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import ssl
import struct
import time
from urllib.parse import urlsplit

import pytest
from hyperframe.frame import HeadersFrame, PriorityFrame, RstStreamFrame

from crishim.stream.tls import self_signed
from tests.support import SANDBOX, status_mib, until
from tests.support.crishim_proc import CrishimProcess
from tests.support.h2_pf_client import WINDOW, Forward, H2Client, StreamState, UpgradeRefused
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

MiB = 1 << 20
PROTOCOL_ERROR = 1
CANCEL = 8
COMPRESSION_ERROR = 9
RST_STREAM, GOAWAY = 3, 7  # frame types
MODES = ["prior", "upgrade", "tls"]


def run(coro, timeout: float = 180):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def tls_crishim(podnet):
    """A crishim serving TLS with a self-signed certificate made at start."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--enable-tls-streaming",
                          "--stream-creation-timeout", "5s")
    with proc:
        yield proc


@pytest.fixture(params=MODES)
def h2_server(request, crishim, tls_crishim):
    """(crishim process, mode): the same tests by each way onto HTTP/2."""
    return (tls_crishim if request.param == "tls" else crishim), request.param


async def _client(proc: CrishimProcess, mode: str) -> H2Client:
    return await H2Client.connect(proc.port_forward_url(SANDBOX), mode)


async def _echo(client: H2Client, payload: bytes) -> bytes:
    fwd = await client.forward(ECHO_PORT)
    await fwd.write(payload, end_stream=True)
    got = await fwd.read_all()
    assert fwd.data.reset_code is None
    assert await fwd.error_text() == ""
    return got


def test_url_scheme_is_https_with_tls(tls_crishim):
    assert tls_crishim.port_forward_url(SANDBOX).startswith("https://127.0.0.1:")


def test_http_get_through_the_forward(h2_server):
    proc, mode = h2_server

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(HTTP_PORT)
        await fwd.write(b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n", end_stream=True)
        body = await fwd.read_all()
        assert body.startswith(b"HTTP/1.1 200 OK")
        assert body.endswith(HTTP_BODY)
        assert fwd.data.remote_ended and fwd.data.reset_code is None
        assert await fwd.error_text() == ""
        if mode == "upgrade":  # stream 1, the upgrade request, is answered and empty
            assert client.streams[1].status == 200 and client.streams[1].body() == b""
        await client.close()
    run(go())


def test_64mib_up_to_sink(h2_server):
    proc, mode = h2_server
    payload = source_bytes(64 * MiB)

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(SINK_PORT)
        await fwd.write(payload, end_stream=True)
        answer = (await fwd.read_all()).decode()
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
        assert await fwd.error_text() == ""
        await client.close()
    run(go())


def test_64mib_down_from_source(h2_server):
    proc, mode = h2_server
    size = 64 * MiB

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(SOURCE_PORT)
        await fwd.write(b"%d\n" % size)
        got = await fwd.read_all()
        assert len(got) == size
        assert hashlib.sha256(got).digest() == hashlib.sha256(source_bytes(size)).digest()
        assert fwd.data.remote_ended and fwd.data.reset_code is None
        await fwd.close_write()
        assert await fwd.error_text() == ""
        await client.close()
    run(go())


def test_100_concurrent_streams_on_one_connection(h2_server):
    proc, mode = h2_server

    async def go():
        client = await _client(proc, mode)
        payloads = [os.urandom(1000 + 997 * i) for i in range(100)]
        results = await asyncio.gather(*(_echo(client, p) for p in payloads))
        assert results == payloads
        await client.close()
    run(go())


def test_half_close_echo(h2_server):
    proc, mode = h2_server

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(ECHO_PORT)
        await fwd.write(b"first ")
        assert (await fwd.read_until(b"first ")).endswith(b"first ")
        await fwd.write(b"last", end_stream=True)  # half-close: the echo still answers
        assert await fwd.read_all() == b"first last"
        assert fwd.data.remote_ended and fwd.data.reset_code is None
        assert await fwd.error_text() == ""
        await client.close()
    run(go())


def test_reset_from_pod_ends_only_that_stream(h2_server):
    proc, mode = h2_server

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(RESET_PORT)
        await fwd.write(b"provoke")
        await fwd.read_all()
        assert fwd.data.reset_code == CANCEL
        assert await fwd.error_text() == ""  # quiet: text would end a client-go session
        assert await _echo(client, b"still alive") == b"still alive"
        await client.close()
    run(go())


def test_closed_port_ends_only_that_stream(h2_server):
    proc, mode = h2_server

    async def go():
        client = await _client(proc, mode)
        fwd = await client.forward(CLOSED_PORT)
        await fwd.read_all()
        assert fwd.data.reset_code == CANCEL
        assert await fwd.error_text() == ""
        assert await _echo(client, b"next one") == b"next one"
        await client.close()
    run(go())


def test_client_reset_ends_the_pod_connection_only(crishim):
    async def go():
        client = await _client(crishim, "prior")
        fwd = await client.forward(SOURCE_PORT)
        await fwd.write(b"%d\n" % (64 * MiB))
        await fwd.read_until(b"x" * 0, 5)
        fwd.reset()
        assert await fwd.error_text() == ""
        assert await _echo(client, b"after reset") == b"after reset"
        await client.close()
    run(go())


def _goaway_harms_nothing_else(crishim, misbehave, code: int = PROTOCOL_ERROR) -> None:
    """A client that misbehaves (`misbehave(client)`, after one good echo) gets GOAWAY
    `code`; another client's forward on the same server goes on, and a new one works."""
    async def go():
        bystander = await _client(crishim, "prior")
        keep = await bystander.forward(ECHO_PORT)
        await keep.write(b"before ")
        victim = await _client(crishim, "prior")
        assert await _echo(victim, b"ok") == b"ok"
        victim_fwd = await victim.forward(ECHO_PORT)
        misbehave(victim)
        await asyncio.wait_for(victim.closed.wait(), 10)
        assert victim.terminated is not None
        assert victim.terminated.error_code == code
        assert victim_fwd.data.ended.is_set()
        await keep.write(b"after", end_stream=True)
        assert await keep.read_all() == b"before after"
        fresh = await _client(crishim, "prior")
        assert await _echo(fresh, b"fresh") == b"fresh"
        await fresh.close()
        await bystander.close()
    run(go())


def test_malformed_http2_gets_goaway_and_harms_nothing_else(crishim):
    # DATA on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 6.1)
    _goaway_harms_nothing_else(
        crishim, lambda victim: victim.write_raw(b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello"))


@pytest.mark.parametrize("bad", [
    [(b"Port", b"9000")],  # upper case in a name (RFC 9113 8.2.1)
    [(b"connection", b"close")],  # connection-specific (8.2.2)
    [(b"port", b"\xff\xfe")],  # not UTF-8
    [(b"port", b"9000 ")],  # value ending in a space
    [(b":custom", b"1")],  # unknown pseudo-header (8.3)
])
def test_malformed_request_headers_get_goaway_and_harm_nothing_else(crishim, bad):
    """crishim checks received header blocks itself (protocols/h2.py): a malformed one is a
    connection error as h2 would have made it, logged as such, never an internal error."""
    def send_malformed(victim) -> None:
        victim.conn.config.validate_outbound_headers = False
        victim.conn.config.normalize_outbound_headers = False
        headers = [(k.encode(), v.encode()) for k, v in victim.request_headers(
            streamtype="data", port=str(ECHO_PORT), requestid="77")]
        victim.open_stream(headers + bad)

    _goaway_harms_nothing_else(crishim, send_malformed)
    log = crishim.log()
    assert "malformed HTTP/2" in log
    assert "Traceback" not in log and "unexpected error" not in log


@pytest.mark.parametrize("block", [
    b"\x80",  # an indexed field of index 0 (RFC 7541 6.1)
    b"\x00\x05ab",  # a literal cut short: the shape crishim's own decoder reads first
    b"\x3f\xe1\x7f",  # a table size update past SETTINGS_HEADER_TABLE_SIZE (RFC 7541 4.2)
])
def test_a_header_block_that_cannot_be_decoded_is_a_compression_error(crishim, block):
    """RFC 9113 4.3: a field block that cannot be decompressed is a connection error of
    type COMPRESSION_ERROR (it was PROTOCOL_ERROR): the decoder's state is lost."""
    def send(victim) -> None:
        sid = victim.conn.get_next_available_stream_id()
        victim.write_raw(HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize())

    _goaway_harms_nothing_else(crishim, send, COMPRESSION_ERROR)


@pytest.mark.parametrize("ahead", [100, 1])  # a client's stream to come; a server's one
def test_rst_stream_on_an_idle_stream_is_a_connection_error(crishim, ahead):
    """RFC 9113 6.4: RST_STREAM for a stream never opened (idle) is a connection error of
    type PROTOCOL_ERROR (it was ignored, charged to the control budget)."""
    def send(victim) -> None:
        sid = victim.conn.highest_outbound_stream_id + ahead
        victim.write_raw(RstStreamFrame(sid, error_code=CANCEL).serialize())

    _goaway_harms_nothing_else(crishim, send)


class _TappedClient(H2Client):
    """H2Client that also keeps each frame the server sent: (type, stream id, payload)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.frames: list[tuple[int, int, bytes]] = []
        self._raw = b""

    def _receive(self, data: bytes) -> None:
        self._raw += data
        end = 0
        while len(self._raw) - end >= 9 + int.from_bytes(self._raw[end:end + 3], "big"):
            end += 9 + int.from_bytes(self._raw[end:end + 3], "big")
        self.frames += _frames(self._raw[:end])
        self._raw = self._raw[end:]
        super()._receive(data)

    async def reset_code(self, sid: int, timeout: float = 10) -> int:
        """The code of the server's first RST_STREAM on `sid`."""
        async def wait() -> int:
            while True:
                codes = [int.from_bytes(p[:4], "big") for t, s, p in self.frames
                         if t == RST_STREAM and s == sid]
                if codes or self.closed.is_set():
                    assert codes, f"no RST_STREAM on stream {sid}: {self.frames}"
                    return codes[0]
                await asyncio.sleep(0.01)
        return await asyncio.wait_for(wait(), timeout)


def _request_block(client: H2Client, **extra: str) -> bytes:
    """A request's header block from the client's own HPACK context (the server must
    decode it to stay in step)."""
    return client.conn.encoder.encode(client.request_headers(**extra))


async def _self_dependent_priority(client: _TappedClient) -> int:
    fwd = await client.forward(ECHO_PORT)
    await fwd.write(b"x")
    client.write_raw(PriorityFrame(fwd.data_id, depends_on=fwd.data_id).serialize())
    return fwd.data_id


async def _self_dependent_priority_once_closed(client: _TappedClient) -> int:
    fwd = await client.forward(ECHO_PORT)
    await fwd.write(b"x", end_stream=True)
    await fwd.read_all()
    await fwd.error_text()
    client.write_raw(PriorityFrame(fwd.data_id, depends_on=fwd.data_id).serialize())
    return fwd.data_id


async def _self_dependent_headers(client: _TappedClient) -> int:
    sid = client.conn.get_next_available_stream_id()
    frame = HeadersFrame(sid, _request_block(client, streamtype="error", port=str(ECHO_PORT),
                                             requestid="selfdep"),
                         flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=sid,
                         stream_weight=15)
    client.write_raw(frame.serialize())
    client.conn.highest_outbound_stream_id = sid  # the client's h2 opens the next one
    return sid


async def _body_length(client: _TappedClient, declared: int, body: bytes) -> int:
    error_id = client.open_stream(client.request_headers(
        streamtype="error", port=str(ECHO_PORT), requestid="cl"), end_stream=True)
    data_id = client.open_stream(client.request_headers(
        streamtype="data", port=str(ECHO_PORT), requestid="cl",
        **{"content-length": str(declared)}))
    for sid in (error_id, data_id):
        await asyncio.wait_for(client.streams[sid].responded.wait(), 10)
    await client.send(data_id, body, end_stream=len(body) < declared)
    return data_id


async def _second_headers(client: _TappedClient) -> int:
    fwd = await client.forward(ECHO_PORT)
    await fwd.write(b"x")
    block = client.conn.encoder.encode([("x-second", "1")])
    client.write_raw(HeadersFrame(fwd.data_id, block, flags=["END_HEADERS"]).serialize())
    return fwd.data_id


@pytest.mark.parametrize(("misbehave", "reason"), [
    (_self_dependent_priority, "depends on itself"),  # RFC 9113 5.3.1
    (_self_dependent_priority_once_closed, "depends on itself"),  # a RST_STREAM alone
    (_self_dependent_headers, "depends on itself"),  # 5.3.1, with the stream it opens
    (lambda c: _body_length(c, 2, b"hello"), "content-length"),  # 8.1.1: DATA past it
    (lambda c: _body_length(c, 5, b"hi"), "content-length"),  # 8.1.1: END_STREAM short
    (_second_headers, "second HEADERS"),  # 8.1: HEADERS after the headers, not trailers
], ids=["priority", "priority-closed", "headers-priority", "content-length-over",
        "content-length-short", "second-headers"])
def test_a_stream_error_resets_that_stream_alone(crishim, misbehave, reason):
    """What RFC 9113 makes a stream error is RST_STREAM PROTOCOL_ERROR on that stream
    alone (it was GOAWAY): the session's other forwards go on, and it opens new ones; the
    reason is logged, without a traceback."""
    async def go():
        url = crishim.port_forward_url(SANDBOX)
        client = await _TappedClient.connect(url, "prior")
        keep = await client.forward(ECHO_PORT)
        await keep.write(b"before ")
        sid = await misbehave(client)
        assert await client.reset_code(sid) == PROTOCOL_ERROR
        await keep.write(b"after", end_stream=True)
        assert await keep.read_all() == b"before after"
        assert await _echo(client, b"next") == b"next"  # HPACK still in step
        assert client.terminated is None and not client.closed.is_set()
        assert not [f for f in client.frames if f[0] == GOAWAY]
        await client.close()
    run(go())
    log = crishim.log()
    assert any("reset PROTOCOL_ERROR: " in line and reason in line
               for line in log.splitlines()), log[-3000:]
    assert "Traceback" not in log and "unexpected error" not in log


def test_garbage_after_preface_gets_goaway(crishim):
    async def go():
        u = urlsplit(crishim.port_forward_url(SANDBOX))
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        # a SETTINGS frame whose length is not a multiple of 6: FRAME_SIZE_ERROR
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00"
                     + b"12345")
        data = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            data += chunk
        writer.close()
        frames = _frames(data)
        goaways = [payload for ftype, _, payload in frames if ftype == 7]
        assert goaways, frames
        assert int.from_bytes(goaways[-1][4:8], "big") == 6  # FRAME_SIZE_ERROR
    run(go())


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def test_bad_token_on_first_stream_is_404_and_closes(h2_server):
    proc, mode = h2_server
    base = proc.port_forward_url(SANDBOX).rsplit("/", 1)[0]

    async def go():
        if mode == "upgrade":  # the upgrade request itself carries the token
            with pytest.raises(UpgradeRefused) as e:
                await H2Client.connect(base + "/AAAAAAAAAAAAAAAAAAAAAA", mode)
            assert e.value.head.startswith("HTTP/1.1 404")
            return
        client = await H2Client.connect(base + "/AAAAAAAAAAAAAAAAAAAAAA", mode)
        sid = client.open_stream(client.request_headers(streamtype="error", port="9000",
                                                        requestid="1"), end_stream=True)
        await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
        assert client.streams[sid].status == 404
        assert b"token" in client.streams[sid].body()
        await asyncio.wait_for(client.closed.wait(), 10)
        await client.close()
    run(go())


def test_h2c_upgrade_without_http2_settings_is_400(crishim):
    u = urlsplit(crishim.port_forward_url(SANDBOX))
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {u.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                  f"Upgrade: h2c\r\n\r\n".encode())
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"HTTP2-Settings" in head


def test_token_holds_for_its_connection_only(crishim):
    async def go():
        url = crishim.port_forward_url(SANDBOX)
        first = await H2Client.connect(url, "prior")
        assert await _echo(first, b"one") == b"one"
        second = await H2Client.connect(url, "prior")  # same token, another connection
        sid = second.open_stream(second.request_headers(streamtype="error", port="9000",
                                                        requestid="1"), end_stream=True)
        await asyncio.wait_for(second.streams[sid].ended.wait(), 10)
        assert second.streams[sid].status == 404
        other = crishim.port_forward_url(SANDBOX).rsplit("/", 1)[1]
        sid = first.open_stream([(":method", "POST"), (":scheme", "http"),
                                 (":authority", "x"), (":path", f"/portforward/{other}"),
                                 ("streamtype", "data"), ("port", "9000")])
        await asyncio.wait_for(first.streams[sid].ended.wait(), 10)
        assert first.streams[sid].status == 404
        assert await _echo(first, b"two") == b"two"
        await first.close()
        await second.close()
    run(go())


def test_bad_stream_headers_refused_and_session_lives(crishim):
    async def go():
        client = await _client(crishim, "prior")
        for extra in ({"streamtype": "data", "port": "0"},
                      {"streamtype": "data", "port": "http"},
                      {"streamtype": "bogus", "port": "9000"},
                      {"port": "9000"}):
            sid = client.open_stream(client.request_headers(**extra))
            await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
            assert client.streams[sid].status == 400, extra
        # a requestid as long as the 16 KiB header list allows: SPDY's bound holds here
        # too (it was held whole per pending pair, 4,000 pairs took 60 MiB)
        sid = client.open_stream(client.request_headers(streamtype="error", port="9000",
                                                        requestid="7" * 15000))
        await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
        assert client.streams[sid].status == 400
        assert b"a requestid of 15000 characters (at most 128)" in client.streams[sid].body()
        fwd = await client.forward(ECHO_PORT, request_id="dup")
        sid = client.open_stream(client.request_headers(streamtype="data", port="9000",
                                                        requestid="dup"))
        await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
        assert client.streams[sid].status == 400
        assert b"second data stream" in client.streams[sid].body()
        await fwd.write(b"dup ok", end_stream=True)
        assert await fwd.read_all() == b"dup ok"
        await client.close()
    run(go())


def test_unpaired_data_stream_times_out_alone(crishim):
    async def go():
        client = await _client(crishim, "prior")
        lonely = client.open_stream(client.request_headers(streamtype="data", port="9000",
                                                           requestid="lonely"))
        assert await _echo(client, b"meanwhile") == b"meanwhile"
        await asyncio.wait_for(client.streams[lonely].ended.wait(), 15)
        assert client.streams[lonely].reset_code == CANCEL
        await client.close()
    run(go())


def test_data_held_until_its_pair_completes_survives_the_reads_after_it(crishim):
    """crishim serve decodes HTTP/2 from its read buffer without copying (DATA payloads
    are views of it, written to the pod before the next read): data it must keep past
    its read (a data stream whose error stream has not come yet, or frames that came
    while the first stream's token was being redeemed) is copied out. Here later reads,
    64 KiB of another connection's data each, refill that buffer before the pair
    completes; the pod echoes the held bytes as they were sent."""
    async def go():
        client = await _client(crishim, "prior")
        assert await _echo(client, b"warm") == b"warm"  # admitted: the session reads on
        request_id = "held-data"
        data_id = client.open_stream(client.request_headers(
            streamtype="data", port=str(ECHO_PORT), requestid=request_id))
        held = os.urandom(48 << 10)
        await client.send(data_id, held)
        other = await client.forward(SINK_PORT)
        for _ in range(4):
            await asyncio.sleep(0.05)
            await other.write(os.urandom(64 << 10))
        error_id = client.open_stream(client.request_headers(
            streamtype="error", port=str(ECHO_PORT), requestid=request_id), end_stream=True)
        fwd = Forward(client, data_id, error_id)
        await fwd.close_write()
        assert await fwd.read_all() == held
        assert await fwd.error_text() == ""
        await client.close()

    async def first_stream_queued():
        # the first stream's data, sent with its headers, waits for the token's redemption
        client = await _client(crishim, "prior")
        payload = os.urandom(32 << 10)
        error_id = client.open_stream(client.request_headers(
            streamtype="error", port=str(ECHO_PORT), requestid="first"), end_stream=True)
        data_id = client.open_stream(client.request_headers(
            streamtype="data", port=str(ECHO_PORT), requestid="first"))
        await client.send(data_id, payload, end_stream=True)
        fwd = Forward(client, data_id, error_id)
        assert await fwd.read_all() == payload
        await client.close()

    run(go())
    run(first_stream_queued())


def _rss_mib(pid: int) -> float:
    return status_mib(pid)


def test_tiny_frames_held_for_an_unpaired_data_stream_cost_a_byte_each(podnet):
    """DATA on a data stream whose error stream has not come yet is held, bounded by the
    stream's window in payload bytes: sent as 1-byte frames, it is still held as bytes
    (it was an event and a bytes object per frame, ~180 bytes of server memory per byte),
    and once the pair completes the pod gets it all, in order."""
    count = 400_000
    payload = bytes(i % 251 for i in range(count))

    async def go(proc: CrishimProcess) -> None:
        client = await _client(proc, "prior")
        assert await _echo(client, b"warm") == b"warm"  # admitted: the session reads on
        data_id = client.open_stream(client.request_headers(
            streamtype="data", port=str(ECHO_PORT), requestid="tiny"))
        header = struct.Struct(">HBBBL")
        client.write_raw(b"".join(header.pack(0, 1, 0x0, 0, data_id) + payload[i:i + 1]
                                  for i in range(count)))
        before = _rss_mib(proc.proc.pid)
        # served in order on one connection: once this echo is back, every frame was read
        assert await _echo(client, b"after the frames") == b"after the frames"
        grown = _rss_mib(proc.proc.pid) - before
        assert grown < 16, f"{count} held bytes grew the server by {grown:.0f} MiB"
        error_id = client.open_stream(client.request_headers(
            streamtype="error", port=str(ECHO_PORT), requestid="tiny"), end_stream=True)
        fwd = Forward(client, data_id, error_id)
        await fwd.close_write()
        assert await fwd.read_all() == payload
        assert await fwd.error_text() == ""
        assert await _echo(client, b"still serving") == b"still serving"
        await client.close()

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}") as proc:
        run(go(proc))
        assert "Traceback" not in proc.log()


# --- flow control -------------------------------------------------------------------------
STALL_PORT = 9170  # accepts and never reads


class _NeverReads(asyncio.Protocol):
    held: list = []  # a paused transport has no other reference: GC would close it (RST)

    def connection_made(self, transport):
        self.held.append(transport)
        transport.pause_reading()


@pytest.fixture(scope="module")
def stall_port(podnet):
    podnet.listen_extra("127.0.0.1", STALL_PORT, _NeverReads)
    return STALL_PORT


def test_pod_that_never_reads_stalls_only_its_own_stream(crishim, stall_port):
    async def go():
        client = await _client(crishim, "prior")
        stalled = await client.forward(stall_port)
        writer = asyncio.get_running_loop().create_task(stalled.write(bytes(96 * MiB)))
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while client.conn.local_flow_control_window(stalled.data_id) > 0 \
                and loop.time() < end and not writer.done():
            await asyncio.sleep(0.05)
        # the server withheld this stream's window: the client cannot send more on it ...
        assert client.conn.local_flow_control_window(stalled.data_id) == 0
        assert not writer.done()
        # ... while the connection's window is open and other streams flow
        assert client.conn.outbound_flow_control_window > 0
        for i in range(3):
            assert await _echo(client, b"beside a stall %d" % i) == b"beside a stall %d" % i
        writer.cancel()
        stalled.reset()
        assert await stalled.error_text() == ""
        assert await _echo(client, b"after the stall") == b"after the stall"
        await client.close()
    run(go())


def test_server_respects_the_clients_window(crishim):
    size = 48 * MiB

    async def go():
        client = await _client(crishim, "prior")
        fwd = await client.forward(SOURCE_PORT)
        client.hold_acks.add(fwd.data_id)
        await fwd.write(b"%d\n" % size)
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while fwd.data.received < WINDOW and loop.time() < end:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # a server ignoring the window would send more meanwhile
        assert fwd.data.received == WINDOW
        assert await _echo(client, b"meanwhile") == b"meanwhile"
        client.release_acks(fwd.data_id)
        got = await fwd.read_all()
        assert len(got) == size
        assert hashlib.sha256(got).digest() == hashlib.sha256(source_bytes(size)).digest()
        await fwd.close_write()
        assert await fwd.error_text() == ""
        await client.close()
    run(go())


def test_smaller_stream_windows_at_admission_give_back_what_was_taken_before(podnet):
    """With buffer_budget spent, crishim lowers its stream windows at admission, after
    the SETTINGS it opened the connection with. A client that sent on those first,
    larger windows is past the new ones when it applies them, and h2 gives a stream
    window back only as bytes are acknowledged: acknowledged already, they never were,
    and the upload waited for good. They are given back at the client's SETTINGS ack."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--buffer-budget", "1")
    first = 60 * 1024  # within the connection's 64 KiB, past a 16 KiB stream window
    payload = os.urandom(MiB)

    async def go():
        client = await H2Client.connect(proc.port_forward_url(SANDBOX), reading=False)
        client._receive(await client.reader.read(65536))  # the server's first SETTINGS
        assert client.conn.remote_settings.initial_window_size > first
        error_id = client.open_stream(client.request_headers(
            streamtype="error", port=str(SINK_PORT), requestid="1"), end_stream=True)
        data_id = client.open_stream(client.request_headers(
            streamtype="data", port=str(SINK_PORT), requestid="1"))
        client.conn.send_data(data_id, payload[:first])
        client.flush()
        await asyncio.sleep(1)  # admitted, the pod dialled and the 60 KiB acknowledged
        client.start_reading()  # the smaller windows: this stream is past its own
        fwd = Forward(client, data_id, error_id)
        await asyncio.wait_for(fwd.write(payload[first:], end_stream=True), 30)
        assert client.conn.remote_settings.initial_window_size < first
        answer = (await fwd.read_all(30)).decode()
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
        assert await fwd.error_text() == ""
        await client.close()
    with proc:
        run(go())


def test_smaller_stream_windows_wait_for_the_first_settings_to_be_acknowledged(podnet):
    """A client whose acknowledgement of crishim's first SETTINGS (4 MiB stream windows)
    arrives after admission, and which sends on those windows: the smaller windows of a
    connection granted less were applied at that acknowledgement (h2 takes it for the
    oldest change pending), the client's 60 KiB were past them and the connection ended
    with GOAWAY FLOW_CONTROL_ERROR. They are sent once the first SETTINGS is
    acknowledged."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--buffer-budget", "1")
    first = 60 * 1024
    payload = os.urandom(MiB)

    async def go():
        client = await H2Client.connect(proc.port_forward_url(SANDBOX), reading=False)
        client.conn.receive_data(await client.reader.read(65536))  # the first SETTINGS
        held_ack = client.conn.data_to_send()  # not sent yet
        assert held_ack
        error_id = client.open_stream(client.request_headers(
            streamtype="error", port=str(SINK_PORT), requestid="1"), end_stream=True)
        data_id = client.open_stream(client.request_headers(
            streamtype="data", port=str(SINK_PORT), requestid="1"))
        await asyncio.sleep(1)  # admitted meanwhile: the connection got less
        client.write_raw(held_ack)
        client.conn.send_data(data_id, payload[:first])  # within the 4 MiB acknowledged
        client.flush()
        client.start_reading()
        fwd = Forward(client, data_id, error_id)
        await asyncio.wait_for(fwd.write(payload[first:], end_stream=True), 30)
        answer = (await fwd.read_all(30)).decode()
        assert client.terminated is None
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
        assert client.conn.remote_settings.initial_window_size < first  # then lowered
        assert await fwd.error_text() == ""
        await client.close()
    with proc:
        run(go())
        assert "FLOW_CONTROL_ERROR" not in proc.log()


def test_streams_out_of_window_hold_a_small_pod_read_each(podnet):
    """Streams whose client gives back no window: once a stream's window is spent, its
    last pod read waits in the stream's queue, outside every budget. Reads took a whole
    1 MiB buffer, so that ~1 MiB a stream was held (100 streams given 1.5 MiB each and
    then nothing: ~100 MiB); a read is now no larger than the window takes (at least
    MIN_POD_READ, 16 KiB). Given the rest, every byte comes."""
    size, streams, first = 4 * MiB, 100, 3 * MiB // 2
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}")

    async def go():
        client = await H2Client.connect(proc.port_forward_url(SANDBOX), window=0)
        warm = await client.forward(ECHO_PORT)
        client.conn.increment_flow_control_window(4, warm.data_id)
        await warm.write(b"warm", end_stream=True)
        assert await warm.read_all() == b"warm"
        before = status_mib(proc.proc.pid)
        fwds = [await client.forward(SOURCE_PORT) for _ in range(streams)]
        for fwd in fwds:
            client.hold_acks.add(fwd.data_id)
            await fwd.write(b"%d\n" % size)
            client.conn.increment_flow_control_window(first, fwd.data_id)
        client.flush()
        await until(lambda: all(fwd.data.received >= first for fwd in fwds), 60)
        assert all(fwd.data.received == first for fwd in fwds)
        await asyncio.sleep(1)  # the pods' next reads meanwhile
        grown = status_mib(proc.proc.pid) - before
        assert grown < 40, f"{grown:.1f} MiB held for {streams} streams out of window"
        for fwd in fwds:
            client.release_acks(fwd.data_id)  # and every byte from now on
        expected = hashlib.sha256(source_bytes(size)).digest()
        for fwd in fwds:
            got = await fwd.read_all(60)
            assert hashlib.sha256(got).digest() == expected
        await client.close()
    with proc:
        run(go())


def test_a_connection_window_update_lets_the_streams_that_waited_for_it_send(crishim):
    """A stream stopped at the connection's window (its own has room) goes on when the
    connection's window opens, by as much as it opened."""
    size = MiB

    async def go():
        client = await H2Client.connect(crishim.port_forward_url(SANDBOX),
                                        connection_window=65535)
        fwd = await client.forward(SOURCE_PORT)
        client.hold_acks.add(fwd.data_id)  # nothing given back unless asked
        await fwd.write(b"%d\n" % size)
        await until(lambda: fwd.data.received >= 65535, 30)
        await asyncio.sleep(0.3)
        assert fwd.data.received == 65535  # the connection's window, not the stream's
        client.conn.increment_flow_control_window(100_000)  # the connection's only
        client.flush()
        await until(lambda: fwd.data.received >= 165_535, 30)
        await asyncio.sleep(0.3)
        assert fwd.data.received == 165_535
        client.release_acks(fwd.data_id)
        got = await fwd.read_all(60)
        assert hashlib.sha256(got).digest() == hashlib.sha256(source_bytes(size)).digest()
        await client.close()
    run(go())


def test_sigterm_drain_lets_live_streams_finish(podnet):
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--drain-timeout", "3s")

    async def go():
        client = await _client(proc, "prior")
        live = await client.forward(ECHO_PORT)
        await live.write(b"before ")
        assert (await live.read_until(b"before ")).endswith(b"before ")
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        refused = client.open_stream(client.request_headers(streamtype="error", port="9000",
                                                            requestid="late"), end_stream=True)
        await asyncio.wait_for(client.streams[refused].ended.wait(), 10)
        assert client.streams[refused].reset_code == 7  # REFUSED_STREAM
        await live.write(b"during drain", end_stream=True)
        assert await live.read_all() == b"before during drain"
        assert await live.error_text() == ""
        await asyncio.wait_for(client.closed.wait(), 15)  # closed at the drain deadline
        assert client.terminated is not None and client.terminated.error_code == 0
        await client.close()

    with proc:
        run(go())
        assert proc.proc.wait(20) == 0


# --- TLS certificate reload ---------------------------------------------------------------
def _write_pair(d: str, cert: bytes, key: bytes) -> None:
    for name, data in (("tls.crt", cert), ("tls.key", key)):
        tmp = os.path.join(d, name + ".new")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(d, name))


def _peer_cert(host: str, port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            return s.getpeercert(binary_form=True)


def _pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_certificate_reload_keeps_sessions(podnet, tmp_path):
    cert1, key1, _ = self_signed(["127.0.0.1"])
    cert2, key2, _ = self_signed(["127.0.0.1"])
    d = str(tmp_path)
    _write_pair(d, cert1, key1)
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                          "--tls-cert-file", os.path.join(d, "tls.crt"),
                          "--tls-key-file", os.path.join(d, "tls.key"))

    async def go():
        url = proc.port_forward_url(SANDBOX)
        u = urlsplit(url)
        assert url.startswith("https://")
        live = await H2Client.connect(url, "tls")
        live_cert = live.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert live_cert == _pem_to_der(cert1)
        assert await _echo(live, b"before") == b"before"
        _write_pair(d, cert2, key2)
        deadline = time.monotonic() + 20
        seen = _peer_cert(u.hostname, u.port)
        while seen != _pem_to_der(cert2) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            seen = _peer_cert(u.hostname, u.port)
        assert seen == _pem_to_der(cert2), "new handshakes never saw the new certificate"
        assert await _echo(live, b"after reload") == b"after reload"  # same session
        fresh = await H2Client.connect(proc.port_forward_url(SANDBOX), "tls")
        assert fresh.writer.get_extra_info("ssl_object").getpeercert(
            binary_form=True) == _pem_to_der(cert2)
        assert await _echo(fresh, b"new cert") == b"new cert"
        await fresh.close()
        await live.close()

    with proc:
        run(go())
        assert "reloaded certificate" in proc.log()
    shutil.rmtree(proc.dir, ignore_errors=True)


def test_a_header_list_over_the_advertised_16_kib_is_refused_without_a_settings_ack(
        crishim):
    """MAX_HEADER_LIST_SIZE 16 KiB held only once the client acknowledged the server's
    SETTINGS: a client that never does could send 64 KiB lists (hpack's default) on
    every stream of its admitted connection."""
    import h2.config
    import h2.connection

    async def go() -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]]:
        u = urlsplit(crishim.port_forward_url(SANDBOX))
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False))
        conn.initiate_connection()

        def request(sid: int, pad: int) -> None:
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                    (":authority", u.netloc), (":path", u.path),
                                    ("streamtype", "error"), ("port", str(ECHO_PORT)),
                                    ("requestid", str(sid)), ("x-pad", "p" * pad)],
                              end_stream=True)
            writer.write(conn.data_to_send())  # the server's bytes never reach conn: no ACK

        async def frames_until(done) -> list[tuple[int, int, bytes]]:
            data = b""
            while not done(_frames(data)):
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    break
                data += chunk
            return _frames(data)

        request(1, 10)  # admitted: the token is redeemed
        first = await frames_until(lambda fs: any(f[0] == 1 for f in fs))
        request(3, 24 << 10)
        second = await frames_until(lambda fs: any(f[0] == 7 for f in fs))
        writer.close()
        return first, second

    first, second = run(go())
    assert any(ftype == 1 for ftype, _, _ in first), first  # stream 1 answered
    goaways = [payload for ftype, _, payload in second if ftype == 7]
    assert goaways, second
    assert int.from_bytes(goaways[-1][4:8], "big") in (1, 11)  # PROTOCOL_ERROR, CALM
    assert "Traceback" not in crishim.log()


def test_idle_sessions_take_no_window_from_the_buffer_budget(podnet):
    """An HTTP/2 session's receive window grows from 64 KiB as its client fills it, each
    step from the buffer budget: 10 admitted sessions that send nothing take none of a
    16 MiB budget (each took 16 MiB at admission: one spent it, and a channel session
    holding 6 MiB after them was closed 1013), and one that uploads grows its window to
    session_buffer_size, the upload intact."""
    from tests.integration.test_transport_websocket import (
        _PONG,
        _budget_session,
        _hold_unfinished,
    )

    mib = 1 << 20
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                          "--buffer-budget", str(24 * mib),
                          "--session-buffer-size", str(8 * mib))

    async def go():
        idle = []
        for _ in range(10):
            client = await H2Client.connect(proc.port_forward_url(SANDBOX))
            fwd = await client.forward(ECHO_PORT)
            await fwd.write(b"admitted")
            assert await fwd.read_until(b"admitted") == b"admitted"
            idle.append(client)
        granted = [c.conn.outbound_flow_control_window for c in idle]
        assert all(w < 1 * mib for w in granted), granted  # 64 KiB, less what was sent
        channel = await asyncio.to_thread(_budget_session, proc)
        answer = await asyncio.to_thread(_hold_unfinished, channel, 6 * mib)
        assert _PONG in answer and channel.closed is None  # 5 MiB of the budget held
        channel.close()
        uploader = await H2Client.connect(proc.port_forward_url(SANDBOX))
        fwd = await uploader.forward(SINK_PORT)
        payload = os.urandom(32 * mib)
        await asyncio.wait_for(fwd.write(payload, end_stream=True), 60)
        answer = (await fwd.read_all(60)).decode()
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
        # all of it acknowledged but less than half a window (h2 gives a window back by
        # halves): the connection's window grew from 64 KiB towards 8 MiB
        assert uploader.conn.outbound_flow_control_window > 2 * mib
        for client in (*idle, uploader):
            await client.close()
    with proc:
        run(go())
        assert "buffer budget" not in proc.log()


def test_a_timed_out_pair_whose_client_gives_no_window_is_reset(podnet):
    """A client that grants no stream window (INITIAL_WINDOW_SIZE 0) and leaves pairs
    incomplete: each pair's timeout text could never be sent, and its error stream stayed
    open with it for the session's life (8,000 a session, +7 MiB). It is reset CANCEL;
    a client that has the window gets the text, as before."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                          "--stream-creation-timeout", "1s")

    async def lone_error_streams(window: int, n: int) -> list[StreamState]:
        client = await H2Client.connect(proc.port_forward_url(SANDBOX), window=window)
        ids = [client.open_stream(client.request_headers(
            streamtype="error", port=str(ECHO_PORT), requestid=f"lone-{i}"), end_stream=True)
            for i in range(n)]
        client.flush()
        states = [client.streams[sid] for sid in ids]
        await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in states)), 20)
        await client.close()
        return states

    async def go():
        for state in await lone_error_streams(0, 50):
            assert state.reset_code == 8, (state.reset_code, state.body())  # CANCEL
        for state in await lone_error_streams(WINDOW, 5):
            assert state.reset_code is None and b"timed out" in state.body(), state.body()
    with proc:
        run(go())


def test_a_session_closed_within_a_read_gives_back_all_it_took(podnet):
    """A client's DATA past half the window and its GOAWAY in one write: the session ended
    within the read, gave back its grant, and the window growth after it took 64 KiB that
    nothing gave back. 20 such sessions of a 1 MiB budget left new sessions smaller
    stream windows for good."""
    mib = 1 << 20
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                          "--buffer-budget", str(mib), "--session-buffer-size", str(mib))

    async def data_and_goaway() -> None:
        client = await H2Client.connect(proc.port_forward_url(SANDBOX))
        fwd = await client.forward(SINK_PORT)
        sent = 0
        while sent < 40_000:
            room = min(16_000, 40_000 - sent, client.conn.local_flow_control_window(fwd.data_id))
            assert room > 0
            client.conn.send_data(fwd.data_id, b"x" * room)
            sent += room
        client.conn.close_connection()
        client.write_raw(client.conn.data_to_send())  # the DATA and the GOAWAY together
        await asyncio.wait_for(client.closed.wait(), 10)
        await client.close()

    async def stream_window() -> int:
        client = await H2Client.connect(proc.port_forward_url(SANDBOX))
        fwd = await client.forward(ECHO_PORT)
        await fwd.write(b"settled")
        assert await fwd.read_until(b"settled") == b"settled"
        window = client.conn.remote_settings.initial_window_size
        await client.close()
        return window

    async def go():
        assert await stream_window() == mib // 4
        for _ in range(20):
            await data_and_goaway()
        await asyncio.sleep(0.3)
        assert await stream_window() == mib // 4  # the budget is whole again
    with proc:
        run(go())
