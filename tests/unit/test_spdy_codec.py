"""Behaviour of the sans-IO SPDY/3.1 codec, pinned with bytes only.

Frames are built and parsed back here by hand (struct + a reference zlib
context), independently of the codec, so a codec bug cannot hide itself.
"""

from __future__ import annotations

import array
import hashlib
import os
import struct
import zlib

import pytest

from crishim.protocols import spdy
from crishim.protocols.spdy import (
    CANCEL,
    FRAME_TOO_LARGE,
    GOAWAY_INTERNAL_ERROR,
    GOAWAY_PROTOCOL_ERROR,
    INVALID_STREAM,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_ALREADY_CLOSED,
    STREAM_IN_USE,
    UNSUPPORTED_VERSION,
    WINDOW_UPDATE,
    DataReceived,
    FrameIgnored,
    GoAwayReceived,
    HeadersReceived,
    PingAcknowledged,
    PingReceived,
    SessionClosedError,
    SessionTerminated,
    SettingsReceived,
    SpdyConfig,
    SpdyConnection,
    StreamClosedError,
    StreamError,
    StreamOpened,
    StreamReplied,
    StreamReset,
    WindowUpdateReceived,
)
from tests.support import missing

DICTIONARY_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"

# What kubectl v1.27.16 sent over the upgraded connection for two forwarded
# TCP connections ("hello", then "again"): error + data stream each, with
# requestid 0 and 1, FINs, and its pings. Four header blocks, one zlib context.
KUBECTL_CAPTURE = bytes.fromhex(
    "800300010000003d0000000100000000000078f9e3c6a7c202253a703a2b294a4dcc851625aca9a080"
    "8614cb45a024cc6461c0c0c0c0590489c44c50e2663400000000ffff00000001010000008003000100"
    "00001a00000003000000000000826a25a406d56850299508000000ffff000000030000000568656c6c"
    "6f000000030100000080030006000000040000000180030001000000140000000500000000000022df"
    "524300000000ffff000000050100000080030001000000160000000700000000000022c25243ec9602"
    "000000ffff0000000700000005616761696e0000000701000000800300060000000400000003"
)

CONTROL_NAMES = {1: "SYN_STREAM", 2: "SYN_REPLY", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING",
                 7: "GOAWAY", 8: "HEADERS", 9: "WINDOW_UPDATE"}


# --------------------------------------------------------------------------- wire helpers


def control(frame_type: int, payload: bytes = b"", flags: int = 0, version: int = 3,
            length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">HHI", 0x8000 | version, frame_type, (flags << 24) | size) + payload


def data_frame(stream_id: int, payload: bytes = b"", fin: bool = False,
               length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">II", stream_id, ((1 if fin else 0) << 24) | size) + payload


def raw_block(pairs: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    out = struct.pack(">I", len(pairs) if count is None else count)
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


class RefEncoder:
    """A peer's outgoing header context, built on plain zlib."""

    def __init__(self) -> None:
        self.deflater = zlib.compressobj(zdict=spdy.SPDY3_DICTIONARY)

    def compress(self, raw: bytes) -> bytes:
        return self.deflater.compress(raw) + self.deflater.flush(zlib.Z_SYNC_FLUSH)

    def block(self, headers: dict[str, str]) -> bytes:
        return self.compress(raw_block([(k.encode(), v.encode()) for k, v in headers.items()]))

    def syn_stream(self, stream_id: int, headers: dict[str, str], flags: int = 0,
                   associated_id: int = 0, priority: int = 0, raw: bytes | None = None,
                   version: int = 3) -> bytes:
        block = self.compress(raw) if raw is not None else self.block(headers)
        prefix = struct.pack(">IIBB", stream_id, associated_id, priority << 5, 0)
        return control(1, prefix + block, flags, version)

    def syn_reply(self, stream_id: int, headers: dict[str, str], flags: int = 0,
                  raw: bytes | None = None) -> bytes:
        block = self.compress(raw) if raw is not None else self.block(headers)
        return control(2, struct.pack(">I", stream_id) + block, flags)

    def headers(self, stream_id: int, headers: dict[str, str], flags: int = 0) -> bytes:
        return control(8, struct.pack(">I", stream_id) + self.block(headers), flags)


def rst(stream_id: int, status: int) -> bytes:
    return control(3, struct.pack(">II", stream_id, status))


def ping(ping_id: int) -> bytes:
    return control(6, struct.pack(">I", ping_id))


def goaway(last_good: int, status: int = 0) -> bytes:
    return control(7, struct.pack(">II", last_good, status))


def window_update(stream_id: int, delta: int) -> bytes:
    return control(9, struct.pack(">II", stream_id, delta))


class Wire:
    """Parses one direction of a session back into tuples, with its own zlib context."""

    def __init__(self) -> None:
        self.inflater = zlib.decompressobj(zdict=spdy.SPDY3_DICTIONARY)

    def headers(self, block: bytes) -> dict[str, str]:
        raw = self.inflater.decompress(block)
        (count,) = struct.unpack_from(">I", raw, 0)
        pos, out = 4, {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (n,) = struct.unpack_from(">I", raw, pos)
            out[name] = raw[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
        assert pos == len(raw)
        return out

    def parse(self, buf: bytes) -> list[tuple]:
        frames: list[tuple] = []
        pos = 0
        while pos < len(buf):
            word, flags_length = struct.unpack_from(">II", buf, pos)
            flags, length = flags_length >> 24, flags_length & 0xFFFFFF
            body = buf[pos + 8:pos + 8 + length]
            assert len(body) == length, "truncated frame in codec output"
            pos += 8 + length
            if not word & 0x80000000:
                frames.append(("DATA", word, flags, body))
                continue
            assert (word >> 16) & 0x7FFF == 3
            kind = CONTROL_NAMES[word & 0xFFFF]
            if kind == "SYN_STREAM":
                sid, assoc, prio, _slot = struct.unpack_from(">IIBB", body)
                frames.append((kind, sid, assoc, prio >> 5, flags, self.headers(body[10:])))
            elif kind in ("SYN_REPLY", "HEADERS"):
                (sid,) = struct.unpack_from(">I", body)
                frames.append((kind, sid, flags, self.headers(body[4:])))
            elif kind == "SETTINGS":
                (count,) = struct.unpack_from(">I", body)
                entries = {}
                for i in range(count):
                    fid, value = struct.unpack_from(">II", body, 4 + 8 * i)
                    entries[fid & 0xFFFFFF] = value
                frames.append((kind, flags, entries))
            elif kind == "PING":
                frames.append((kind, struct.unpack(">I", body)[0]))
            else:
                assert length == 8
                frames.append((kind, *struct.unpack(">II", body)))
        return frames


def server(**kw: object) -> SpdyConnection:
    return SpdyConnection(SpdyConfig(client=False, **kw))


def client(**kw: object) -> SpdyConnection:
    return SpdyConnection(SpdyConfig(client=True, **kw))


def merge_data(events: list) -> list:
    """Coalesce DataReceived pieces so event lists from different splits compare equal."""
    out: list = []
    for event in events:
        if (isinstance(event, DataReceived) and out and isinstance(out[-1], DataReceived)
                and out[-1].stream_id == event.stream_id and not out[-1].fin):
            out[-1] = DataReceived(event.stream_id, out[-1].data + event.data, event.fin)
        elif isinstance(event, DataReceived) and not event.data and not event.fin:
            continue
        else:
            out.append(event)
    return out


class Peer:
    """A raw-frame peer talking to a codec session under test."""

    def __init__(self, session: SpdyConnection) -> None:
        self.session = session
        self.enc = RefEncoder()
        self.wire = Wire()

    def send(self, frames: bytes) -> list:
        return self.session.receive_data(frames)

    def sent(self) -> list[tuple]:
        return self.wire.parse(self.session.data_to_send())


def pump(a: SpdyConnection, b: SpdyConnection) -> tuple[list, list]:
    """Move bytes both ways until quiet; return events seen by a and by b."""
    ev_a: list = []
    ev_b: list = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return ev_a, ev_b
        ev_b += b.receive_data(to_b)
        ev_a += a.receive_data(to_a)


def assert_terminated(peer: Peer, events: list, reason_part: str,
                      status: int = GOAWAY_PROTOCOL_ERROR) -> None:
    assert isinstance(events[-1], SessionTerminated), events
    assert events[-1].status == status
    assert reason_part in events[-1].reason
    frames = peer.sent()
    assert frames[-1][0] == "GOAWAY" and frames[-1][2] == status
    assert peer.session.terminated
    assert peer.session.receive_data(ping(1) + b"\xff" * 100) == []
    assert peer.session.data_to_send() == b""


def assert_stream_error(peer: Peer, events: list, stream_id: int, status: int,
                        reason_part: str = "") -> None:
    errors = [e for e in events if isinstance(e, StreamError)]
    assert len(errors) == 1, events
    assert errors[0].stream_id == stream_id and errors[0].status == status
    assert reason_part in errors[0].reason
    assert ("RST_STREAM", stream_id, status) in peer.sent()
    assert not peer.session.terminated
    assert not peer.session.is_stream_open(stream_id)


@pytest.fixture
def peer() -> Peer:
    """A server session with a raw client peer."""
    return Peer(server())


# --------------------------------------------------------------------------- dictionary


def test_dictionary_is_the_spdy3_one_byte_for_byte() -> None:
    assert len(spdy.SPDY3_DICTIONARY) == 1423
    assert hashlib.sha256(spdy.SPDY3_DICTIONARY).hexdigest() == DICTIONARY_SHA256
    assert spdy.SPDY3_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.SPDY3_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


def test_dictionary_matches_the_one_inside_kubectl() -> None:
    if not os.path.exists(KUBECTL):
        missing(KUBECTL)
    with open(KUBECTL, "rb") as binary:
        image = binary.read()
    assert spdy.SPDY3_DICTIONARY in image


# --------------------------------------------------------------------------- real client capture


EXPECTED_CAPTURE_EVENTS = [
    StreamOpened(1, 0, {"streamtype": "error", "port": "80", "requestid": "0"}, False, False),
    DataReceived(1, b"", True),
    StreamOpened(3, 0, {"port": "80", "requestid": "0", "streamtype": "data"}, False, False),
    DataReceived(3, b"hello", False),
    DataReceived(3, b"", True),
    PingReceived(1),
    StreamOpened(5, 0, {"streamtype": "error", "port": "80", "requestid": "1"}, False, False),
    DataReceived(5, b"", True),
    StreamOpened(7, 0, {"port": "80", "requestid": "1", "streamtype": "data"}, False, False),
    DataReceived(7, b"again", False),
    DataReceived(7, b"", True),
    PingReceived(3),
]


def test_kubectl_capture_decodes_with_one_shared_context() -> None:
    session = server()
    assert session.receive_data(KUBECTL_CAPTURE) == EXPECTED_CAPTURE_EVENTS
    assert Wire().parse(session.data_to_send()) == [("PING", 1), ("PING", 3)]


def test_kubectl_capture_fed_byte_by_byte_gives_the_same_events() -> None:
    session = server()
    events: list = []
    for i in range(len(KUBECTL_CAPTURE)):
        events += session.receive_data(KUBECTL_CAPTURE[i:i + 1])
        assert session.buffered_input <= 8 + 0x3D
    assert merge_data(events) == merge_data(EXPECTED_CAPTURE_EVENTS)


def test_kubectl_capture_split_everywhere_in_two() -> None:
    for cut in range(len(KUBECTL_CAPTURE) + 1):
        session = server()
        events = session.receive_data(KUBECTL_CAPTURE[:cut])
        events += session.receive_data(KUBECTL_CAPTURE[cut:])
        assert merge_data(events) == merge_data(EXPECTED_CAPTURE_EVENTS), cut


def test_port_forward_exchange_with_kubectl_capture() -> None:
    session = server()
    wire = Wire()
    for event in session.receive_data(KUBECTL_CAPTURE):
        if isinstance(event, StreamOpened):
            session.reply(event.stream_id, {})
            if event.headers["streamtype"] == "data":
                session.send_data(event.stream_id, b"world", fin=True)
    frames = wire.parse(session.data_to_send())
    assert frames == [
        ("PING", 1),  # echoes are queued while the input is parsed, before any reply
        ("PING", 3),
        ("SYN_REPLY", 1, 0, {}),
        ("SYN_REPLY", 3, 0, {}),
        ("DATA", 3, 1, b"world"),
        ("SYN_REPLY", 5, 0, {}),
        ("SYN_REPLY", 7, 0, {}),
        ("DATA", 7, 1, b"world"),
    ]
    # Data streams: both sides sent FIN, so they are forgotten; error streams
    # are half-closed by the client and still open for the server to write.
    assert sorted(i for i in (1, 3, 5, 7) if session.is_stream_open(i)) == [1, 5]
    session.end_stream(1)
    session.end_stream(5)
    assert session.open_stream_count == 0


# --------------------------------------------------------------------------- round trips


def test_stream_ids_follow_the_role_parity() -> None:
    c, s = client(), server()
    assert [c.open_stream({"a": "b"}) for _ in range(3)] == [1, 3, 5]
    assert [s.open_stream({"a": "b"}) for _ in range(3)] == [2, 4, 6]


def test_syn_stream_and_reply_round_trip() -> None:
    c, s = client(), server()
    sid = c.open_stream({"StreamType": "data", "port": "8080"}, priority=3)
    _, ev_s = pump(c, s)
    assert ev_s == [StreamOpened(sid, 0, {"streamtype": "data", "port": "8080"}, False,
                                 False, 3)]
    s.reply(sid, {"status": "ok"})
    ev_c, _ = pump(c, s)
    assert ev_c == [StreamReplied(sid, {"status": "ok"}, False)]


def test_syn_stream_flags_round_trip() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "1"}, fin=True, associated_id=7)
    _, ev_s = pump(c, s)
    assert ev_s == [StreamOpened(sid, 7, {"a": "1"}, True, False, 0)]
    assert not c.can_send(sid)
    assert s.can_send(sid)


def test_server_push_unidirectional_stream() -> None:
    c = client()
    push = Peer(c)
    frame = push.enc.syn_stream(2, {"x": "y"}, flags=spdy.FLAG_UNIDIRECTIONAL,
                                associated_id=1)
    assert c.receive_data(frame) == [StreamOpened(2, 1, {"x": "y"}, False, True)]
    with pytest.raises(StreamClosedError):
        c.send_data(2, b"nope")
    assert c.receive_data(data_frame(2, b"pushed", fin=True)) == [
        DataReceived(2, b"pushed", True)]
    assert c.open_stream_count == 0


def test_data_round_trip_both_directions_with_fin() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    s.reply(sid)
    c.send_data(sid, b"ping")
    s.send_data(sid, b"pong", fin=True)
    ev_c, ev_s = pump(c, s)
    assert ev_s == [DataReceived(sid, b"ping", False)]
    assert ev_c == [StreamReplied(sid, {}, False), DataReceived(sid, b"pong", True)]
    c.end_stream(sid)
    _, ev_s = pump(c, s)
    assert ev_s == [DataReceived(sid, b"", True)]
    assert c.open_stream_count == 0 and s.open_stream_count == 0


def test_headers_frame_round_trip() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    c.send_headers(sid, {"trailer": "x"}, fin=True)
    _, ev_s = pump(c, s)
    assert ev_s == [HeadersReceived(sid, {"trailer": "x"}, True)]
    assert not c.can_send(sid)


def test_rst_stream_round_trip() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    s.reset_stream(sid, REFUSED_STREAM)
    ev_c, _ = pump(c, s)
    assert ev_c == [StreamReset(sid, REFUSED_STREAM)]
    assert c.open_stream_count == 0 and s.open_stream_count == 0


def test_settings_round_trip() -> None:
    c, s = client(), server()
    s.send_settings({spdy.SETTINGS_MAX_CONCURRENT_STREAMS: 100,
                     spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    ev_c, _ = pump(c, s)
    assert ev_c == [SettingsReceived({4: 100, 7: 1 << 20})]
    assert c.peer_settings == {4: 100, 7: 1 << 20}


def test_window_update_round_trip() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    s.send_window_update(sid, 65536)
    s.send_window_update(0, 1000)
    ev_c, _ = pump(c, s)
    assert ev_c == [WindowUpdateReceived(sid, 65536), WindowUpdateReceived(0, 1000)]
    with pytest.raises(ValueError):
        s.send_window_update(sid, 0)


def test_goaway_round_trip_and_refusal_of_new_streams() -> None:
    c, s = client(), server()
    first = c.open_stream({"a": "b"})
    pump(c, s)
    s.goaway()
    s.goaway()  # sent once only
    late = c.open_stream({"a": "c"})  # crosses the GOAWAY on the wire
    ev_c, ev_s = pump(c, s)
    assert ev_c[0] == GoAwayReceived(first, spdy.GOAWAY_OK)
    assert ev_s == [StreamError(late, REFUSED_STREAM, "the session is going away")]
    assert ev_c[1] == StreamReset(late, REFUSED_STREAM)
    with pytest.raises(SessionClosedError):
        c.open_stream({"a": "d"})
    # The stream accepted before GOAWAY still works.
    c.send_data(first, b"still here")
    _, ev_s = pump(c, s)
    assert ev_s == [DataReceived(first, b"still here", False)]


def test_ping_round_trip() -> None:
    c, s = client(), server()
    assert s.ping() == 2
    assert s.ping() == 4
    ev_c, ev_s = pump(c, s)
    assert ev_c == [PingReceived(2), PingReceived(4)]
    assert ev_s == [PingAcknowledged(2), PingAcknowledged(4)]
    assert c.ping() == 1
    ev_c, ev_s = pump(c, s)
    assert ev_s == [PingReceived(1)] and ev_c == [PingAcknowledged(1)]


# --------------------------------------------------------------------------- headers


def test_header_compression_shares_one_context_across_many_blocks() -> None:
    c = client()
    headers = {"streamtype": "data", "port": "8080", "requestid": "0"}
    wire = Wire()
    sizes = []
    for i in range(200):
        headers["requestid"] = str(i)
        c.open_stream(headers)
        out = c.data_to_send()
        sizes.append(len(out))
        frame = wire.parse(out)[0]
        assert frame[0] == "SYN_STREAM" and frame[5] == headers
    # Later blocks reuse the history of earlier ones, so they shrink.
    assert max(sizes[10:]) < sizes[0]


def test_server_decodes_many_blocks_from_one_reference_context() -> None:
    peer = Peer(server())
    for i in range(200):
        sid = 2 * i + 1
        events = peer.send(peer.enc.syn_stream(sid, {"requestid": str(i), "port": "80"}))
        assert events == [StreamOpened(sid, 0, {"requestid": str(i), "port": "80"},
                                       False, False)]
        peer.session.reset_stream(sid)


def test_hand_built_block_with_reference_zlib_and_dictionary() -> None:
    raw = raw_block([(b"streamtype", b"error"), (b"port", b"5432"), (b"requestid", b"7")])
    deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                                spdy.SPDY3_DICTIONARY)
    block = deflater.compress(raw) + deflater.flush(zlib.Z_SYNC_FLUSH)
    assert block[:2] == b"\x78\xf9"  # the zlib header with FDICT, like kubectl's
    frame = control(1, struct.pack(">IIBB", 1, 0, 0, 0) + block)
    assert server().receive_data(frame) == [
        StreamOpened(1, 0, {"streamtype": "error", "port": "5432", "requestid": "7"},
                     False, False)]


def test_multiple_values_stay_nul_joined() -> None:
    c, s = client(), server()
    c.open_stream({"X-Stream-Protocol-Version": "v4\x00v3\x00v2"})
    _, ev_s = pump(c, s)
    assert ev_s[0].headers == {"x-stream-protocol-version": "v4\x00v3\x00v2"}


def test_uppercase_names_from_the_peer_are_lowercased() -> None:
    peer = Peer(server())
    frame = peer.enc.syn_stream(1, {}, raw=raw_block([(b"Port", b"80")]))
    assert peer.send(frame)[0].headers == {"port": "80"}


def test_encode_and_decode_headers_helpers() -> None:
    c, s = client(), server()
    block = c.encode_headers({"A": "1"})
    assert s.decode_headers(block) == {"a": "1"}
    with pytest.raises(ValueError):
        c.encode_headers({"": "x"})
    with pytest.raises(ValueError):
        c.encode_headers({"a": "1", "A": "2"})


def test_header_block_unpacker_rejects_each_malformation() -> None:
    unpack = spdy.unpack_header_block
    assert unpack(b"") == {}
    assert unpack(raw_block([(b"a", b"")])) == {"a": ""}
    bad = [
        (b"\x00\x00", "no pair count"),
        (raw_block([], count=0xFFFFFFFF), "does not fit"),
        (raw_block([(b"", b"x")]), "empty name"),
        (struct.pack(">II", 1, 50) + b"abcdefgh", "name length 50 runs past"),
        (struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 99) + b"x", "value length 99"),
        (struct.pack(">II", 1, 1) + b"a" + b"\x00\x00\x00", "inside a value length"),
        (raw_block([(b"abcdefghij", b"1")], count=2) + b"\x00\x00", "inside a name length"),
        (raw_block([(b"a", b"1"), (b"a", b"2")]), "appears twice"),
        (raw_block([(b"a", b"1"), (b"A", b"2")]), "appears twice"),
        (raw_block([(b"a", b"1")]) + b"zz", "2 stray bytes"),
    ]
    for raw, reason in bad:
        with pytest.raises(spdy.HeaderBlockError, match=reason):
            unpack(raw)


# --------------------------------------------------------------------------- streaming data


def test_large_data_frame_is_delivered_in_pieces_without_buffering() -> None:
    peer = Peer(server(max_data_chunk=64 * 1024))
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    payload = os.urandom(1 << 20)
    frame = data_frame(1, payload, fin=True)
    got = bytearray()
    events = []
    for i in range(0, len(frame), 10_000):
        for event in peer.send(frame[i:i + 10_000]):
            assert len(event.data) <= 64 * 1024
            events.append(event)
            got += event.data
        assert peer.session.buffered_input < 8
    assert bytes(got) == payload
    assert [e.fin for e in events].count(True) == 1 and events[-1].fin


def test_max_data_chunk_slices_one_big_read() -> None:
    peer = Peer(server(max_data_chunk=1000))
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    events = peer.send(data_frame(1, b"x" * 2500, fin=True))
    assert [(len(e.data), e.fin) for e in events] == [(1000, False), (1000, False), (500, True)]


def test_empty_data_frames_give_empty_events() -> None:
    """An empty frame is an event: with FIN it ends the stream, without it may dial a pair
    opened ahead (dial: on-data)."""
    peer = Peer(server())
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    assert peer.send(data_frame(1, b"")) == [DataReceived(1, b"", False)]
    assert peer.send(data_frame(1, b"", fin=True)) == [DataReceived(1, b"", True)]


def test_send_data_splits_into_bounded_frames_with_fin_on_the_last() -> None:
    c = client(max_send_frame=1000)
    sid = c.open_stream({"a": "b"})
    c.data_to_send()
    payload = os.urandom(2500)
    c.send_data(sid, payload, fin=True)
    assert c.bytes_to_send == 2500 + 3 * 8
    frames = Wire().parse(c.data_to_send())
    assert [(f[2], len(f[3])) for f in frames] == [(0, 1000), (0, 1000), (1, 500)]
    assert b"".join(f[3] for f in frames) == payload


def test_send_data_copies_mutable_buffers() -> None:
    c = client()
    sid = c.open_stream({"a": "b"})
    c.data_to_send()
    buf = bytearray(b"original")
    c.send_data(sid, buf)
    c.send_data(sid, memoryview(buf))
    buf[:] = b"mutated!"
    frames = Wire().parse(c.data_to_send())
    assert [f[3] for f in frames] == [b"original", b"original"]


def test_receive_accepts_bytearray_and_memoryview() -> None:
    peer = Peer(server())
    frame = bytearray(peer.enc.syn_stream(1, {"a": "b"}) + data_frame(1, b"xyz"))
    head = frame[:20]
    assert peer.send(head) == []
    head[:] = b"\xff" * 20  # the codec must have copied what it kept
    events = peer.send(memoryview(frame)[20:])
    assert events == [StreamOpened(1, 0, {"a": "b"}, False, False),
                      DataReceived(1, b"xyz", False)]


def test_data_of_a_view_of_bytes_is_shared_and_of_a_reused_buffer_copied() -> None:
    """A view of immutable bytes (the SPDY-over-WebSocket tunnel's big pieces) is shared
    as bytes are: DATA comes out as views of it; a view of a bytearray is not."""
    peer = Peer(server(zero_copy=True))
    wire = peer.enc.syn_stream(1, {"a": "b"}) + data_frame(1, b"z" * 70_000)
    events = peer.send(memoryview(wire))
    data = [e.data for e in events if isinstance(e, DataReceived)]
    assert b"".join(bytes(d) for d in data) == b"z" * 70_000
    assert all(isinstance(d, memoryview) and d.obj is wire for d in data)
    peer = Peer(server(zero_copy=True))
    reused = bytearray(wire)
    events = peer.send(memoryview(reused))
    data = [e.data for e in events if isinstance(e, DataReceived)]
    reused[:] = bytes(len(reused))
    assert b"".join(bytes(d) for d in data) == b"z" * 70_000


# --------------------------------------------------------------------------- local misuse


def test_send_after_own_fin_raises_but_after_reset_is_a_no_op() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    c.end_stream(sid)
    with pytest.raises(StreamClosedError):
        c.send_data(sid, b"late")
    other = c.open_stream({"a": "b"})
    pump(c, s)
    s.reset_stream(other)
    pump(c, s)
    c.send_data(other, b"into the void")
    c.end_stream(other)
    c.reset_stream(other)
    assert c.data_to_send() == b""
    with pytest.raises(StreamClosedError):
        c.send_data(99, b"never opened")


def test_reply_rules() -> None:
    c, s = client(), server()
    sid = c.open_stream({"a": "b"})
    pump(c, s)
    with pytest.raises(ValueError):
        c.reply(sid)
    s.reply(sid, fin=True)
    with pytest.raises(StreamClosedError):
        s.reply(sid)
    s2 = server()
    s2.receive_data(RefEncoder().syn_stream(1, {"a": "b"}))
    s2.reply(1)
    with pytest.raises(ValueError):
        s2.reply(1)
    s2.receive_data(rst(1, CANCEL))
    s2.data_to_send()
    s2.reply(1)  # reset meanwhile: nothing to reply to, and no error
    assert s2.data_to_send() == b""


def test_open_stream_validates_arguments_without_consuming_an_id() -> None:
    c = client()
    with pytest.raises(ValueError):
        c.open_stream({"a": "b"}, priority=8)
    with pytest.raises(ValueError):
        c.open_stream({"": "b"})
    assert c.open_stream({"a": "b"}) == 1


def test_ping_with_the_peers_parity_is_refused() -> None:
    with pytest.raises(ValueError):
        server().ping(3)
    assert server().ping(10) == 10


def test_config_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        SpdyConfig(max_frame_size=1 << 24)
    with pytest.raises(ValueError):
        SpdyConfig(max_concurrent_streams=0)


# --------------------------------------------------------------------------- stream state


def test_both_fins_forget_the_stream() -> None:
    peer = Peer(server())
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    peer.session.reply(1)
    peer.send(data_frame(1, b"", fin=True))
    assert peer.session.is_stream_open(1)
    peer.session.end_stream(1)
    assert peer.session.open_stream_count == 0


def test_data_after_peer_fin_is_stream_already_closed(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    peer.send(data_frame(1, b"last", fin=True))
    events = peer.send(data_frame(1, b"more"))
    assert_stream_error(peer, events, 1, STREAM_ALREADY_CLOSED, "after the peer's FIN")


def test_data_after_both_fins_is_stream_already_closed(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}, flags=spdy.FLAG_FIN))
    peer.session.reply(1, fin=True)
    assert peer.session.open_stream_count == 0
    events = peer.send(data_frame(1, b"zombie"))
    assert_stream_error(peer, events, 1, STREAM_ALREADY_CLOSED)
    # Remembered as reset now: another late frame is dropped without another RST.
    assert peer.send(data_frame(1, b"again")) == []
    assert peer.sent() == []


def test_headers_after_peer_fin_is_stream_already_closed(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}, flags=spdy.FLAG_FIN))
    events = peer.send(peer.enc.headers(1, {"x": "y"}))
    assert_stream_error(peer, events, 1, STREAM_ALREADY_CLOSED)


def test_data_in_flight_after_our_reset_is_dropped_silently(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    peer.session.reset_stream(1, CANCEL)
    assert peer.sent() == [("RST_STREAM", 1, CANCEL)]
    assert peer.send(data_frame(1, b"in flight") + data_frame(1, b"", fin=True)) == []
    assert peer.sent() == []


def test_reset_during_a_partial_data_frame_discards_the_rest(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    frame = data_frame(1, b"a" * 100)
    assert peer.send(frame[:58]) == [DataReceived(1, b"a" * 50, False)]
    peer.session.reset_stream(1)
    assert peer.send(frame[58:] + ping(1)) == [PingReceived(1)]


def test_peer_reset_is_reported_and_forgets_the_stream(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    assert peer.send(rst(1, CANCEL)) == [StreamReset(1, CANCEL)]
    assert peer.session.open_stream_count == 0
    peer.session.send_data(1, b"no-op")
    assert peer.sent() == []


def test_reset_for_an_unknown_stream_is_ignored_and_reported_for_the_budget(
        peer: Peer) -> None:
    """Never answered; one for a stream never opened (or no longer remembered) is reported
    as FrameIgnored so the session charges it (34 M a second were free); a late one for a
    stream just closed is not."""
    assert peer.send(rst(9, CANCEL)) == [FrameIgnored(spdy.RST_STREAM)]
    assert peer.sent() == []
    peer.send(peer.enc.syn_stream(11, {"a": "b"}, flags=spdy.FLAG_FIN))
    peer.session.reply(11, fin=True)
    assert peer.session.open_stream_count == 0
    peer.sent()
    assert peer.send(rst(11, CANCEL)) == []  # closed a moment ago: a late reset, free
    assert peer.sent() == []


def test_window_updates_beyond_the_credit_data_earns_are_reported_for_the_budget(
        peer: Peer) -> None:
    """spdystream sends no WINDOW_UPDATE; a client that does returns at most two per DATA
    frame it received. Past an allowance of 16 they are FrameIgnored, to be charged."""
    wu = control(spdy.WINDOW_UPDATE, struct.pack(">II", 0, 1))
    events = peer.send(wu * 16)
    assert events == [WindowUpdateReceived(0, 1)] * 16
    assert peer.send(wu) == [FrameIgnored(spdy.WINDOW_UPDATE)]
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    peer.session.reply(1)
    peer.session.send_data(1, b"x" * 10)  # one DATA frame: two more
    assert peer.send(wu * 3) == [WindowUpdateReceived(0, 1)] * 2 + \
        [FrameIgnored(spdy.WINDOW_UPDATE)]


def test_closed_stream_memory_is_capped() -> None:
    peer = Peer(server(closed_stream_memory=16))
    for i in range(100):
        sid = 2 * i + 1
        peer.send(peer.enc.syn_stream(sid, {"a": "b"}, flags=spdy.FLAG_FIN))
        peer.session.reply(sid, fin=True)
    assert peer.session.open_stream_count == 0
    assert peer.session.remembered_closed_streams == 16


def test_over_max_concurrent_streams_is_refused_until_one_closes() -> None:
    peer = Peer(server(max_concurrent_streams=2))
    peer.send(peer.enc.syn_stream(1, {"a": "b"}) + peer.enc.syn_stream(3, {"a": "b"}))
    events = peer.send(peer.enc.syn_stream(5, {"a": "b"}))
    assert_stream_error(peer, events, 5, REFUSED_STREAM, "already open")
    peer.send(rst(1, CANCEL))
    assert isinstance(peer.send(peer.enc.syn_stream(7, {"a": "b"}))[0], StreamOpened)


# --------------------------------------------------------------------------- malformed input


def test_truncated_frames_fed_byte_by_byte_wait_for_the_rest(peer: Peer) -> None:
    frames = (peer.enc.syn_stream(1, {"a": "b"}) + ping(1) + window_update(1, 5)
              + data_frame(1, b"xy", fin=True) + goaway(0))
    events = []
    for i in range(len(frames)):
        events += peer.send(frames[i:i + 1])
        assert not peer.session.terminated
    assert merge_data(events) == [StreamOpened(1, 0, {"a": "b"}, False, False),
                                  PingReceived(1), WindowUpdateReceived(1, 5),
                                  DataReceived(1, b"xy", True), GoAwayReceived(0, 0)]
    assert len([e for e in events if isinstance(e, DataReceived)]) == 2


def test_unsupported_version_on_control_frame_ends_the_session(peer: Peer) -> None:
    events = peer.send(control(6, struct.pack(">I", 1), version=2))
    assert_terminated(peer, events, "SPDY/2")


def test_unsupported_version_on_syn_stream_resets_that_stream(peer: Peer) -> None:
    events = peer.send(control(1, struct.pack(">IIBB", 1, 0, 0, 0) + b"junk", version=2))
    assert_stream_error(peer, events, 1, UNSUPPORTED_VERSION, "SPDY/2")


def test_control_frame_longer_than_the_limit_ends_the_session() -> None:
    peer = Peer(server(max_header_block=1024, max_frame_size=4096))
    events = peer.send(control(1, length=5000))
    assert_terminated(peer, events, "exceeds")


def test_data_frame_longer_than_max_frame_size_resets_the_stream() -> None:
    peer = Peer(server(max_frame_size=1000))
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    events = peer.send(data_frame(1, b"z" * 1500) + ping(1))
    assert events[-1] == PingReceived(1)
    assert_stream_error(peer, events, 1, FRAME_TOO_LARGE)


def test_syn_stream_with_stream_id_zero_ends_the_session(peer: Peer) -> None:
    events = peer.send(peer.enc.syn_stream(0, {"a": "b"}))
    assert_terminated(peer, events, "stream id 0")


def test_even_stream_id_from_the_client_is_refused(peer: Peer) -> None:
    events = peer.send(peer.enc.syn_stream(2, {"a": "b"}))
    assert_stream_error(peer, events, 2, PROTOCOL_ERROR, "parity")
    # The header context stayed in step: the next stream decodes.
    assert peer.send(peer.enc.syn_stream(3, {"c": "d"}))[0].headers == {"c": "d"}


def test_decreasing_stream_id_is_refused(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(5, {"a": "b"}))
    events = peer.send(peer.enc.syn_stream(3, {"a": "b"}))
    assert_stream_error(peer, events, 3, PROTOCOL_ERROR, "does not increase")
    assert peer.session.is_stream_open(5)


def test_duplicate_stream_id_resets_the_stream(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    events = peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    assert_stream_error(peer, events, 1, PROTOCOL_ERROR, "second SYN_STREAM")


def test_garbage_header_block_ends_the_session(peer: Peer) -> None:
    frame = control(1, struct.pack(">IIBB", 1, 0, 0, 0) + b"\x00garbage, not zlib")
    assert_terminated(peer, peer.send(frame), "does not inflate")


def test_zlib_bomb_beyond_max_header_block_ends_the_session() -> None:
    peer = Peer(server(max_header_block=64 * 1024))
    raw = raw_block([(b"bomb", b"A" * (50 * 1024 * 1024))])
    frame = peer.enc.syn_stream(1, {}, raw=raw)
    assert len(frame) < 128 * 1024  # 50 MiB inflated from a small frame
    assert_terminated(peer, peer.send(frame), "inflates beyond 65536 bytes")


def test_header_block_just_under_the_limit_is_accepted() -> None:
    peer = Peer(server(max_header_block=64 * 1024))
    raw = raw_block([(b"big", b"A" * (64 * 1024 - 15))])
    assert len(raw) == 64 * 1024
    events = peer.send(peer.enc.syn_stream(1, {}, raw=raw))
    assert isinstance(events[0], StreamOpened) and len(events[0].headers["big"]) == 65521


def test_zlib_stream_finished_by_the_peer_ends_the_session(peer: Peer) -> None:
    deflater = zlib.compressobj(zdict=spdy.SPDY3_DICTIONARY)
    block = deflater.compress(raw_block([(b"a", b"b")])) + deflater.flush()
    frame = control(1, struct.pack(">IIBB", 1, 0, 0, 0) + block)
    assert_terminated(peer, peer.send(frame), "ends the session's zlib stream")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (raw_block([], count=0xFFFFFFFF), "does not fit"),
        (raw_block([], count=0x80000000), "does not fit"),
        (struct.pack(">II", 1, 0xFFFFFFF0) + b"abcd", "runs past"),
        (struct.pack(">II", 1, 1) + b"a" + struct.pack(">I", 1000) + b"xyz", "runs past"),
        (raw_block([(b"", b"v")]), "empty name"),
        (raw_block([(b"a", b"1"), (b"a", b"2")]), "twice"),
        (raw_block([(b"a", b"1")]) + b"\x00", "stray"),
        (b"\x00\x01", "no pair count"),
    ],
)
def test_malformed_header_block_resets_only_its_stream(peer: Peer, raw: bytes,
                                                       reason: str) -> None:
    events = peer.send(peer.enc.syn_stream(1, {}, raw=raw))
    assert_stream_error(peer, events, 1, PROTOCOL_ERROR, reason)
    assert peer.send(peer.enc.syn_stream(3, {"ok": "1"}))[0].headers == {"ok": "1"}


def test_data_for_unknown_stream_is_invalid_stream(peer: Peer) -> None:
    events = peer.send(data_frame(7, b"who?") + ping(1))
    assert events[-1] == PingReceived(1)
    assert_stream_error(peer, events, 7, INVALID_STREAM, "not open")


def test_data_on_stream_zero_ends_the_session(peer: Peer) -> None:
    assert_terminated(peer, peer.send(data_frame(0, b"x")), "stream 0")


def test_window_update_with_zero_delta_on_a_stream_resets_it(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    events = peer.send(window_update(1, 0))
    assert_stream_error(peer, events, 1, PROTOCOL_ERROR, "delta 0")


def test_window_update_with_zero_delta_on_the_session_ends_it(peer: Peer) -> None:
    assert_terminated(peer, peer.send(window_update(0, 0)), "delta 0")


def test_window_update_for_unknown_stream_is_ignored(peer: Peer) -> None:
    assert peer.send(window_update(5, 100)) == [FrameIgnored(WINDOW_UPDATE)]  # counted
    assert peer.sent() == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (control(1, b"\x00" * 9), "shorter than 10"),
        (control(2, b"\x00" * 3), "shorter than 4"),
        (control(8, b""), "shorter than 4"),
        (control(3, b"\x00" * 4), "instead of 8"),
        (control(3, struct.pack(">II", 0, 1)), "stream 0"),
        (control(6, b"\x00" * 8), "instead of 4"),
        (control(7, b"\x00" * 4), "instead of 8"),
        (control(9, b"\x00" * 12), "instead of 8"),
        (control(4, struct.pack(">I", 2) + b"\x00" * 8), "announces 2 entries"),
        (control(4, struct.pack(">I", 0xFFFFFFFF)), "announces"),
        (control(4, b"\x00"), "no count"),
    ],
)
def test_malformed_control_frame_ends_the_session(peer: Peer, frame: bytes,
                                                  reason: str) -> None:
    assert_terminated(peer, peer.send(frame), reason)


def test_unknown_control_frame_types_are_ignored_even_when_large(peer: Peer) -> None:
    noop = control(5, b"")
    credential = control(10, b"c" * 100_000)
    huge = control(0x7777, length=0xFFFFFF)
    events = peer.send(noop + credential + ping(1))
    # ignored, but reported: the session counts them against its control budget
    assert events == [FrameIgnored(5), FrameIgnored(10), PingReceived(1)]
    assert peer.send(huge) == [FrameIgnored(0x7777)]
    for _ in range(0xFFFFFF // 1_000_000):
        assert peer.send(b"\x00" * 1_000_000) == []
        assert peer.session.buffered_input == 0
    assert peer.send(b"\x00" * (0xFFFFFF % 1_000_000) + ping(3)) == [PingReceived(3)]


def test_settings_keep_only_the_ids_spdy_defines() -> None:
    peer = Peer(SpdyConnection(SpdyConfig()))
    entries = [(i, i * 10) for i in range(1, 65)]  # 64, the most one frame may carry
    frame = control(4, struct.pack(">I", len(entries))
                    + b"".join(struct.pack(">II", i, v) for i, v in entries))
    assert peer.send(frame) == [SettingsReceived({i: i * 10 for i in range(1, 9)})]
    assert peer.session.peer_settings == {i: i * 10 for i in range(1, 9)}


def test_a_receive_stops_at_its_share_of_frames_and_goes_on_when_called_again() -> None:
    peer = Peer(SpdyConnection(SpdyConfig(max_frames_per_receive=3)))
    events = peer.send(b"".join(ping(2 * i + 1) for i in range(8)))
    assert events == [PingReceived(1), PingReceived(3), PingReceived(5)]
    assert peer.session.backlogged
    assert peer.send(b"") == [PingReceived(7), PingReceived(9), PingReceived(11)]
    # new input queues behind the backlog, in order, and a partial frame stays held
    assert peer.send(ping(17)[:5]) == [PingReceived(13), PingReceived(15)]
    assert not peer.session.backlogged
    assert peer.send(ping(17)[5:]) == [PingReceived(17)]


def test_a_receive_stops_once_header_blocks_inflated_past_its_share() -> None:
    peer = Peer(SpdyConnection(SpdyConfig(max_inflated_per_receive=1000)))
    big = {"x-pad": "p" * 2000}
    blocks = b"".join(peer.enc.syn_stream(2 * i + 1, big) for i in range(5))
    events = peer.send(blocks)
    assert [type(e) for e in events] == [StreamOpened]  # 2,000 bytes: over its share
    assert peer.session.backlogged
    ids = [e.stream_id for e in events]
    while peer.session.backlogged:
        ids += [e.stream_id for e in peer.send(b"")]
    assert ids == [1, 3, 5, 7, 9]


def test_syn_reply_rules(peer: Peer) -> None:
    c = Peer(client())
    sid = c.session.open_stream({"a": "b"})
    c.session.data_to_send()
    assert c.send(c.enc.syn_reply(sid, {})) == [StreamReplied(sid, {}, False)]
    events = c.send(c.enc.syn_reply(sid, {}))
    assert_stream_error(c, events, sid, STREAM_IN_USE, "second SYN_REPLY")
    events = c.send(c.enc.syn_reply(99, {}))
    assert_stream_error(c, events, 99, INVALID_STREAM)
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    events = peer.send(peer.enc.syn_reply(1, {}))
    assert_stream_error(peer, events, 1, PROTOCOL_ERROR, "which the peer opened")


def test_unsolicited_ping_echo_is_ignored(peer: Peer) -> None:
    assert peer.send(ping(8)) == []
    assert peer.sent() == []


def test_input_after_termination_is_ignored(peer: Peer) -> None:
    events = peer.send(data_frame(0, b"") + ping(1))
    assert events == [SessionTerminated(GOAWAY_PROTOCOL_ERROR, "DATA frame on stream 0")]
    assert peer.sent() == [("GOAWAY", 0, GOAWAY_PROTOCOL_ERROR)]
    assert peer.send(ping(3)) == []
    with pytest.raises(SessionClosedError):
        peer.session.open_stream({"a": "b"})
    peer.session.send_data(1, b"no-op")
    assert peer.session.data_to_send() == b""


def test_goaway_after_error_names_the_last_accepted_stream(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}) + peer.enc.syn_stream(3, {"a": "b"}))
    peer.send(data_frame(0, b""))
    assert peer.sent() == [("GOAWAY", 3, GOAWAY_PROTOCOL_ERROR)]


def test_fin_and_unidirectional_stream_is_opened_and_closed_at_once(peer: Peer) -> None:
    flags = spdy.FLAG_FIN | spdy.FLAG_UNIDIRECTIONAL
    events = peer.send(peer.enc.syn_stream(1, {"a": "b"}, flags=flags))
    assert events == [StreamOpened(1, 0, {"a": "b"}, True, True)]
    assert peer.session.open_stream_count == 0
    peer.session.reply(1)
    assert peer.sent() == []


def test_reply_or_headers_for_stream_zero_ends_the_session(peer: Peer) -> None:
    assert_terminated(peer, peer.send(peer.enc.syn_reply(0, {})), "SYN_REPLY with stream id 0")


def test_malformed_block_in_headers_frame_resets_the_stream(peer: Peer) -> None:
    peer.send(peer.enc.syn_stream(1, {"a": "b"}))
    block = peer.enc.compress(raw_block([], count=5))
    events = peer.send(control(8, struct.pack(">I", 1) + block))
    assert_stream_error(peer, events, 1, PROTOCOL_ERROR, "HEADERS header block: pair count 5")


def test_stream_ids_run_out_cleanly() -> None:
    c = client()
    c._next_stream_id = spdy.MAX_STREAM_ID  # as if 2**30 streams had been opened
    assert c.open_stream({"a": "b"}) == spdy.MAX_STREAM_ID
    with pytest.raises(SessionClosedError):
        c.open_stream({"a": "b"})


def test_outstanding_pings_are_capped() -> None:
    s = server(max_outstanding_pings=2)
    assert [s.ping() for _ in range(3)] == [2, 4, 6]
    assert s.receive_data(ping(2) + ping(4) + ping(6)) == [PingAcknowledged(4),
                                                          PingAcknowledged(6)]


def test_a_codec_bug_ends_the_session_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer(server())
    monkeypatch.setattr(peer.session, "_on_ping", lambda *args: 1 // 0)
    events = peer.send(ping(1))
    assert_terminated(peer, events, "internal codec error: ZeroDivisionError",
                      status=GOAWAY_INTERNAL_ERROR)


def test_receive_accepts_any_contiguous_buffer() -> None:
    words = array.array("I")
    words.frombytes(ping(1))
    assert server().receive_data(memoryview(words)) == [PingReceived(1)]


def test_oversized_header_block_is_refused_before_touching_the_context() -> None:
    c, s = client(), server()
    with pytest.raises(ValueError):
        c.open_stream({"huge": "x" * (1 << 24)})
    sid = c.open_stream({"a": "b"})
    _, ev_s = pump(c, s)
    assert ev_s == [StreamOpened(sid, 0, {"a": "b"}, False, False)]


def test_settings_of_more_than_64_entries_end_the_session() -> None:
    """40,000 entries fit in one control frame and cost 5-10 ms of Python, charged as one
    frame; SPDY/3.1 defines 8 ids."""
    from crishim.protocols.spdy.connection import MAX_SETTINGS_ENTRIES

    for count, ends in ((MAX_SETTINGS_ENTRIES, False), (MAX_SETTINGS_ENTRIES + 1, True)):
        client = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
        server = spdy.SpdyConnection(spdy.SpdyConfig(client=False))
        client.send_settings({i: i for i in range(1, count + 1)})
        events = server.receive_data(client.data_to_send())
        assert server.terminated is ends
        assert isinstance(events[-1], spdy.SessionTerminated if ends else spdy.SettingsReceived)


def test_a_header_block_of_more_than_64_pairs_refuses_only_its_stream() -> None:
    from crishim.protocols.spdy.compression import MAX_HEADER_PAIRS

    client = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
    server = spdy.SpdyConnection(spdy.SpdyConfig(client=False))
    fine = client.open_stream({f"h{i}": "v" for i in range(MAX_HEADER_PAIRS)})
    many = client.open_stream({f"h{i}": "v" for i in range(MAX_HEADER_PAIRS + 1)})
    events = server.receive_data(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [(spdy.StreamOpened, fine),
                                                       (spdy.StreamError, many)]
    assert "header pairs" in events[1].reason and not server.terminated
