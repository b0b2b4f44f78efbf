"""WindowedSends (crishim/stream/session.py), the queues HTTP/2 and windowed SPDY sessions
keep for streams waiting on the client's windows: which streams a window update moves.
The session's codec is reduced to its windows here (stream and session send windows as
HTTP/2 and SPDY count them); the queueing logic is the sessions' own."""

from __future__ import annotations

from crishim.protocols.buffers import Outbound
from crishim.stream.session import WindowedSends


class _Pod:
    def __init__(self) -> None:
        self.resumed = 0

    def resume_pod_reading(self) -> None:
        self.resumed += 1


class _Windows(WindowedSends):
    def __init__(self, session_window: int, stream_window: int, streams: int) -> None:
        self._init_outbound()
        self.writing_paused = False
        self.lending = False  # SessionBase's: data sent is a view of a pod read
        self.connections = set()
        self.session_window = session_window
        self.windows = {sid: stream_window for sid in range(1, 2 * streams, 2)}
        self.pods = {sid: _Pod() for sid in self.windows}
        self._by_stream = self.pods  # type: ignore[assignment]
        self.tried: list[int] = []  # _send_queued calls, by stream
        self.sent: dict[int, int] = dict.fromkeys(self.windows, 0)
        self.wire = bytearray()  # the bytes sent, in order

    def _session_send_window(self) -> int:
        return self.session_window

    def _send_queued(self, stream_id: int, out: Outbound) -> bool:
        self.tried.append(stream_id)
        while out.chunks:
            n = min(self.windows[stream_id], self.session_window)
            if n <= 0:
                return False
            chunk = out.take(n)
            self.wire += chunk
            k = len(chunk)
            self.windows[stream_id] -= k
            self.session_window -= k
            self.sent[stream_id] += k
        return True

    def session_update(self, n: int) -> None:
        self.session_window += n
        self._session_window_opened()

    def stream_update(self, stream_id: int, n: int) -> None:
        self.windows[stream_id] += n
        self._window_opened(stream_id)


def _all_waiting(windows: _Windows, size: int) -> None:
    for sid in windows.windows:
        assert not windows._queue_more(sid, b"x" * size)
    windows.tried.clear()


def test_a_session_update_of_one_byte_moves_one_stream_not_every_waiting_one() -> None:
    """A client opening the session's window a byte at a time (each update earning its
    credit back with the byte it lets out) walked all 4,000 waiting streams per update:
    ~2.9 s of the event loop for 1,000 updates. Now each update tries the streams that
    stopped at the session's window in turn, only while it has room."""
    windows = _Windows(session_window=0, stream_window=1 << 20, streams=4000)
    _all_waiting(windows, 20000)
    for _ in range(1000):
        windows.session_update(1)
    assert len(windows.tried) <= 2 * 1000, len(windows.tried)
    assert sum(windows.sent.values()) == 1000
    # in turn: the first 1,000 streams got a byte each, in the order they stopped
    assert [sid for sid, n in windows.sent.items() if n] == list(windows.windows)[:1000]


def test_streams_stopped_by_their_own_window_are_left_to_their_own_update() -> None:
    windows = _Windows(session_window=1 << 30, stream_window=0, streams=1000)
    _all_waiting(windows, 100)
    windows.session_update(1 << 20)
    assert windows.tried == []  # nothing a session update can move
    windows.stream_update(7, 100)
    assert windows.tried == [7]
    assert windows.sent[7] == 100 and 7 not in windows._outbound
    assert windows.pods[7].resumed == 1  # all sent: its pod is read again


def test_a_stream_its_update_opens_while_the_session_is_spent_waits_for_the_session(
) -> None:
    windows = _Windows(session_window=0, stream_window=0, streams=3)
    _all_waiting(windows, 10)
    windows.stream_update(3, 10)  # its own window opens; the session's is spent
    assert windows.sent[3] == 0 and list(windows._session_blocked) == [1, 3, 5]
    windows.session_update(4)
    # stream 1 tried once and found its own window shut: left to its own update; 3 took
    # the 4 bytes and waits again, behind 5
    assert windows.tried == [3, 1, 3]
    assert windows.sent[3] == 4 and list(windows._session_blocked) == [5, 3]
    windows.session_update(100)  # 5's own window is shut too
    assert windows.sent == {1: 0, 3: 10, 5: 0} and 3 not in windows._outbound
    assert windows._session_blocked == {}
    assert windows.pods[3].resumed == 1


def test_session_updates_share_the_window_in_turn_and_forget_finished_streams() -> None:
    windows = _Windows(session_window=0, stream_window=1 << 20, streams=3)
    _all_waiting(windows, 10)
    for _ in range(6):
        windows.session_update(5)  # one stream's half each time, round robin
    assert windows.sent == {1: 10, 3: 10, 5: 10}
    assert windows._outbound == {} and windows._session_blocked == {}
    assert [windows.pods[sid].resumed for sid in (1, 3, 5)] == [1, 1, 1]


def test_a_stream_forgotten_while_it_waits_leaves_nothing_behind() -> None:
    windows = _Windows(session_window=0, stream_window=1 << 20, streams=2)
    _all_waiting(windows, 10)
    windows._forget_outbound(1)  # reset by the client
    assert list(windows._session_blocked) == [3]
    windows.session_update(100)
    assert windows.tried == [3] and windows.sent == {1: 0, 3: 10}


def test_settings_raising_the_windows_again_and_again_in_a_read_walk_the_streams_once(
) -> None:
    """A read of SETTINGS raising (and lowering) the initial windows: each raise walked
    every waiting stream; now the streams try once, when the read is handled."""
    windows = _Windows(session_window=1 << 30, stream_window=0, streams=1000)
    _all_waiting(windows, 10)
    for _ in range(100):
        windows._initial_windows_raised()
    assert windows.tried == []
    for sid in windows.windows:
        windows.windows[sid] += 10  # as the codec moved them
    windows._send_raised()
    assert sorted(windows.tried) == sorted(windows.windows)
    assert windows._outbound == {} and all(n == 10 for n in windows.sent.values())
    windows._send_raised()  # nothing raised since
    assert len(windows.tried) == 1000


def test_a_lent_view_is_copied_where_it_waits_for_a_window() -> None:
    """A pod read sent from the loop's read buffer (SessionBase.lending): what the window
    takes goes as it is, what waits for a window is copied, since the next read
    overwrites the buffer before the window opens."""
    windows = _Windows(session_window=1 << 20, stream_window=3, streams=1)
    buffer = bytearray(b"abcdefgh")
    windows.lending = True
    assert not windows._queue_more(1, memoryview(buffer))
    windows.lending = False
    assert bytes(windows.wire) == b"abc"
    buffer[:] = b"XXXXXXXX"  # the next read
    windows.stream_update(1, 5)
    assert bytes(windows.wire) == b"abcdefgh"
