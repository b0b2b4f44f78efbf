"""crishim.protocols.h2: the zero-copy byte handling around h2 must not change what h2
sees or sends. Each test drives crishim's H2Codec and the stock h2 H2Connection with the
same bytes or calls and compares: events, flow-control windows, errors, wire bytes."""

from __future__ import annotations

import os
import random

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, RstStreamFrame

from crishim.protocols.buffers import Outbound
from crishim.protocols.h2 import H2Codec, Overloaded, StreamError

REQUEST = [(":method", "POST"), (":scheme", "http"), (":authority", "x"),
           (":path", "/portforward/t")]
WINDOW = 1 << 20


def _client() -> h2.connection.H2Connection:
    """A stock h2 client that has seen the servers' SETTINGS (64 KiB frames, 1 MiB
    windows): the bytes it sends from here on are what the servers are fed."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    _, server = _servers()
    c.receive_data(server.data_to_send())
    return c


def _servers() -> tuple[H2Codec, h2.connection.H2Connection]:
    """crishim's codec and the stock connection, configured alike."""
    out = []
    for cls in (H2Codec, h2.connection.H2Connection):
        s = cls(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        s.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 64 * 1024})
        s.max_inbound_frame_size = 64 * 1024
        s.initiate_connection()
        s.increment_flow_control_window(4 * WINDOW)
        out.append(s)
    return out[0], out[1]


def _summary(events: list) -> list:
    """Events with DATA merged per stream: splitting a frame changes only the pieces."""
    data: dict[int, bytearray] = {}
    flow: dict[int, int] = {}
    rest = []
    for ev in events:
        if isinstance(ev, h2.events.DataReceived):
            data.setdefault(ev.stream_id, bytearray()).extend(bytes(ev.data))
            flow[ev.stream_id] = flow.get(ev.stream_id, 0) + ev.flow_controlled_length
        elif isinstance(ev, h2.events.RequestReceived):
            rest.append(("request", ev.stream_id, tuple(ev.headers)))
        else:
            rest.append((type(ev).__name__, getattr(ev, "stream_id", None)))
    return [rest, {k: bytes(v) for k, v in data.items()}, flow]


def _feed(conn, wire: bytes, cuts: list[int]) -> list:
    events = []
    last = 0
    for cut in [*cuts, len(wire)]:
        events += conn.receive_data(wire[last:cut])
        last = cut
    return events


def _outcome(conn, wire: bytes, cuts: list[int]) -> tuple:
    """What h2 made of it: events, windows, the error raised, and the bytes it answered."""
    try:
        events, error = _feed(conn, wire, cuts), None
    except h2.exceptions.ProtocolError as e:
        events, error = [], (type(e).__name__, str(e))
    out = b"".join(conn.take_output()) if isinstance(conn, H2Codec) else conn.data_to_send()
    return _summary(events), error, out


def _windows(conn, stream_ids) -> list[int]:
    return [conn.remote_flow_control_window(sid) for sid in stream_ids] + \
        [conn._inbound_flow_control_window_manager.current_window_size]


def test_data_split_at_every_read_boundary_reaches_h2_unchanged():
    c = _client()
    c.send_headers(1, REQUEST)
    c.send_headers(3, REQUEST)
    payload = os.urandom(150_000)
    for i in range(0, len(payload), 50_000):
        c.send_data(1, payload[i:i + 50_000], end_stream=i + 50_000 >= len(payload))
        c.send_data(3, payload[i:i + 7], pad_length=9)  # padded frames: whole, as before
    wire = c.data_to_send()
    rng = random.Random(7)
    for trial in range(30):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 60)))
        if trial == 0:
            cuts = list(range(1, 200))  # byte by byte through the preface and headers
        ours, stock = _servers()
        got, want = _feed(ours, wire, cuts), _feed(stock, wire, cuts)
        assert _summary(got) == _summary(want)
        assert _summary(got)[1][1] == payload
        assert _windows(ours, (1, 3)) == _windows(stock, (1, 3))
        ended = [ev for ev in got if isinstance(ev, h2.events.StreamEnded)]
        assert [ev.stream_id for ev in ended] == [1]


def test_data_payloads_are_views_into_the_received_bytes():
    c = _client()
    c.send_headers(1, REQUEST)
    c.send_data(1, b"a" * 30_000)
    wire = c.data_to_send()
    ours, _ = _servers()
    received = bytes(wire)
    events = ours.receive_data(received)
    data = [ev.data for ev in events if isinstance(ev, h2.events.DataReceived)]
    assert len(data) == 1 and isinstance(data[0], memoryview)
    assert data[0].obj is received  # no copy
    assert bytes(data[0]) == b"a" * 30_000


def test_mutable_input_is_copied_before_views_are_handed_out():
    c = _client()
    c.send_headers(1, REQUEST)
    c.send_data(1, b"x" * 100)
    buf = bytearray(c.data_to_send())
    ours, _ = _servers()
    events = ours.receive_data(buf)
    buf[:] = b"\0" * len(buf)
    data = [bytes(ev.data) for ev in events if isinstance(ev, h2.events.DataReceived)]
    assert data == [b"x" * 100]


def test_lent_input_is_read_in_place_and_what_goes_on_is_kept():
    """receive_data(lent=True): the input is a buffer its owner reuses once the events
    are acted on (crishim serve's read buffer). DATA comes out as views of it, and what
    is left of a frame that goes on in the next read, a header block or DATA that h2
    takes whole, is copied before the owner overwrites the buffer: the events over reads
    cut anywhere match stock h2's."""
    c = _client()
    c.send_headers(1, REQUEST)
    c.send_headers(3, REQUEST)
    payload = os.urandom(100_000)
    c.send_data(1, payload[:60_000])
    c.send_data(3, payload[:5], pad_length=3)  # padded: buffered whole, not split
    c.send_data(1, payload[60_000:], end_stream=True)
    wire = c.data_to_send()
    rng = random.Random(11)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(wire)), rng.randint(1, 40)))
        ours, stock = _servers()
        got = []
        reused = bytearray(len(wire))  # one buffer for every read, as the loop's
        last = in_place = 0
        for cut in [*cuts, len(wire)]:
            n = cut - last
            reused[:n] = wire[last:cut]
            events = ours.receive_data(memoryview(reused)[:n], lent=True)
            # acted on before the next read: DATA copied out now, as a pod write would
            got += [(ev.stream_id, bytes(ev.data)) if isinstance(ev, h2.events.DataReceived)
                    else ev for ev in events]
            in_place += sum(isinstance(ev, h2.events.DataReceived) and
                            isinstance(ev.data, memoryview) and ev.data.obj is reused
                            for ev in events)
            reused[:] = b"\xee" * len(reused)  # the next read overwrites it
            last = cut
        want = _feed(stock, wire, cuts)
        data: dict[int, bytes] = {}
        for item in got:
            if isinstance(item, tuple):
                data[item[0]] = data.get(item[0], b"") + item[1]
        assert data == {1: payload, 3: payload[:5]}
        assert in_place  # not copied on the way in
        assert [type(e).__name__ for e in got if not isinstance(e, tuple)] == \
            [type(e).__name__ for e in want if not isinstance(e, h2.events.DataReceived)]
        assert _windows(ours, (1, 3)) == _windows(stock, (1, 3))


def test_header_block_with_continuation_split_over_reads():
    big = [("streamtype", "data"), ("port", "80"), ("x-pad", "v" * 3000)]
    block = Encoder().encode(REQUEST + big)
    hf = HeadersFrame(1, data=block[:100])
    cf1 = ContinuationFrame(1, data=block[100:2000])
    cf2 = ContinuationFrame(1, data=block[2000:])
    cf2.flags.add("END_HEADERS")
    df = DataFrame(1, data=b"payload" * 1000)
    df.flags.add("END_STREAM")
    first = _client().data_to_send()
    wire = first + hf.serialize() + cf1.serialize() + cf2.serialize() + df.serialize()
    for cuts in ([len(wire) - 5000], list(range(len(first), len(wire), 97))):
        ours, stock = _servers()
        got, want = _feed(ours, wire, cuts), _feed(stock, wire, cuts)
        assert _summary(got) == _summary(want)
        assert _summary(got)[1] == {1: b"payload" * 1000}
        assert ("request", 1, tuple(REQUEST + big)) in _summary(got)[0]


def test_data_inside_a_header_block_is_a_protocol_error_as_in_h2():
    first = _client().data_to_send()
    hf = HeadersFrame(1, data=b"\x83")  # no END_HEADERS: a CONTINUATION must follow
    df = DataFrame(1, data=b"z" * 100)
    wire = first + hf.serialize() + df.serialize()
    for conn in _servers():
        with pytest.raises(h2.exceptions.ProtocolError):
            conn.receive_data(wire)


def test_oversized_frame_and_bad_preface_fail_as_in_h2():
    c = _client()
    c.send_headers(1, REQUEST)
    wire = c.data_to_send()
    big = DataFrame(1, data=b"q" * (64 * 1024 + 1)).serialize()
    for conn in _servers():
        with pytest.raises(h2.exceptions.FrameTooLargeError):
            conn.receive_data(wire + big[:20] if isinstance(conn, H2Codec) else wire + big)
    for conn in _servers():
        with pytest.raises(h2.exceptions.ProtocolError):
            conn.receive_data(b"GET / HTTP/1.1\r\n\r\n" + b"\0" * 20)


def test_flow_control_violation_is_detected_when_split():
    c = _client()
    c.send_headers(1, REQUEST)
    wire = c.data_to_send()
    # 20 frames of 64 KiB: 1.25 MiB into a 1 MiB stream window (the client never saw the
    # server's SETTINGS, so it believes 64 KiB: build the frames by hand)
    frames = b"".join(DataFrame(1, data=b"w" * 65536).serialize() for _ in range(20))
    for conn in _servers():
        conn.receive_data(wire)
        with pytest.raises(h2.exceptions.FlowControlError):
            _feed(conn, frames, list(range(1000, len(frames), 30_001)))


def test_output_is_byte_identical_to_h2_and_keeps_big_payloads_uncopied():
    ours, stock = _servers()
    for conn in (ours, stock):
        client = _client()
        client.send_headers(1, REQUEST)
        client.send_headers(3, REQUEST)
        conn.receive_data(client.data_to_send())
    big = os.urandom(16_000)  # the client left max frame size at 16 KiB
    small = b"hello"
    for conn in (ours, stock):
        conn.send_headers(1, [(":status", "200")])
        conn.send_data(1, big)
        conn.send_data(1, small)
        conn.send_data(3, memoryview(big)[:1000], end_stream=True)
        conn.send_data(1, b"padded", pad_length=3)
        conn.acknowledge_received_data(0, 1)
        conn.end_stream(1)
        conn.ping(b"12345678")
    chunks = ours.take_output()
    assert b"".join(chunks) == stock.data_to_send()
    assert any(chunk is big for chunk in chunks)
    assert ours.take_output() == [] and ours.data_to_send() == b""


def test_queued_data_split_at_the_frame_size_goes_out_as_views_of_the_caller_buffer():
    """send_queued splits a chunk at the frame size or window into memoryview slices; h2's
    own send_data would copy each (`tobytes()`): the frames must be byte-identical to
    stock h2's and carry views of the caller's buffer, not copies."""
    ours, stock = _servers()
    for conn in (ours, stock):
        client = _client()
        client.send_headers(1, REQUEST)
        conn.receive_data(client.data_to_send())
        conn.send_headers(1, [(":status", "200")])
    big = os.urandom(40_000)  # the client's max frame size is 16 KiB: three frames
    out = Outbound()
    out.append(big)
    out.eof = True
    assert ours.send_queued(1, out) and out.size == 0
    stock.send_data(1, big[:16_384])
    stock.send_data(1, big[16_384:32_768])
    stock.send_data(1, big[32_768:], end_stream=True)
    chunks = ours.take_output()
    assert b"".join(chunks) == stock.data_to_send()
    views = [c for c in chunks if type(c) is memoryview]
    assert [len(v) for v in views] == [16_384, 16_384, 40_000 - 32_768]
    assert all(v.obj is big for v in views)


def test_data_to_send_still_works_with_an_amount():
    ours, stock = _servers()
    a, b = ours.data_to_send(10), stock.data_to_send(10)
    assert a == b and len(a) == 10
    assert ours.data_to_send() == stock.data_to_send()


def test_random_frame_sequences_match_stock_h2():
    """Differential: random streams, sizes, paddings, resets and read boundaries."""
    rng = random.Random(2024)
    for _ in range(40):
        c = _client()
        open_ids: list[int] = []
        for _ in range(rng.randint(1, 12)):
            action = rng.random()
            if action < 0.25 or not open_ids:
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, REQUEST, end_stream=rng.random() < 0.1)
                open_ids.append(sid)
            elif action < 0.85:
                sid = rng.choice(open_ids)
                n = rng.choice([0, 1, 9, 100, 16_384])
                pad = rng.choice([None, None, 0, 5])
                end = rng.random() < 0.2
                try:
                    c.send_data(sid, os.urandom(n), end_stream=end, pad_length=pad)
                except h2.exceptions.ProtocolError:  # ended by its HEADERS, or out of window
                    open_ids.remove(sid)
                    continue
                if end:
                    open_ids.remove(sid)
            else:
                sid = rng.choice(open_ids)
                open_ids.remove(sid)
                try:
                    c.reset_stream(sid)
                except h2.exceptions.ProtocolError:
                    continue
                if rng.random() < 0.5:  # DATA after our own reset: h2 answers RST_STREAM
                    frame = DataFrame(sid, data=b"late")
                    c._data_to_send += frame.serialize()
        wire = c.data_to_send()
        cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 40))))
        ours, stock = _servers()
        assert _outcome(ours, wire, cuts) == _outcome(stock, wire, cuts)


def _codec_pair(max_streams: int) -> tuple[H2Codec, H2Codec]:
    """crishim's codec as client and as server (the server allows max_streams), past
    the SETTINGS exchange."""
    client = H2Codec(h2.config.H2Configuration(client_side=True))
    server = H2Codec(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def test_opening_streams_does_not_walk_every_live_stream(monkeypatch):
    """h2 walks all the streams it holds at each open; with 2,000 live, a new one cost
    ~5x what the first did. The codec walks only when its table has doubled."""
    walks = []
    stock = h2.connection.H2Connection._open_streams

    def counted(self, remainder):
        walks.append(len(self.streams))
        return stock(self, remainder)

    monkeypatch.setattr(h2.connection.H2Connection, "_open_streams", counted)
    client, server = _codec_pair(max_streams=100_000)
    client.remote_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100_000})
    for _ in range(2_000):
        client.send_headers(client.get_next_available_stream_id(), REQUEST)
        server.receive_data(client.data_to_send())
    assert len(server.streams) == 2_000 and len(client.streams) == 2_000
    # 64, 128, ..., 2048 on either side: a handful of walks, not one per stream
    assert sum(walks) < 2 * 2 * 4_096, (len(walks), sum(walks))


def test_the_concurrency_limit_still_holds_and_closed_streams_are_dropped():
    client, server = _codec_pair(max_streams=10)
    for _ in range(300):  # 3,000 streams, never more than 10 open at once
        sids = []
        for _ in range(10):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQUEST)
            sids.append(sid)
        server.receive_data(client.data_to_send())
        server.data_to_send()
        for sid in sids:
            server.send_headers(sid, [(":status", "200")], end_stream=True)
            client.end_stream(sid)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    # an 11th open stream is refused by the client (the server's limit) ...
    for _ in range(10):
        client.send_headers(client.get_next_available_stream_id(), REQUEST)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        client.send_headers(client.get_next_available_stream_id(), REQUEST)
    # ... and by the server (as h2 does), from a client that ignores that limit
    client.remote_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    client.send_headers(client.get_next_available_stream_id(), REQUEST)
    with pytest.raises(h2.exceptions.TooManyStreamsError, match="10 open"):
        server.receive_data(client.data_to_send())
    # closed streams do not pile up: at most twice the live ones (or 64) are held, and
    # how the last 1,024 closed is remembered (h2 kept 65,536: ~25 MiB a long session)
    assert len(server.streams) <= 64 and len(client.streams) <= 64, (
        len(server.streams), len(client.streams))
    assert len(server._closed_streams) == len(client._closed_streams) == 1024


def test_literal_header_encoder_decodes_as_hpack_does():
    from hpack import Decoder, HeaderTuple, NeverIndexedHeaderTuple

    from crishim.protocols.h2 import LiteralHeaderEncoder

    encoder, decoder = LiteralHeaderEncoder(), Decoder()
    long_value = "v" * 127 + "é" * 200  # lengths past the 7-bit prefix, UTF-8
    for round_ in range(3):  # the cached fields give the same bytes
        headers = REQUEST + [("port", "8080"), ("requestid", str(round_)), ("x-long", long_value),
                             NeverIndexedHeaderTuple("authorization", "Bearer t"),
                             (b"bytes-name", b"bytes-value")]
        block = encoder.encode(headers)
        got = decoder.decode(block)
        as_text = [tuple(x.decode() if isinstance(x, bytes) else x for x in h) for h in headers]
        assert got == as_text
        # nothing went into the peer's dynamic table; the sensitive field stays never-indexed
        assert len(decoder.header_table.dynamic_entries) == 0
        assert isinstance(got[-2], NeverIndexedHeaderTuple)
        assert not isinstance(got[0], NeverIndexedHeaderTuple) and isinstance(got[0], HeaderTuple)


def test_literal_header_encoder_sends_the_table_size_update_first():
    from hpack import Decoder

    from crishim.protocols.h2 import LiteralHeaderEncoder

    encoder, decoder = LiteralHeaderEncoder(), Decoder()
    encoder.header_table_size = 0  # as h2 does when the peer's SETTINGS say so
    decoder.max_allowed_table_size = 0
    block = encoder.encode(REQUEST)
    assert block[0] == 0x20  # dynamic table size update to 0, before any field
    assert decoder.decode(block) == REQUEST
    assert encoder.encode(REQUEST)[0] == 0x00  # once only


def _send_outcome(conn, action) -> tuple:
    try:
        action(conn)
        error = None
    except h2.exceptions.ProtocolError as e:
        error = type(e).__name__
    out = b"".join(bytes(c) for c in conn.take_output()) if isinstance(conn, H2Codec) \
        else conn.data_to_send()
    states = {sid: s.state_machine.state for sid, s in conn.streams.items()}
    windows = {sid: s.outbound_flow_control_window for sid, s in conn.streams.items()}
    return error, out, states, conn.outbound_flow_control_window, windows


def test_data_sent_on_the_short_way_matches_stock_h2():
    """H2Codec queues plain DATA itself (no state machine, no frame object): random sends,
    sizes up to and past both windows and the frame size, END_STREAM, padding, resets and
    the peer's END_STREAM must give the same bytes, windows, states and errors as h2."""
    rng = random.Random(11)
    for _ in range(60):
        ours, stock = _servers()
        client = _client()
        client.send_headers(1, REQUEST)
        client.send_headers(3, REQUEST, end_stream=True)  # half-closed (remote) at once
        wire = client.data_to_send()
        for conn in (ours, stock):
            conn.receive_data(wire)
            conn.send_headers(1, [(":status", "200")])
            conn.send_headers(3, [(":status", "200")])
        assert _send_outcome(ours, lambda c: None) == _send_outcome(stock, lambda c: None)
        for _ in range(rng.randint(1, 30)):
            sid = rng.choice((1, 3))
            n = rng.choice([0, 1, 100, 16_384, 16_385, 70_000])
            data = os.urandom(n)
            kind = rng.random()
            if kind < 0.7:
                def act(c, sid=sid, data=data):
                    c.send_data(sid, data)
            elif kind < 0.8:
                def act(c, sid=sid, data=data):
                    c.send_data(sid, memoryview(data)[:10], end_stream=True)
            elif kind < 0.9:
                def act(c, sid=sid, data=data):
                    c.send_data(sid, data[:10], pad_length=4)
            else:
                def act(c, sid=sid):
                    c.reset_stream(sid)
            assert _send_outcome(ours, act) == _send_outcome(stock, act)


def test_data_sent_after_the_connection_preface_follows_it():
    """A client's first frames: h2 writes its preface into its own buffer; DATA queued
    directly must come after it."""
    ours = H2Codec(h2.config.H2Configuration(client_side=True))
    stock = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    for conn in (ours, stock):
        conn.initiate_connection()
        conn.send_headers(1, REQUEST)
        conn.send_data(1, b"first")
        conn.send_data(1, os.urandom(5000))
    assert b"".join(bytes(c) for c in ours.take_output())[:24] == \
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("case", ["before headers", "content-length", "past the window",
                                  "after END_STREAM", "plain"])
def test_data_received_on_the_short_way_matches_stock_h2_as_a_client(case):
    """The client side of the short way for received DATA (a response's): what h2 refuses
    (DATA before the response's HEADERS, a window exceeded, DATA after END_STREAM) is
    refused alike, and plain DATA gives the same events. A content-length overrun is
    refused too, as a stream error where h2 ends the connection (RFC 9113 8.1.1)."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    conns = [H2Codec(h2.config.H2Configuration(client_side=True)),
             h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))]
    for conn in conns:
        conn.initiate_connection()
        conn.send_headers(1, REQUEST)
    server.receive_data(conns[1].data_to_send())
    prefix = server.data_to_send()
    frames = b""
    if case != "before headers":
        headers = [(":status", "200")] + ([("content-length", "3")]
                                          if case == "content-length" else [])
        server.send_headers(1, headers)
        frames = server.data_to_send()
    if case == "past the window":
        frames += b"".join(DataFrame(1, data=b"w" * 16_384).serialize() for _ in range(5))
    elif case == "after END_STREAM":
        frames += DataFrame(1, data=b"end", flags=["END_STREAM"]).serialize()
        frames += DataFrame(1, data=b"late").serialize()
    else:
        frames += DataFrame(1, data=b"hello").serialize() * 2
    outcomes = []
    for conn in conns:
        conn.receive_data(prefix)
        conn.data_to_send()
        if isinstance(conn, H2Codec):
            conn.take_output()
        outcomes.append(_outcome(conn, frames, []) + (_windows(conn, (1,)),))
    if case == "content-length":
        ours, stock = outcomes
        assert stock[1] is not None and ours[1] is None
        assert ours[0][0] == [("ResponseReceived", 1), ("StreamError", 1)]
        assert ours[2].startswith(RstStreamFrame(1, error_code=ErrorCodes.PROTOCOL_ERROR)
                                  .serialize())
        return
    assert outcomes[0] == outcomes[1]
    if case == "plain":
        assert outcomes[0][0][1] == {1: b"hellohello"} and outcomes[0][1] is None
    else:
        assert outcomes[0][1] is not None or outcomes[0][2]  # refused: an error or an answer


def test_a_data_frame_with_the_reserved_bit_set_is_its_stream_s():
    """RFC 9113 4.1: the reserved bit of the stream identifier is ignored on receipt."""
    c = _client()
    c.send_headers(1, REQUEST)
    frame = bytearray(DataFrame(1, data=b"reserved").serialize())
    frame[5] |= 0x80
    wire = c.data_to_send() + bytes(frame)
    ours, stock = _servers()
    assert _outcome(ours, wire, []) == _outcome(stock, wire, [])
    assert _outcome(*_servers()[:1], wire, [])[0][1] == {1: b"reserved"}


def test_a_header_block_waiting_for_end_headers_is_bounded_by_the_list_size():
    """h2 bounds an unfinished header block only by its CONTINUATION count (64 frames of
    up to MAX_FRAME_SIZE); the codec holds at most twice the MAX_HEADER_LIST_SIZE it
    advertises, then GOAWAY ENHANCE_YOUR_CALM. Within that, a block split over
    CONTINUATION frames is decoded as before."""
    ours, _ = _servers()
    ours.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: 64 * 1024})
    wire = _client().data_to_send() + HeadersFrame(1, data=b"\x82" * 16384).serialize()
    ours.receive_data(wire)
    held = ContinuationFrame(1, data=b"\x82" * 16384)  # 32 KiB: at the bound, kept
    assert ours.receive_data(held.serialize()) == []
    ours.data_to_send()  # the SETTINGS acknowledgement
    with pytest.raises(Overloaded, match="more than 32768 bytes"):
        ours.receive_data(ContinuationFrame(1, data=b"\x82").serialize())
    goaway = ours.data_to_send()
    assert goaway[3] == 0x7 and int.from_bytes(goaway[13:17], "big") == 0xB  # GOAWAY, 11


def test_a_grown_connection_window_is_given_back_whole() -> None:
    """The session's window grows while bytes are outstanding: h2's manager took the
    window left then for its maximum (65,535 - 40,000 outstanding + 65,535 = 91,070), so
    it gave back by halves of less than was granted, and the session offered less
    (5.9 MiB of 8). inbound_window_max sets it to the whole window."""
    import asyncio
    import logging

    from crishim.budget import LogBudget
    from crishim.config import Config
    from crishim.forward import ForwardContext
    from crishim.sandboxes import NamedNetnsRuntime
    from crishim.stream.portforward_h2 import DEFAULT_WINDOW, H2PortForwardSession
    from crishim.stream.session import SessionSettings

    async def go() -> tuple[int, int, int]:
        ctx = ForwardContext(NamedNetnsRuntime(Config()))
        settings = SessionSettings(ctx, 5.0, 0.0, LogBudget(logging.getLogger("t"), 0, "%d"))
        session = H2PortForwardSession(settings, lambda chunks: None, lambda: None)
        session._window_limit = ctx.flood.session_buffer_size - DEFAULT_WINDOW
        manager = session.codec._inbound_flow_control_window_manager
        manager.window_consumed(40_000)  # received, not yet given back
        session._window_filled(40_000)  # past half the window: it grows
        return session._window_granted, manager.max_window_size, ctx.windows_granted

    granted, max_window, taken = asyncio.run(go())
    assert granted == DEFAULT_WINDOW == taken  # doubled, from the budget
    assert max_window == 2 * DEFAULT_WINDOW


def test_data_past_its_content_length_resets_its_stream_and_gives_its_window_back():
    """RFC 9113 8.1.1: DATA past a request's content-length is a stream error: RST_STREAM
    PROTOCOL_ERROR, and a StreamError event. Its bytes, which no event carries, go back to
    the connection's window: 20 such streams of 16 KiB each through a 64 KiB connection
    window, and then a well-formed one."""
    c = _client()
    server = H2Codec(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.take_output()
    wire = b""
    for i in range(21):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, REQUEST + [("content-length", "0" if i < 20 else "5")])
        wire += c.data_to_send() + DataFrame(sid, data=b"d" * (16_384 if i < 20 else 5),
                                             flags=["END_STREAM"]).serialize()
    events = server.receive_data(wire)
    errors = [e for e in events if isinstance(e, StreamError)]
    assert [e.stream_id for e in errors] == list(range(1, 40, 2))
    assert all(e.error_code == ErrorCodes.PROTOCOL_ERROR and not e.remote_reset
               and "content-length" in e.reason for e in errors)
    assert [bytes(e.data) for e in events if isinstance(e, h2.events.DataReceived)] == \
        [b"ddddd"]
    out = b"".join(bytes(p) for p in server.take_output())
    assert out.count(RstStreamFrame(1, error_code=ErrorCodes.PROTOCOL_ERROR).serialize()) == 1
