"""Byte-level tests for crishim's own RFC 6455 framing (crishim.protocols.websocket):
frames split at every byte, 16/64-bit lengths, pings inside fragmented messages, masking
rules per role, close codes, incremental UTF-8, streamed tunnel payload, and a fuzz
against a straightforward reference decoder. No sockets."""

from __future__ import annotations

import itertools
import os
import random
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crishim.protocols.websocket import (
    ByteStreamTunnel,
    ChannelCodec,
    ChannelData,
    Closed,
    FrameIgnored,
    Message,
    PingReceived,
    TunnelData,
    WebSocketFraming,
    framing,
    xor_mask,
)
from tests.unit.test_websocket_codec import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    close_code,
    frame,
    parse_frames,
)


def feed_split(side, wire: bytes, cut: int) -> list:
    if not 0 < cut < len(wire):
        return side.receive_data(wire)
    return side.receive_data(wire[:cut]) + side.receive_data(wire[cut:])


def tunnel_bytes(events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, TunnelData))


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 4096, 65537, 300_001])
def test_xor_mask_matches_bytewise_xor_and_is_its_own_inverse(size):
    data, key = os.urandom(size), os.urandom(4)
    masked = xor_mask(data, key)
    assert bytes(masked) == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert bytes(xor_mask(masked, key)) == data


def test_masking_uses_the_c_apply_mask_from_websockets():
    # the pure-Python fallback unmasks at ~1 GB/s and bounded SPDY-over-WebSocket uploads
    assert framing._apply_mask is not None, "websockets is installed without its C speedups"


@pytest.mark.parametrize("size", [1, 5, 4099])
@pytest.mark.parametrize("start", [0, 1, 3])
def test_c_mask_and_pure_python_fallback_agree(monkeypatch, size, start):
    data, key = bytearray(os.urandom(size + start)), os.urandom(4)
    expected = bytearray(data)
    expected[start:] = bytes(b ^ key[i % 4] for i, b in enumerate(data[start:]))
    for masker in (framing._apply_mask, None):
        monkeypatch.setattr(framing, "_apply_mask", masker)
        buf = bytearray(data)
        framing._unmask_in_place(buf, start, len(buf), key)
        assert buf == expected
        assert bytes(framing._masked(memoryview(data)[start:], key)) == expected[start:]


# --------------------------------------------------------------------------- splitting


WIRE = (frame(BINARY, b"\x00ab", fin=False) + frame(PING, b"p1")
        + frame(CONTINUATION, b"cd" * 100, fin=False) + frame(PONG, b"")
        + frame(CONTINUATION, b"ef", fin=True) + frame(TEXT, "grüße".encode())
        + frame(CLOSE, struct.pack("!H", 1000) + b"bye"))


def test_every_split_point_gives_the_same_events():
    expected = [PingReceived(b"p1"), FrameIgnored("pong"),
                Message(b"\x00ab" + b"cd" * 100 + b"ef", True),
                Message("grüße".encode(), False), Closed(1000, "bye")]
    for cut in range(len(WIRE) + 1):
        server = WebSocketFraming(client=False)
        assert feed_split(server, WIRE, cut) == expected, cut
        frames = parse_frames(server.data_to_send())
        assert frames == [(PONG, b"p1"), (CLOSE, struct.pack("!H", 1000) + b"bye")], cut


def test_byte_at_a_time_through_the_tunnel_streams_every_byte():
    payload = os.urandom(70_000)
    client = ByteStreamTunnel(client=True, max_send_payload=30_000)
    client.send(payload)
    wire = client.data_to_send() + frame(PING, b"x")
    server = ByteStreamTunnel()
    events = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i:i + 1])
    assert tunnel_bytes(events) == payload
    assert events[-1] == PingReceived(b"x")


def test_tunnel_hands_payload_on_before_the_frame_completes():
    server = ByteStreamTunnel()
    wire = frame(BINARY, b"a" * 1000 + b"b" * 1000)
    first = server.receive_data(wire[:1008])
    assert tunnel_bytes(first) == b"a" * 1000  # not held back until the frame ends
    assert tunnel_bytes(server.receive_data(wire[1008:])) == b"b" * 1000


def test_tunnel_hands_big_unmasked_payload_on_as_views_of_received_bytes():
    """crishim port-forward's SPDY-over-WebSocket downloads: a big piece of a server's
    (unmasked) frame that arrived in one `bytes` read is handed on as a view of it, not
    copied in blocks; small pieces are joined; from a buffer the caller reuses, copies."""
    client = ByteStreamTunnel(client=True)
    payload = os.urandom(300_000)
    wire = frame(BINARY, b"head", masked=False) + frame(BINARY, payload, masked=False)
    events = client.receive_data(wire)
    assert tunnel_bytes(events) == b"head" + payload
    views = [e.data for e in events if isinstance(e.data, memoryview)]
    assert len(views) == 1 and views[0].obj is wire and bytes(views[0]) == payload
    reused = bytearray(wire)
    events = ByteStreamTunnel(client=True).receive_data(memoryview(reused))
    reused[:] = bytes(len(reused))
    assert tunnel_bytes(events) == b"head" + payload
    assert all(type(e.data) is bytes for e in events)


# --------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 200_000])
def test_payload_length_encodings_round_trip(size):
    payload = os.urandom(size)
    for client_side in (True, False):
        sender = WebSocketFraming(client=client_side)
        sender.send_message(payload)
        wire = sender.data_to_send()
        assert wire[1] & 0x7F == (size if size < 126 else 126 if size < 65536 else 127)
        assert parse_frames(wire) == [(BINARY, payload)]
        receiver = WebSocketFraming(client=not client_side)
        assert receiver.receive_data(wire) == [Message(payload, True)]


def test_take_output_gives_large_payloads_uncopied():
    server = WebSocketFraming(client=False)
    payload = os.urandom(100_000)
    server.send_message(payload)
    chunks = server.take_output()
    assert chunks[0] == b"\x82\x7f" + struct.pack("!Q", 100_000)
    assert chunks[1] is payload
    assert server.take_output() == []


def test_send_buffers_cuts_messages_at_the_limit_and_keeps_order():
    server = ByteStreamTunnel(max_send_payload=1000)
    parts = [os.urandom(n) for n in (10, 2500, 0, 990, 7)]
    server.send_buffers(parts)
    frames = parse_frames(server.data_to_send())
    assert [len(p) for _, p in frames] == [1000, 1000, 1000, 507]
    assert b"".join(p for _, p in frames) == b"".join(parts)
    client = ByteStreamTunnel(client=True, max_send_payload=3000)
    client.send_buffers(parts)
    wire = client.data_to_send()
    assert wire[1] & 0x80  # masked
    assert tunnel_bytes(ByteStreamTunnel().receive_data(wire)) == b"".join(parts)


@pytest.mark.parametrize("wire", [
    bytes([0x82, 0xFE]) + struct.pack("!H", 100) + b"\0" * 4,            # 16-bit for 100
    bytes([0x82, 0xFF]) + struct.pack("!Q", 1000) + b"\0" * 4,           # 64-bit for 1000
    bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"\0" * 4,        # top bit set
], ids=["16-bit-not-minimal", "64-bit-not-minimal", "64-bit-top-bit"])
@pytest.mark.parametrize("stream", [False, True], ids=["messages", "tunnel"])
def test_bad_length_encodings_close_1002(wire, stream):
    server = WebSocketFraming(client=False, stream=stream)
    events = server.receive_data(wire + b"\0" * 1000)  # the announced payload there too
    assert isinstance(events[-1], Closed) and events[-1].code == 1002
    assert close_code(server.data_to_send()) == 1002


def test_a_tunnel_of_kubectls_frames_streams_every_byte_at_every_split():
    """kubectl 1.30+ tunnels SPDY in a frame per write, two of every three 4 bytes: such
    frames whole in a read take a short way (_whole_binary_frame). Mixed with what does
    not (fragments, 64-bit lengths, a zero key, empty frames, a PING between), split at
    every point, the bytes come out as sent and the PING after the bytes before it."""
    rng = random.Random(7)
    pieces = [bytes(rng.randrange(256) for _ in range(n))
              for n in (4, 4, 300, 4, 4, 70_000, 1, 125, 126, 0, 65_535)]
    wire = b""
    for i, piece in enumerate(pieces):
        key = b"\0\0\0\0" if i == 3 else bytes(rng.randrange(256) for _ in range(4))
        wire += frame(BINARY, piece, mask_key=key)
    half = pieces[2][:150], pieces[2][150:]
    wire += frame(BINARY, half[0], fin=False) + frame(PING, b"p") \
        + frame(CONTINUATION, half[1]) + frame(BINARY, b"tail")
    sent = b"".join(pieces) + pieces[2] + b"tail"
    for cut in [*range(0, 40), *range(len(wire) - 40, len(wire) + 1), 70_100, 140_000]:
        tunnel = ByteStreamTunnel()
        events = feed_split(tunnel, wire, cut)
        assert tunnel_bytes(events) == sent, cut
        ping = next(i for i, e in enumerate(events) if isinstance(e, PingReceived))
        assert tunnel_bytes(events[:ping]) == sent[:len(sent) - 150 - 4], cut
        assert not any(isinstance(e, Closed) for e in events), cut


def test_huge_announced_frame_is_refused_1009_once_over_the_limit():
    server = ByteStreamTunnel(max_message_size=1000)
    head = bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + b"\1\2\3\4"
    assert server.receive_data(head + b"x" * 1000) != []  # within the limit: streamed
    events = server.receive_data(b"x")
    assert events[-1].code == 1009
    assert close_code(server.data_to_send()) == 1009


# --------------------------------------------------------------------------- roles


def test_masking_rules_per_role():
    for client_side, masked in ((False, False), (True, True)):
        side = WebSocketFraming(client=client_side)
        events = side.receive_data(frame(PING, b"x", masked=masked))
        assert events[-1].code == 1002
    ok = WebSocketFraming(client=True)
    assert ok.receive_data(frame(PING, b"x", masked=False)) == [PingReceived(b"x")]
    pong = ok.data_to_send()
    assert pong[1] & 0x80 and parse_frames(pong) == [(PONG, b"x")]  # client pongs masked


# --------------------------------------------------------------------------- control frames


@pytest.mark.parametrize("wire, code", [
    (frame(PING, b"x" * 126), 1002),
    (frame(PONG, b"x", fin=False), 1002),
    (frame(BINARY, b"a", fin=False) + frame(BINARY, b"b"), 1002),  # new message mid-message
    (frame(BINARY, b"a", fin=False) + frame(TEXT, b"b"), 1002),
    (frame(CLOSE, struct.pack("!H", 1005)), 1002),
    (frame(CLOSE, struct.pack("!H", 999)), 1002),
    (frame(CLOSE, struct.pack("!H", 1016)), 1002),
    (frame(CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    (frame(0xB, b""), 1002),
    (frame(BINARY, b"x", rsv=2), 1002),
])
def test_control_and_sequence_violations(wire, code):
    server = WebSocketFraming(client=False)
    events = server.receive_data(wire)
    assert events[-1].code == code
    assert close_code(server.data_to_send()) == code
    assert server.receive_data(frame(PING, b"after")) == []


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes_are_echoed(code):
    server = WebSocketFraming(client=False)
    assert server.receive_data(frame(CLOSE, struct.pack("!H", code))) == [Closed(code, "")]
    assert close_code(server.data_to_send()) == code


def test_empty_close_is_1005_and_echoed_empty():
    server = WebSocketFraming(client=False)
    assert server.receive_data(frame(CLOSE)) == [Closed(1005, "")]
    assert parse_frames(server.data_to_send()) == [(CLOSE, b"")]


def test_no_pong_after_our_close():
    server = WebSocketFraming(client=False)
    server.close(1000)
    server.data_to_send()
    assert server.receive_data(frame(PING, b"x")) == [PingReceived(b"x")]
    assert server.data_to_send() == b""


def test_frames_that_carry_nothing_are_reported_for_budgeting():
    """Pongs and empty data frames that end no message with data in it are reported (a
    session charges them to its control budget); an empty frame that ends a message with
    data in it is ordinary and is not."""
    server = WebSocketFraming(client=False)
    assert server.receive_data(frame(PONG, b"hb")) == [FrameIgnored("pong")]
    assert server.data_to_send() == b""  # a pong is not answered
    wire = (frame(BINARY, b"ab", fin=False) + frame(CONTINUATION, b"", fin=False)
            + frame(CONTINUATION, b"", fin=True))
    assert server.receive_data(wire) == [FrameIgnored("empty data frame"), Message(b"ab", True)]
    assert server.receive_data(frame(BINARY, b"", fin=False)) == \
        [FrameIgnored("empty data frame")]
    server = WebSocketFraming(client=False)  # an empty message: the channel layer's
    assert server.receive_data(frame(BINARY, b"")) == [Message(b"", True)]
    tunnel = WebSocketFraming(client=False, stream=True)
    events = tunnel.receive_data(frame(BINARY, b"") + frame(BINARY, b"xy")
                                 + frame(PONG) + frame(BINARY, b"z"))
    assert [e for e in events if isinstance(e, FrameIgnored)] == \
        [FrameIgnored("empty data frame"), FrameIgnored("pong")]
    assert tunnel_bytes(events) == b"xyz"


# --------------------------------------------------------------------------- UTF-8


def test_utf8_validated_across_fragments_and_frame_splits():
    text = "añ€😀".encode()
    wire = frame(TEXT, text[:2], fin=False) + frame(CONTINUATION, text[2:5], fin=False) \
        + frame(CONTINUATION, text[5:])
    for cut in range(len(wire) + 1):
        assert feed_split(WebSocketFraming(client=False), wire, cut) == [Message(text, False)]


def test_truncated_utf8_at_message_end_is_1007():
    server = WebSocketFraming(client=False)
    events = server.receive_data(frame(TEXT, "€".encode()[:2]))
    assert events[-1].code == 1007


def test_invalid_utf8_is_refused_before_the_message_ends():
    server = WebSocketFraming(client=False)
    events = server.receive_data(frame(TEXT, b"ok\xff", fin=False))
    assert events[-1].code == 1007


# --------------------------------------------------------------------------- channels


def test_channel_data_over_16_bit_and_64_bit_frames():
    server = ChannelCodec([80], base64=False)
    for size in (70_000, 1000):
        payload = os.urandom(size)
        assert server.receive_data(frame(BINARY, b"\x00" + payload)) == [ChannelData(0, payload)]


def test_channel_server_sends_channel_byte_and_payload_unjoined():
    server = ChannelCodec([80, 81], base64=False)
    payload = os.urandom(50_000)
    server.send_data(1, payload)
    chunks = server.take_output()
    assert chunks[0] == b"\x82\x7e" + struct.pack("!H", 50_001) + b"\x02"
    assert chunks[1] is payload


# --------------------------------------------------------------------------- fuzz


def reference_frames(data: bytes, client: bool):
    """A plain, slow decoder of well-formed input: (opcode, fin, payload) per frame."""
    pos, out = 0, []
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        size, at = b1 & 0x7F, pos + 2
        if size == 126:
            size, at = struct.unpack_from("!H", data, at)[0], at + 2
        elif size == 127:
            size, at = struct.unpack_from("!Q", data, at)[0], at + 8
        key = data[at:at + 4] if b1 & 0x80 else b"\0\0\0\0"
        at += 4 if b1 & 0x80 else 0
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[at:at + size]))
        out.append((b0 & 0x0F, bool(b0 & 0x80), payload))
        pos = at + size
    return out


messages = st.lists(st.tuples(st.sampled_from(["bin", "text", "ping"]),
                              st.binary(max_size=300), st.integers(1, 3)), max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.lists(st.integers(min_value=0), max_size=5), st.booleans())
def test_fuzz_valid_streams_match_the_reference(msgs, cuts, client_side):
    wire = b""
    expected = []
    for kind, payload, pieces in msgs:
        masked = not client_side
        if kind == "ping":
            wire += frame(PING, payload[:125], masked=masked)
            expected.append(PingReceived(payload[:125]))
            continue
        if kind == "text":
            payload = payload.decode("latin-1").encode()
        opcode = TEXT if kind == "text" else BINARY
        step = max(1, len(payload) // pieces)
        chunks = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
        for i, chunk in enumerate(chunks):
            wire += frame(opcode if i == 0 else CONTINUATION, chunk, masked=masked,
                          fin=i == len(chunks) - 1, mask_key=os.urandom(4))
        expected.append(Message(payload, kind == "bin"))
    assert [p for op, _, p in reference_frames(wire, client_side) if op == PING] == \
        [e.payload for e in expected if isinstance(e, PingReceived)]
    side = WebSocketFraming(client=client_side)
    positions = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    events = []
    for start, end in itertools.pairwise(positions):
        events += side.receive_data(wire[start:end])
    assert events == expected
    # the same bytes through a tunnel: binary payload streamed, in order
    if all(kind != "text" for kind, _, _ in msgs):
        tunnel = ByteStreamTunnel(client=client_side)
        got = []
        for start, end in itertools.pairwise(positions):
            got += tunnel.receive_data(wire[start:end])
        assert tunnel_bytes(got) == b"".join(e.data for e in expected if isinstance(e, Message))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.booleans(), st.binary(max_size=400),
       st.lists(st.integers(min_value=0), max_size=6))
def test_fuzz_random_bytes_never_raise_and_buffer_little(client_side, stream, data, cuts):
    side = WebSocketFraming(client=client_side, max_message_size=256, stream=stream)
    positions = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(positions):
        events = side.receive_data(data[start:end])
        assert all(not isinstance(e, Closed) or 1000 <= e.code <= 1011 for e in events)
        assert len(side._head) <= 139  # only a frame head or a control frame is held
        side.data_to_send()
    side.receive_data(b"")
    assert side.closed


def test_a_message_whole_in_one_received_bytes_is_a_view_into_it_not_a_copy():
    """The client's channel downloads: a server message (unmasked) that arrived whole in
    one `bytes` read is handed out as a view of it; from a buffer the caller reuses
    (bytearray, memoryview of one), it is copied, so reusing the buffer changes nothing."""
    client = WebSocketFraming(client=True)
    payload = os.urandom(300_000)
    wire = frame(BINARY, payload[:100], masked=False) + frame(BINARY, payload, masked=False)
    got = [e for e in client.receive_data(wire) if isinstance(e, Message)]
    assert [bytes(m.data) for m in got] == [payload[:100], payload]
    # the big one is a view; the small one a copy (a view would keep the whole read alive)
    assert isinstance(got[1].data, memoryview) and got[1].data.obj is wire
    assert type(got[0].data) is bytes

    reused = bytearray(wire)
    got = [e for e in client.receive_data(memoryview(reused)) if isinstance(e, Message)]
    reused[:] = bytes(len(reused))  # the caller's next read lands in the same buffer
    assert [bytes(m.data) for m in got] == [payload[:100], payload]
    assert all(type(m.data) is bytes for m in got)


# --------------------------------------------------------------------------- reassembly memory


def test_a_message_in_1_byte_fragments_is_held_in_about_a_byte_per_byte():
    """A message's fragments are reassembled up to max_message_size counted in payload
    bytes: held as one buffer however small the fragments (was an object per fragment,
    ~60 bytes of memory per payload byte), and the message comes out whole."""
    count = 100_000
    payload = bytes(i % 251 for i in range(count))
    wire = frame(BINARY, payload[:1], fin=False) + b"".join(
        frame(CONTINUATION, payload[i:i + 1], fin=False) for i in range(1, count))
    server = WebSocketFraming(client=False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(wire), 65536):  # reads of 64 KiB, as a transport gives
            assert server.receive_data(wire[start:start + 65536]) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2 * count, f"{held} bytes held for {count} payload bytes"
    assert server.receive_data(frame(CONTINUATION, b"!")) == [Message(payload + b"!", True)]


def test_a_single_frame_message_is_handed_on_as_it_came():
    """The common case is not copied into a gathering buffer: a big unmasked frame's
    payload is a view of the received bytes."""
    payload = os.urandom(framing._VIEW_MIN)
    server = WebSocketFraming(client=False)
    wire = frame(BINARY, payload, masked=True)
    (message,) = server.receive_data(wire)
    assert message == Message(payload, True)
    assert type(message.data) is not bytearray
