"""SPDY/3.1 flow control in the codec, for the peers that ask for it (docs/protocol.md
8.6): off by default (spdystream ignores windows), enforced after enforce_send_windows."""

from __future__ import annotations

from crishim.protocols import spdy
from crishim.protocols.buffers import Outbound


def _pair() -> tuple[spdy.SpdyConnection, spdy.SpdyConnection]:
    client = spdy.SpdyConnection(spdy.SpdyConfig(client=True))
    server = spdy.SpdyConnection(spdy.SpdyConfig(client=False, max_send_frame=16384))
    return client, server


def _deliver(src: spdy.SpdyConnection, dst: spdy.SpdyConnection) -> list[spdy.Event]:
    return dst.receive_data(src.data_to_send())


def _stream(client: spdy.SpdyConnection, server: spdy.SpdyConnection) -> int:
    sid = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    server.reply(sid)
    return sid


def _received(events: list[spdy.Event], sid: int) -> int:
    return sum(len(e.data) for e in events
               if isinstance(e, spdy.DataReceived) and e.stream_id == sid)


def test_windows_are_not_counted_unless_enforced():
    client, server = _pair()
    sid = _stream(client, server)
    assert not server.send_windows_enforced
    assert server.send_window(sid) == spdy.MAX_WINDOW
    server.send_data(sid, b"x" * (1 << 20))  # far past 64 KiB: nothing waits
    assert _received(_deliver(server, client), sid) == 1 << 20


def test_send_queued_stops_at_the_window_and_goes_on_with_window_updates():
    client, server = _pair()
    sid = _stream(client, server)
    server.enforce_send_windows(40000)
    out = Outbound()
    out.append(b"a" * 100000)
    out.eof = True
    assert not server.send_queued(sid, out)  # 40,000 of the stream's window
    assert out.size == 60000
    assert server.send_window(sid) == 0
    events = _deliver(server, client)
    assert _received(events, sid) == 40000
    assert not any(isinstance(e, spdy.DataReceived) and e.fin for e in events)
    client.send_window_update(sid, 70000)  # the session's 64 KiB is now the smaller
    events = _deliver(client, server)
    assert [type(e) for e in events] == [spdy.WindowUpdateReceived]
    assert server.send_window(sid) == spdy.INITIAL_SESSION_WINDOW - 40000
    assert not server.send_queued(sid, out)
    assert _received(_deliver(server, client), sid) == spdy.INITIAL_SESSION_WINDOW - 40000
    client.send_window_update(0, 1 << 20)
    _deliver(client, server)
    assert server.send_queued(sid, out)  # the rest, and the end with it
    events = _deliver(server, client)
    assert _received(events, sid) == 100000 - spdy.INITIAL_SESSION_WINDOW
    assert any(isinstance(e, spdy.DataReceived) and e.fin for e in events)


def test_the_session_window_is_counted_before_windows_are_enforced():
    """A client raises the session window in the same read as the SETTINGS that asks for
    windows: the codec has seen the update before the session enforces them."""
    client, server = _pair()
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    client.send_window_update(0, 1 << 20)
    sid = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    server.enforce_send_windows(1 << 20)  # streams open already take it too
    assert server.send_window(sid) == 1 << 20  # not the session's 64 KiB


def test_a_new_initial_window_moves_every_stream_by_the_difference():
    client, server = _pair()
    sid = _stream(client, server)
    client.send_window_update(0, 1 << 20)
    _deliver(client, server)
    server.enforce_send_windows(50000)
    server.send_data(sid, b"b" * 30000)
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 10000})
    _deliver(client, server)
    assert server.send_window(sid) == 10000 - 30000  # below zero: wait for updates
    later = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    assert server.send_window(later) == 10000


def test_a_stream_window_past_2_31_resets_that_stream_only():
    client, server = _pair()
    sid = _stream(client, server)
    other = _stream(client, server)
    server.enforce_send_windows(spdy.INITIAL_WINDOW)
    client.send_window_update(sid, spdy.MAX_WINDOW)
    events = _deliver(client, server)
    assert [(type(e), getattr(e, "status", None)) for e in events] == [
        (spdy.StreamError, spdy.FLOW_CONTROL_ERROR)]
    assert not server.is_stream_open(sid)
    assert server.is_stream_open(other) and not server.terminated


def test_a_session_window_past_2_31_ends_the_session_only_when_enforced():
    client, server = _pair()
    _stream(client, server)
    for _ in range(3):  # counted, capped, harmless while windows are not enforced
        client.send_window_update(0, spdy.MAX_WINDOW)
    _deliver(client, server)
    assert not server.terminated
    client, server = _pair()
    _stream(client, server)
    server.enforce_send_windows(spdy.INITIAL_WINDOW)
    client.send_window_update(0, spdy.MAX_WINDOW)
    events = _deliver(client, server)
    assert server.terminated
    assert isinstance(events[-1], spdy.SessionTerminated)


def test_updates_past_the_credit_are_still_applied_when_enforced():
    """An update the credit does not cover is charged (FrameIgnored) but never dropped:
    a dropped one would stall its stream for good."""
    client, server = _pair()
    sid = _stream(client, server)
    server.enforce_send_windows(0)
    for _ in range(40):  # 16 free before any DATA was sent
        client.send_window_update(sid, 1)
    events = _deliver(client, server)
    assert sum(isinstance(e, spdy.WindowUpdateReceived) for e in events) == 40
    assert sum(isinstance(e, spdy.FrameIgnored) for e in events) == 40 - 16
    assert server.send_window(sid) == 40


def test_an_offer_turns_windows_on_at_the_settings_frame_itself():
    """Frames read with the SETTINGS that asks (streams, their updates) are already under
    the windows: the session would learn of the SETTINGS only after the whole read."""
    client, server = _pair()
    server.offer_send_windows()
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    sid = client.open_stream({"streamtype": "data"})
    client.send_window_update(sid, spdy.MAX_WINDOW)  # past 2^31-1 from 1,000
    events = _deliver(client, server)
    assert server.send_windows_enforced
    assert [type(e) for e in events] == [spdy.SettingsReceived, spdy.StreamOpened,
                                         spdy.StreamError]


def test_windows_asked_for_late_or_unoffered_stay_off():
    client, server = _pair()
    server.offer_send_windows()
    _stream(client, server)
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    _deliver(client, server)
    assert not server.send_windows_enforced  # after the first stream
    client, server = _pair()
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    _deliver(client, server)
    assert not server.send_windows_enforced  # never offered (kubectl's sessions)
    client, server = _pair()
    server.offer_send_windows()
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: spdy.MAX_WINDOW + 1})
    _deliver(client, server)
    assert not server.send_windows_enforced  # not a window


def _windowed_pair(window: int) -> tuple[spdy.SpdyConnection, spdy.SpdyConnection, int]:
    """A server that offered windows, with `window` of its own per stream, and a client
    that asked: one stream open."""
    client, server = _pair()
    server.offer_send_windows(receive_window=window)
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    sid = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    assert server.receive_windows_enforced
    return client, server, sid


def test_data_past_a_streams_receive_window_resets_that_stream():
    client, server, sid = _windowed_pair(1000)
    client.send_data(sid, b"a" * 1000)
    assert _received(_deliver(client, server), sid) == 1000  # exactly the window
    client.send_data(sid, b"b")
    events = _deliver(client, server)
    assert [(type(e), e.status) for e in events] == [(spdy.StreamError,
                                                      spdy.FLOW_CONTROL_ERROR)]
    assert not server.terminated
    # the dropped byte's session window went back by itself; the stream's 1,000 did not
    out = server.data_to_send()
    assert _window_updates(client, out) == [(0, 1)]


def _window_updates(client: spdy.SpdyConnection, out: bytes) -> list[tuple[int, int]]:
    return [(e.stream_id, e.delta) for e in client.receive_data(out)
            if isinstance(e, spdy.WindowUpdateReceived)]


def test_given_back_windows_take_more_data_and_the_session_window_holds_too():
    client, server, sid = _windowed_pair(1000)
    client.send_data(sid, b"a" * 1000)
    _deliver(client, server)
    server.send_window_update(sid, 1000)  # the pod took it
    client.send_data(sid, b"b" * 1000)
    assert _received(_deliver(client, server), sid) == 1000
    # the session's window is 64 KiB (not raised here): 2,000 of it used
    other = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    server.send_window_update(other, spdy.INITIAL_SESSION_WINDOW)
    client.send_data(other, b"c" * (spdy.INITIAL_SESSION_WINDOW - 2000))
    assert not server.terminated and _deliver(client, server)
    client.send_data(other, b"d")
    events = _deliver(client, server)
    assert server.terminated and isinstance(events[-1], spdy.SessionTerminated)
    assert "session's receive window" in events[-1].reason


def test_data_for_a_stream_gone_gives_its_session_window_back():
    client, server, sid = _windowed_pair(1 << 20)
    server.reset_stream(sid)
    server.data_to_send()
    client.send_data(sid, b"late" * 100)  # sent before it learned of the reset
    assert _deliver(client, server) == []
    assert _window_updates(client, server.data_to_send()) == [(0, 400)]


def test_the_rest_of_a_frame_whose_stream_died_within_it_gives_its_window_back():
    """A stream reset while one of its DATA frames was still arriving: the rest of the
    frame was dropped without giving its session window back, so every upload to a pod
    that reset kept a little of it (~280 of them left the session's 16 MiB at 0)."""
    client, server, sid = _windowed_pair(1 << 20)
    client.send_data(sid, b"a" * 1000)
    frame = client.data_to_send()
    assert _received(server.receive_data(frame[:508]), sid) == 500  # 8-byte header
    server.reset_stream(sid)  # the pod reset meanwhile
    server.data_to_send()
    assert server.receive_data(frame[508:]) == []
    assert _window_updates(client, server.data_to_send()) == [(0, 500)]


def test_a_session_that_counts_receive_windows_gives_back_what_it_drops_by_itself():
    """crishim port-forward counts its receive windows where it asks for windows: a
    download whose connection it reset meanwhile gave its session window back only for
    what it took (~270 such resets stalled the session). Against a server without
    windows it counts none."""
    client, server = _pair()
    client.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20})
    client.enforce_receive_windows(1 << 20)
    sid = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    server.reply(sid)
    client.reset_stream(sid)
    client.data_to_send()
    server.send_data(sid, b"x" * 3000)  # in flight when the reset left
    assert client.receive_data(server.data_to_send()) == []
    assert _window_updates(server, client.data_to_send()) == [(0, 3000)]
    client.stop_receive_windows()
    other = client.open_stream({"streamtype": "data"})
    _deliver(client, server)
    server.reply(other)
    server.send_data(other, b"y" * (spdy.INITIAL_SESSION_WINDOW + 1))  # no window kept
    assert _received(_deliver(server, client), other) == spdy.INITIAL_SESSION_WINDOW + 1
    assert not client.terminated
