"""Descriptor exhaustion: one session opening forwarded connections without end is refused
past max_connections_per_session, and all sessions together past max_connections (capped
by RLIMIT_NOFILE less reserved_fds), so other clients still get their upgrades served and
established connections keep working."""

from __future__ import annotations

import os
import socket

import pytest

from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient, UpgradeRefused

CANCEL = 5


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _echo(client: SpdyPortForwardClient, payload: bytes) -> None:
    fwd = client.roundtrip(ECHO_PORT, payload)
    assert bytes(fwd.received) == payload, (fwd.error_text, fwd.reset_status)


def _open_live(client: SpdyPortForwardClient, count: int) -> list:
    """count forwards to the echo server, each proven live by one echoed byte (or ended)."""
    forwards = [client.forward(ECHO_PORT) for _ in range(count)]
    for fwd in forwards:
        fwd.send(b"+")
    client.wait(lambda: all(f.received or f.reset_status is not None for f in forwards), 60)
    return forwards


def test_per_session_limit_refuses_new_streams_and_keeps_the_rest(podnet):
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--max-connections-per-session", "8") as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as greedy:
            forwards = _open_live(greedy, 12)
            live = [f for f in forwards if f.received == b"+"]
            refused = [f for f in forwards if f.reset_status is not None]
            assert len(live) == 8 and len(refused) == 4
            assert all(f.reset_status == CANCEL for f in refused)
            assert greedy.wait(lambda: all(f.error_fin for f in refused))
            # established connections keep working, the session is not ended
            for fwd in live:
                fwd.send(b"!")
            assert greedy.wait(lambda: all(f.received == b"+!" for f in live))
            # another session has its own allowance
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
                _echo(other, b"other client")
            # a finished connection frees a place
            live[0].close_write()
            assert greedy.wait(live[0].finished)
            _echo(greedy, b"room again")
        log = proc.log()
    assert "max_connections_per_session" in log
    assert "Traceback" not in log


def test_low_nofile_one_session_cannot_starve_other_clients(podnet):
    # 400 descriptors, 150 reserved: at most 250 forwarded connections in all, 125 in one
    # session
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--reserved-fds", "150",
                        "--max-unadmitted", "64", "--max-cri-connections", "16",
                        nofile=400) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as greedy:
            forwards = _open_live(greedy, 600)
            live = [f for f in forwards if f.received == b"+"]
            assert len(live) == 125, len(live)
            assert _fds(proc.proc.pid) < 400 - 50
            # other clients: upgrades served, connections forwarded
            for n in range(3):
                with SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=10) as other:
                    _echo(other, b"other %d" % n)
            for fwd in live[:50]:
                fwd.send(b"!")
            assert greedy.wait(lambda: all(f.received == b"+!" for f in live[:50]), 30)
        log = proc.log()
    assert ("RLIMIT_NOFILE 400: 250 descriptors for sessions and forwarded connections, "
            "at most 250 forwarded connections, 125 per session") in log
    assert "max_connections_per_session" in log
    assert "Traceback" not in log


def test_global_limit_refuses_streams_cleanly_and_keeps_descriptors_for_upgrades(podnet):
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--reserved-fds", "150",
                        "--max-unadmitted", "64", "--max-cri-connections", "16",
                        nofile=400) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as first, \
                SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as second:
            a = [f for f in _open_live(first, 200) if f.received == b"+"]
            b = [f for f in _open_live(second, 200) if f.received == b"+"]
            # 250 descriptors: two sessions and 248 forwarded connections
            assert len(a) == 125 and len(b) == 123, (len(a), len(b))
            # every descriptor is taken: a newcomer is answered 503 with Retry-After, from
            # the reserve, not accepted and reset
            with pytest.raises(UpgradeRefused) as refused:
                SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=10)
            assert refused.value.status == 503
            assert b"out of file descriptors" in refused.value.body
            assert "Retry-After: 1" in refused.value.head
            # finished connections make room for a session and its connection
            for fwd in a[:2]:
                fwd.close_write()
            assert first.wait(lambda: a[0].finished() and a[1].finished())
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=10) as late:
                _echo(late, b"room")
            for fwd in b[:20]:
                fwd.send(b"!")
            assert second.wait(lambda: all(f.received == b"+!" for f in b[:20]), 30)
        log = proc.log()
    assert "RLIMIT_NOFILE less reserved_fds" in log
    assert "Traceback" not in log


def test_slow_heads_on_a_full_budget_leave_descriptors_to_refuse_newcomers(podnet):
    """The connections without a token come out of the reserve too: max_unadmitted takes
    at most a quarter of the descriptors (256 -> 150 of 600) and reserved_fds covers it,
    the CRI socket's connections (64) and crishim's own (256 -> 278). With every budgeted
    descriptor taken and 256 slow request heads open, a newcomer is still answered 503 (it
    was accepted past the descriptor limit, or not at all, and reset unheard)."""
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", nofile=600) as proc:
        url = proc.port_forward_url(SANDBOX)
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as first, \
                SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as second:
            _open_live(first, 200)
            _open_live(second, 200)
            slow = []
            try:
                for _ in range(256):
                    sock = socket.create_connection((host, int(port)), timeout=10)
                    sock.sendall(b"POST /portforward/x HTTP/1.1\r\n")  # never ended
                    slow.append(sock)
                with pytest.raises(UpgradeRefused) as refused:
                    SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=10)
                assert refused.value.status == 503
                assert _fds(proc.proc.pid) < 600
            finally:
                for sock in slow:
                    sock.close()
        log = proc.log()
    assert "max_unadmitted 256 is lowered to 150: a quarter of RLIMIT_NOFILE 600" in log
    assert "reserved_fds 256 is raised to 278" in log
    assert "RLIMIT_NOFILE 600: 322 descriptors" in log
    assert "Traceback" not in log


def test_a_small_descriptor_limit_lowers_max_unadmitted_not_the_sessions(podnet):
    """RLIMIT_NOFILE 300 with the defaults: max_unadmitted 256 would take the reserve and
    leave 2 descriptors for sessions; it is lowered to a quarter (75), sessions keep 44."""
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", nofile=300) as proc:
        clients = [SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) for _ in range(5)]
        try:
            for n, client in enumerate(clients):
                _echo(client, b"session %d" % n)
        finally:
            for client in clients:
                client.close()
        log = proc.log()
    assert "max_unadmitted 256 is lowered to 75" in log
    assert "RLIMIT_NOFILE 300: 44 descriptors" in log


REFUSED_WITH_DATA = 1100  # past control_frame_burst (1,000)


def test_refused_connections_whose_first_bytes_were_in_flight_leave_the_session_alone(
        podnet):
    """A client past max_connections_per_session that sends each new connection's first
    bytes with its streams (crishim port-forward does, for UDP and for TCP): the DATA read
    with a refused stream's SYN_STREAM was charged as a frame on no connection, and 1,100
    refusals ended the session, its live connections with it."""
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--max-connections-per-session", "50") as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            live = _open_live(client, 50)
            assert all(f.received == b"+" for f in live)
            session = client.session
            for n in range(REFUSED_WITH_DATA):  # streams and data, written together
                headers = {"streamtype": "error", "port": str(ECHO_PORT),
                           "requestid": str(10_000 + n)}
                error_sid = session.open_stream(headers)
                session.end_stream(error_sid)
                data_sid = session.open_stream(dict(headers, streamtype="data"))
                session.send_data(data_sid, b"first bytes")
            client.flush()
            for fwd in live:  # the session and its connections live on
                fwd.send(b"!")
            assert client.wait(lambda: all(f.received == b"+!" for f in live), 30), \
                client.terminated_reason
            assert not client.goaway and not client.closed
        log = proc.log()
    assert "max_connections_per_session" in log
    assert "control frames" not in log and "Traceback" not in log


def test_refused_http2_connections_whose_first_bytes_were_in_flight_leave_the_session_alone(
        podnet):
    """HTTP/2: DATA that reaches crishim after it reset the stream (sent before the client
    read the reset) was charged to the control budget: ENHANCE_YOUR_CALM for the session."""
    import asyncio
    import struct

    from tests.support.h2_pf_client import H2Client

    async def main(url: str) -> None:
        client = await H2Client.connect(url, "prior")
        live = [await client.forward(ECHO_PORT) for _ in range(50)]
        conn, refused = client.conn, []
        # as many as MAX_CONCURRENT_STREAMS lets the client open at once (2 x 50 + 8), again
        # as the refusals free them
        for _ in range(400):
            if len(refused) >= REFUSED_WITH_DATA:
                break
            while len(refused) < REFUSED_WITH_DATA and conn.open_outbound_streams + 2 <= \
                    conn.remote_settings.max_concurrent_streams:
                headers = client.request_headers(streamtype="error", port=str(ECHO_PORT),
                                                 requestid=str(10_000 + len(refused)))
                conn.send_headers(conn.get_next_available_stream_id(), headers,
                                  end_stream=True)
                data_sid = conn.get_next_available_stream_id()
                conn.send_headers(data_sid, [(k, "data" if k == "streamtype" else v)
                                             for k, v in headers])
                refused.append(data_sid)
            client.flush()
            await asyncio.sleep(0.02)
        assert len(refused) == REFUSED_WITH_DATA
        # each refused connection's first bytes, as if sent before its reset arrived
        payload = b"first bytes"
        client.write_raw(b"".join(struct.pack(">I", len(payload))[1:] + bytes([0, 0])
                                  + struct.pack(">I", sid) + payload for sid in refused))
        for fwd in live:
            await fwd.write(b"still here", end_stream=True)
        for fwd in live:
            assert await fwd.read_all(timeout=30) == b"still here"
        await client.close()

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--max-connections-per-session", "50") as proc:
        asyncio.run(main(proc.port_forward_url(SANDBOX)))
        log = proc.log()
    assert "max_connections_per_session" in log
    assert "control frames" not in log and "Traceback" not in log


def test_http2_uploads_in_flight_when_their_pods_reset_leave_the_session_alone(podnet):
    """Three uploads whose pods reset at the first byte while the client, within every
    window, goes on sending the rest of each stream's window in 8 KiB frames before the
    reset reaches it (a path's latency): 1,000-1,533 frames on streams crishim reset. A credit of
    16 frames per reset charged the rest and ended the session; now what may be in flight
    is free: each stream's window at the reset, in frames of up to 16 KiB, and the rest
    (frames smaller than that) is within the control budget."""
    import asyncio

    from tests.support.h2_pf_client import H2Client
    from tests.support.podnet import RESET_PORT, SINK_PORT

    frame = 8 << 10

    async def main(url: str) -> tuple[str, int]:
        client = await H2Client.connect(url, "prior")
        # the connection's window grows from 64 KiB as it is filled: grown first, so that
        # much can be in flight when the resets come
        warm = await client.forward(SINK_PORT)
        await asyncio.wait_for(warm.write(b"w" * (48 << 20), end_stream=True), 60)
        assert (await warm.read_all(60)).startswith(b"%d " % (48 << 20))
        uploads = [await client.forward(RESET_PORT) for _ in range(3)]
        client._task.cancel()  # read nothing meanwhile: the resets are "in flight"
        await asyncio.sleep(0.05)
        late = 0
        for fwd in uploads:  # the first bytes: each pod resets on them
            client.conn.send_data(fwd.data_id, b"u" * frame)
        client.flush()
        await asyncio.sleep(0.3)  # crishim has reset the streams; the client has not read it
        for fwd in uploads:  # 8 KiB frames: 511 a stream after the first
            window = client.conn.local_flow_control_window(fwd.data_id)
            while window >= frame:
                client.conn.send_data(fwd.data_id, b"u" * frame)
                window -= frame
                late += 1
            client.flush()
            await client.writer.drain()
        data = b""  # what the server sent meanwhile: resets, window, a GOAWAY?
        try:
            while True:
                chunk = await asyncio.wait_for(client.reader.read(1 << 20), 1.5)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        ended = ""
        for ev in client.conn.receive_data(data):
            if type(ev).__name__ == "ConnectionTerminated":
                ended = str(ev.error_code)
        client.writer.close()
        return ended, late

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}") as proc:
        ended, late = asyncio.run(main(proc.port_forward_url(SANDBOX)))
        assert echo_on_a_new_session(proc)
        log = proc.log()
    assert late >= 1000, late  # 3 streams' windows, less what the connection's held back
    assert ended == "", ended  # no GOAWAY: the session lives
    assert "control frames" not in log and "Traceback" not in log


def echo_on_a_new_session(proc: CrishimProcess) -> bool:
    with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
        fwd = other.roundtrip(ECHO_PORT, b"served")
        return bytes(fwd.received) == b"served"
