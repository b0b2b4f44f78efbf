"""SPDY/3.1 flow control where the client asks for it (docs/protocol.md 8.6): on
portforward.crishim.dev/v1, a SETTINGS_INITIAL_WINDOW_SIZE before the first stream makes
crishim serve honour the client's stream and session windows, so one connection whose
reader stops holds back only its own stream; kubectl's sessions (portforward.k8s.io)
keep ignoring windows, as spdystream expects."""

from __future__ import annotations

import asyncio
import hashlib

from crishim.protocols import spdy
from crishim.protocols.constants import (
    FLOW_CONTROL_WINDOWS,
    HEADER_FLOW_CONTROL,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
)
from tests.support import SANDBOX, status_mib
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT, SINK_PORT, SOURCE_PORT, source_bytes
from tests.support.spdy_pf_client import SpdyPortForwardClient
from tests.support.standin import free_port

WINDOW = 64 * 1024
SIZE = 1 << 20
BOTH = (PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL)


def _client(crishim, versions=BOTH, window: int | None = WINDOW,
            session_window: int = 0) -> SpdyPortForwardClient:
    client = SpdyPortForwardClient(crishim.port_forward_url(SANDBOX), versions=versions)
    if window is not None:
        client.session.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: window})
    if session_window:
        client.session.send_window_update(0, session_window)
    client.flush()
    return client


def _download(client: SpdyPortForwardClient, size: int = SIZE):
    fwd = client.forward(SOURCE_PORT)
    fwd.send(f"{size}\n".encode())
    return fwd


def test_a_client_that_asks_gets_its_windows_honoured(crishim):
    with _client(crishim, session_window=WINDOW) as client:  # 128 KiB for the session
        fwd = _download(client)
        assert client.wait(lambda: len(fwd.received) >= WINDOW)
        assert fwd.reply_headers[fwd.data_sid].get(HEADER_FLOW_CONTROL) == FLOW_CONTROL_WINDOWS
        # the stream's window is spent: nothing more comes until it is given back
        assert not client.wait(lambda: len(fwd.received) > WINDOW, timeout=0.5)
        # the session goes on meanwhile: another connection's echo comes back
        echo = client.forward(ECHO_PORT)
        echo.send(b"beside a stalled stream")
        assert client.wait(lambda: echo.received == b"beside a stalled stream")
        # the stream's window given back, but not the session's: what the first 64 KiB
        # and the echo left of the session's 128 KiB is all that may come
        client.session.send_window_update(fwd.data_sid, WINDOW)
        client.flush()
        session_left = spdy.INITIAL_SESSION_WINDOW + WINDOW - WINDOW - len(echo.received)
        assert session_left > 0
        assert client.wait(lambda: len(fwd.received) >= WINDOW + session_left)
        assert not client.wait(lambda: len(fwd.received) > WINDOW + session_left,
                               timeout=0.5)
        # both given back in full: the rest comes, every byte, and the end
        client.session.send_window_update(0, 4 * SIZE)
        client.session.send_window_update(fwd.data_sid, SIZE)
        client.flush()
        assert client.wait(fwd.data_done)
        assert fwd.reset_status is None
        assert hashlib.sha256(fwd.received).digest() == hashlib.sha256(
            source_bytes(SIZE)).digest()


def test_upstream_clients_keep_windows_ignored(crishim):
    """portforward.k8s.io (kubectl, crictl): a SETTINGS frame changes nothing, as before."""
    with _client(crishim, versions=(PORTFORWARD_PROTOCOL,)) as client:
        fwd = _download(client)
        assert client.wait(fwd.data_done, timeout=20)
        assert len(fwd.received) == SIZE
        assert HEADER_FLOW_CONTROL not in fwd.reply_headers[fwd.data_sid]


def test_windows_are_asked_for_before_the_first_stream_or_not_at_all(crishim):
    with _client(crishim, window=None) as client:
        first = _download(client)
        client.session.send_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: WINDOW})
        client.flush()
        second = _download(client)
        assert client.wait(lambda: first.data_done() and second.data_done(), timeout=20)
        assert len(first.received) == len(second.received) == SIZE
        assert HEADER_FLOW_CONTROL not in second.reply_headers[second.data_sid]


def _reset_alone(client: SpdyPortForwardClient, fwd) -> None:
    """fwd's stream is reset FLOW_CONTROL_ERROR, and the session goes on."""
    assert client.wait(lambda: fwd.reset_status is not None)
    assert fwd.reset_status == spdy.FLOW_CONTROL_ERROR
    echo = client.forward(ECHO_PORT)
    echo.send(b"the session goes on")
    assert client.wait(lambda: echo.received == b"the session goes on")
    assert not client.goaway


def test_a_window_past_2_31_resets_its_stream_and_the_session_goes_on(crishim):
    with _client(crishim, session_window=4 * SIZE) as client:
        fwd = client.forward(SOURCE_PORT)  # its window is still the whole 64 KiB
        client.session.send_window_update(fwd.data_sid, spdy.MAX_WINDOW)
        client.flush()
        _reset_alone(client, fwd)


STREAM_RECV_WINDOW = 4 << 20  # a quarter of session_buffer_size (16 MiB), as HTTP/2's


def test_the_server_announces_its_own_windows_before_any_reply(crishim):
    """Upload too: crishim serve's streams take 4 MiB each, announced before the first
    reply; its session's window starts at SPDY's 64 KiB and grows towards 16 MiB as the
    client fills it, each step from the buffer budget (taken whole at once, sessions that
    never sent a byte spent the budget)."""
    with _client(crishim) as client:
        client.session.enforce_send_windows(spdy.INITIAL_WINDOW)  # SPDY's, until told
        fwd = client.forward(SINK_PORT)
        assert client.wait(lambda: fwd.data_sid in fwd.replied)
        assert client.session.peer_settings[spdy.SETTINGS_INITIAL_WINDOW_SIZE] == \
            STREAM_RECV_WINDOW
        assert client.session.session_send_window == spdy.INITIAL_SESSION_WINDOW
        size = 32 << 20
        sent, grew = 0, 0
        while sent < size:
            room = min(client.session.send_window(fwd.data_sid), size - sent)
            if room > 0:
                fwd.send(b"u" * room)
                sent += room
            assert client.wait(lambda: client.session.send_window(fwd.data_sid) > 0)
            grew = max(grew, client.session.session_send_window)
        assert grew > STREAM_RECV_WINDOW  # past 4 MiB: it grew from 64 KiB
        fwd.close_write()
        assert client.wait(lambda: fwd.received.endswith(b"\n"), timeout=30)
        assert bytes(fwd.received).startswith(f"{size} ".encode())


class _NeverReads(asyncio.Protocol):
    def connection_made(self, transport):
        transport.pause_reading()


def test_a_client_past_a_streams_window_loses_that_stream_not_the_session(crishim, podnet):
    """A client that ignores crishim serve's windows and floods a pod that never reads:
    past the stream's window (and what the pod's sockets took) that stream is reset
    FLOW_CONTROL_ERROR; the session and its other connections go on."""
    port = free_port()
    podnet.listen_extra("127.0.0.1", port, _NeverReads)
    with _client(crishim) as client:
        # the session's window kept to (it grows as it is filled; past it, the session
        # ends GOAWAY, as SPDY has it), the stream's not
        client.session.enforce_send_windows(spdy.INITIAL_WINDOW)
        fwd = client.forward(port)
        assert client.wait(lambda: fwd.data_sid in fwd.replied)
        for _ in range(2000):
            if fwd.reset_status is not None:
                break
            room = min(client.session.session_send_window, 1 << 20)
            if room > 0:
                fwd.send(b"x" * room)
            client.wait(lambda: fwd.reset_status is not None
                        or client.session.session_send_window > 0, timeout=0.05)
        _reset_alone(client, fwd)


def test_data_sent_before_the_servers_settings_arrive_is_not_past_its_window(podnet):
    """With the budget spent crishim's streams take 16 KiB, but a client may send SPDY's
    64 KiB before that SETTINGS reaches it (SPDY acknowledges no SETTINGS): 60 KiB sent
    with the ask, before reading anything, reset the stream FLOW_CONTROL_ERROR (seen under
    load in CI as a reset local connection)."""
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--buffer-budget", "1") as proc:
        with _client(proc) as client:
            fwd = client.forward(SINK_PORT)
            payload = bytes(range(256)) * 240  # 60 KiB, within SPDY's initial window
            fwd.send(payload)
            fwd.close_write()
            assert client.wait(fwd.finished, timeout=20)
            assert fwd.reset_status is None, fwd.reset_status
            assert bytes(fwd.received) == \
                f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
            # announced as 16 KiB all the same: a client that has it keeps to that
            assert client.session.peer_settings[spdy.SETTINGS_INITIAL_WINDOW_SIZE] == \
                spdy.INITIAL_SESSION_WINDOW // 4


def test_streams_out_of_window_hold_a_small_pod_read_each(podnet):
    """As over HTTP/2: once a stream's window is spent, its last pod read waits in its
    queue; a read is no larger than the window takes (at least 16 KiB), where a whole
    1 MiB buffer each held ~100 MiB for 100 streams given 1.5 MiB and then nothing."""
    size, streams, first = 4 * SIZE, 100, 3 * SIZE // 2
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}") as proc:
        with _client(proc, window=0, session_window=spdy.MAX_WINDOW - 65536) as client:
            echo = client.forward(ECHO_PORT)
            client.session.send_window_update(echo.data_sid, 1024)
            before = status_mib(proc.proc.pid)
            fwds = [_download(client, size) for _ in range(streams)]
            for fwd in fwds:
                client.session.send_window_update(fwd.data_sid, first)
            client.flush()
            assert client.wait(lambda: all(len(f.received) == first for f in fwds),
                               timeout=60)
            client.wait(lambda: False, timeout=1)  # the pods' next reads meanwhile
            grown = status_mib(proc.proc.pid) - before
            assert grown < 40, f"{grown:.1f} MiB held for {streams} streams out of window"
            echo.send(b"meanwhile")  # the session goes on
            for fwd in fwds:
                client.session.send_window_update(fwd.data_sid, size - first)
            client.flush()
            assert client.wait(lambda: echo.received == b"meanwhile")
            assert client.wait(lambda: all(f.data_done() for f in fwds), timeout=60)
            expected = hashlib.sha256(source_bytes(size)).digest()
            for fwd in fwds:
                assert hashlib.sha256(fwd.received).digest() == expected


def test_idle_windowed_sessions_take_nothing_from_the_buffer_budget(podnet):
    """10 sessions with windows that forwarded a few bytes and went idle: each took
    session_buffer_size (8 MiB here) of the 24 MiB budget when it announced its windows,
    so three spent it and a channel session holding 6 MiB after them was closed 1013."""
    from tests.integration.test_transport_websocket import (
        _PONG,
        _budget_session,
        _hold_unfinished,
    )

    mib = 1 << 20
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--buffer-budget", str(24 * mib),
                        "--session-buffer-size", str(8 * mib)) as proc:
        idle = []
        try:
            for _ in range(10):
                client = _client(proc)
                idle.append(client)
                echo = client.forward(ECHO_PORT)
                echo.send(b"admitted")
                assert client.wait(lambda echo=echo: echo.received == b"admitted")
                assert echo.reply_headers[echo.data_sid].get(HEADER_FLOW_CONTROL) == \
                    FLOW_CONTROL_WINDOWS
            channel = _budget_session(proc)
            assert _PONG in _hold_unfinished(channel, 6 * mib)
            assert channel.closed is None
            channel.close()
        finally:
            for client in idle:
                client.close()
        assert "buffer budget" not in proc.log()


def test_the_session_window_grows_under_small_reads(crishim):
    """A client whose DATA reaches crishim 8 KiB a read (paced, as over a slow link): the
    session's window grows as it is filled. On what one read left it never grew (given
    back by quarters, it never fell below half): 64 KiB a round trip for good."""
    with _client(crishim) as client:
        client.session.enforce_send_windows(spdy.INITIAL_WINDOW)
        fwd = client.forward(SINK_PORT)
        assert client.wait(lambda: fwd.data_sid in fwd.replied)
        grew, sent = 0, 0
        while sent < 4 << 20 and grew <= 1 << 20:
            if client.session.send_window(fwd.data_sid) >= 8192:
                fwd.send(b"p" * 8192)
                sent += 8192
            client.wait(lambda: False, timeout=0.0005)  # paced: a read each
            grew = max(grew, client.session.session_send_window)
        assert grew > 1 << 20, (grew, sent)
        fwd.close_write()
        assert client.wait(lambda: fwd.received.endswith(b"\n"), timeout=30)
        assert bytes(fwd.received).startswith(f"{sent} ".encode())
