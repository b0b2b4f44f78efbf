"""Property tests: whatever bytes arrive, however they are split, the SPDY codec
neither raises nor grows without bound, and it either carries on or ends with
SessionTerminated and a GOAWAY on the wire."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crishim.protocols.spdy import (
    DataReceived,
    SessionClosedError,
    SessionTerminated,
    SpdyConfig,
    SpdyConnection,
    StreamClosedError,
    StreamError,
    StreamOpened,
)
from tests.unit.test_spdy_codec import KUBECTL_CAPTURE, RefEncoder, Wire, control, merge_data

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Small limits so that the bounds are actually reached by short inputs.
SMALL = SpdyConfig(max_header_block=2048, max_frame_size=4096, max_concurrent_streams=4,
                   max_data_chunk=64, closed_stream_memory=8, max_outstanding_pings=4)


class Harness:
    """Feeds a receiving session and checks its invariants after every read."""

    def __init__(self, config: SpdyConfig, reply: bool = False) -> None:
        self.config = config
        self.session = SpdyConnection(config)
        self.wire = Wire()
        self.frames: list[tuple] = []
        self.events: list = []
        self.reply = reply

    def feed(self, chunk: bytes) -> None:
        session = self.session
        was_terminated = session.terminated
        events = session.receive_data(chunk)
        if was_terminated:
            assert events == []
        self.events += events
        for event in events:
            if isinstance(event, DataReceived):
                assert len(event.data) <= self.config.max_data_chunk
            if isinstance(event, SessionTerminated):
                assert "internal" not in event.reason, event.reason
            if self.reply and isinstance(event, StreamOpened) and not session.terminated:
                try:
                    session.reply(event.stream_id, {"ok": "1"})
                    session.send_data(event.stream_id, b"echo")
                except StreamClosedError:
                    pass  # unidirectional or already gone
        # Output is always whole, well-formed frames; header blocks decode in order.
        self.frames += self.wire.parse(session.data_to_send())
        assert session.buffered_input <= self.config.max_control_frame + 8
        assert session.open_stream_count <= self.config.max_concurrent_streams
        assert session.remembered_closed_streams <= self.config.closed_stream_memory

    def finish(self) -> None:
        terminations = [e for e in self.events if isinstance(e, SessionTerminated)]
        assert len(terminations) <= 1
        if terminations:
            assert self.events[-1] is terminations[0]
            assert self.frames[-1][0] == "GOAWAY"
            assert self.frames[-1][2] == terminations[0].status
            assert self.session.receive_data(b"\x80\x03\x00\x06\x00\x00\x00\x04abcd") == []
        else:
            assert not self.session.terminated


def split(data: st.DataObject, blob: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    pieces, start = [], 0
    for cut in [*cuts, len(blob)]:
        pieces.append(blob[start:cut])
        start = cut
    return pieces


# --------------------------------------------------------------------------- valid traffic

headers_st = st.dictionaries(st.sampled_from(["port", "streamtype", "requestid", "X-Odd", "a"]),
                             st.text("abc019\x00", max_size=8), max_size=4)

action_st = st.one_of(
    st.tuples(st.just("open"), headers_st, st.booleans()),
    st.tuples(st.just("data"), st.integers(0, 7), st.integers(0, 300), st.booleans()),
    st.tuples(st.just("end"), st.integers(0, 7)),
    st.tuples(st.just("reset"), st.integers(0, 7)),
    st.tuples(st.just("headers"), st.integers(0, 7), headers_st),
    st.tuples(st.just("window"), st.integers(0, 7), st.integers(1, 1 << 20)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("settings"), st.dictionaries(st.integers(1, 8), st.integers(0, 1 << 31),
                                                   max_size=3)),
    st.tuples(st.just("goaway")),
    # Control frame types nobody implements: a peer must skip them whatever their size.
    st.tuples(st.just("raw"), st.sampled_from([0, 5, 10, 11, 0x7FFF]), st.binary(max_size=24)),
)


def client_traffic(actions: list[tuple]) -> bytes:
    """Bytes a well-behaved client session emits for the given calls."""
    session = SpdyConnection(SpdyConfig(client=True))
    opened: list[int] = []
    out = bytearray()
    for action in actions:
        kind = action[0]
        stream_id = opened[action[1] % len(opened)] if opened and kind in (
            "data", "end", "reset", "headers", "window") else 0
        try:
            if kind == "open":
                opened.append(session.open_stream(action[1], fin=action[2]))
            elif kind == "data" and stream_id:
                session.send_data(stream_id, bytes(action[2]), fin=action[3])
            elif kind == "end" and stream_id:
                session.end_stream(stream_id)
            elif kind == "reset" and stream_id:
                session.reset_stream(stream_id)
            elif kind == "headers" and stream_id:
                session.send_headers(stream_id, action[2])
            elif kind == "window" and stream_id:
                session.send_window_update(stream_id, action[2])
            elif kind == "ping":
                session.ping()
            elif kind == "settings":
                session.send_settings(action[1])
            elif kind == "goaway":
                session.goaway()
            elif kind == "raw":
                out += session.data_to_send()
                out += control(action[1], action[2])
        except (StreamClosedError, SessionClosedError, ValueError):
            pass
        out += session.data_to_send()
    return bytes(out)


# --------------------------------------------------------------------------- properties


@FUZZ
@given(blob=st.binary(max_size=3000), data=st.data())
def test_random_bytes_never_escape_or_grow(blob: bytes, data: st.DataObject) -> None:
    harness = Harness(SMALL)
    for piece in split(data, blob):
        harness.feed(piece)
    harness.finish()


@FUZZ
@given(blob=st.binary(max_size=2000), data=st.data())
def test_random_bytes_after_a_real_session_prefix(blob: bytes, data: st.DataObject) -> None:
    harness = Harness(SMALL, reply=True)
    for piece in split(data, KUBECTL_CAPTURE + blob):
        harness.feed(piece)
    harness.finish()


@FUZZ
@given(actions=st.lists(action_st, max_size=25), data=st.data())
def test_valid_traffic_split_anywhere_is_understood_the_same(actions: list[tuple],
                                                              data: st.DataObject) -> None:
    blob = client_traffic(actions)
    whole = SpdyConnection(SpdyConfig(max_data_chunk=1 << 20))
    expected = whole.receive_data(blob)
    harness = Harness(SpdyConfig(max_data_chunk=64))
    for piece in split(data, blob):
        harness.feed(piece)
    harness.finish()
    assert not any(isinstance(e, (SessionTerminated, StreamError)) for e in expected)
    assert merge_data(harness.events) == merge_data(expected)


@FUZZ
@given(actions=st.lists(action_st, min_size=1, max_size=25),
       mutations=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                          min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
       data=st.data())
def test_mutated_traffic_never_escapes_or_grows(actions: list[tuple],
                                                mutations: list[tuple[int, int]],
                                                cut: int | None, data: st.DataObject) -> None:
    blob = bytearray(client_traffic(actions))
    if not blob:
        return
    for position, value in mutations:
        blob[position % len(blob)] = value
    if cut is not None:
        del blob[cut % len(blob):cut % len(blob) + data.draw(st.integers(0, 16))]
    harness = Harness(SMALL, reply=True)
    for piece in split(data, bytes(blob)):
        harness.feed(piece)
    harness.finish()


@FUZZ
@given(count=st.integers(0, 0xFFFFFFFF), fields=st.lists(st.integers(0, 0xFFFFFFFF),
                                                          max_size=8),
       tail=st.binary(max_size=16), stream_id=st.integers(0, 0x7FFFFFFD),
       flags=st.integers(0, 255), data=st.data())
def test_hostile_header_blocks_reset_or_terminate_cleanly(count: int, fields: list[int],
                                                         tail: bytes, stream_id: int,
                                                         flags: int,
                                                         data: st.DataObject) -> None:
    raw = struct.pack(">I", count) + b"".join(struct.pack(">I", f) + b"ab" for f in fields)
    enc = RefEncoder()
    frame = enc.syn_stream(stream_id, {}, flags=flags, raw=raw + tail)
    follow_up = enc.syn_stream(0x7FFFFFFF, {"after": "1"})
    harness = Harness(SMALL)
    for piece in split(data, frame + follow_up):
        harness.feed(piece)
    harness.finish()
    if not harness.session.terminated:
        # A rejected block must leave the shared zlib context in step.
        assert harness.events[-1] == StreamOpened(0x7FFFFFFF, 0, {"after": "1"}, False, False)


@FUZZ
@given(actions=st.lists(action_st, max_size=20), data=st.data())
def test_client_role_survives_server_traffic_mirrored(actions: list[tuple],
                                                      data: st.DataObject) -> None:
    # Client-made traffic seen by a client session: every SYN_STREAM has the wrong
    # parity, so streams get refused, yet nothing escapes and the session stays bounded.
    blob = client_traffic(actions)
    harness = Harness(SpdyConfig(client=True, max_concurrent_streams=4, closed_stream_memory=8))
    for piece in split(data, blob):
        harness.feed(piece)
    harness.finish()
