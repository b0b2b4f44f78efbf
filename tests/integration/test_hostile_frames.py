"""SPDY frames that cost crishim more than their bytes: tiny frames, header blocks that
inflate, settings, long request ids, odd flags. One client's input may cost it its own
session, never another client's turn, the server's memory or its log.

- a read is decoded for at most `read_turn` before the other sessions get theirs, and one
  codec call does a bounded share of frames and inflated header bytes (the rest waits);
- frames that make crishim work without forwarding a byte are charged to the control
  budget: HEADERS, unknown control frames, a second GOAWAY, DATA on a stream carrying no
  connection, empty DATA frames that neither end nor dial a stream;
- what a session keeps is bounded: only SPDY's own settings ids, request ids of at most
  128 characters;
- a unidirectional stream is refused as a protocol error, and a half-close sent with the
  SYN_STREAM or a HEADERS frame reaches the pod."""

from __future__ import annotations

import socket
import struct
import threading
import time

from crishim.protocols.spdy import CANCEL, PROTOCOL_ERROR
from tests.integration.test_hostile_flood import (
    SPDY_GOAWAY_PROTOCOL_ERROR,
    _flood_reading,
    _rss_mib,
    _second_client_is_served,
    _serve,
    _spdy_goaways,
    _spdy_ping,
    _warm,
)
from tests.support import SANDBOX, status_mib
from tests.support.podnet import ECHO_PORT, SINK_PORT
from tests.support.spdy_pf_client import Forward, SpdyPortForwardClient

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8003, frame_type, (flags << 24) | len(payload)) + payload


def _syn_stream(client: SpdyPortForwardClient, stream_id: int, headers: dict[str, str],
                flags: int = 0) -> bytes:
    """A SYN_STREAM with any flags, its block from the client's own compression context."""
    block = client.session.encode_headers(headers)
    return _control(1, flags, struct.pack(">IIH", stream_id, 0, 0) + block)


def _headers_frame(client: SpdyPortForwardClient, stream_id: int, headers: dict[str, str],
                   flags: int = 0) -> bytes:
    return _control(8, flags, struct.pack(">I", stream_id)
                    + client.session.encode_headers(headers))


def _opened(client: SpdyPortForwardClient, port: int) -> Forward:
    fwd = client.forward(port)
    assert client.wait(lambda: len(fwd.replied) == 2, 10)
    return fwd


def test_a_flood_of_tiny_frames_waits_its_turn(podnet):
    """16 MiB of legitimate 1-byte DATA frames (1.9 million frames, seconds of decoding)
    then a PING on one session; meanwhile another client opens a session and echoes. It
    is answered while the flood is still being decoded: the flooder's PING has no answer
    yet. (Before read turns, one session's reads were decoded back to back, 32 MiB at a
    time, and every other client waited for the whole flood: 8-10 s in the probe.)"""
    with _serve(podnet) as proc:
        a = SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=60)
        fwd = _opened(a, SINK_PORT)
        frame = struct.pack(">II", fwd.data_sid, 1) + b"x"
        flood = frame * (16 * 1024 * 1024 // len(frame)) + _spdy_ping(1)
        sent = [0]

        def send() -> None:
            view = memoryview(flood)
            try:
                while view:
                    n = a.sock.send(view[:1 << 20])
                    sent[0] += n
                    view = view[n:]
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while sent[0] < 4 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent[0] >= 4 << 20  # the server is busy with the flood
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX), timeout=60) as b:
            echoed = b.roundtrip(ECHO_PORT, b"my turn", timeout=60)
        assert bytes(echoed.received) == b"my turn", (echoed.error_text, echoed.reset_status)
        try:
            early = a.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, TimeoutError):  # nothing there (a timeout socket says so)
            early = b""
        progress = sent[0]
        a.sock.close()
        sender.join(30)
        log = proc.log()
    print(f"the other client was served with {progress} of {len(flood)} bytes of the "
          "flood sent")
    assert early == b"", "the flood's PING was answered before the other client's echo"
    assert "Traceback" not in log


def test_spdy_header_blocks_that_inflate_are_charged_and_bounded(podnet):
    """HEADERS frames of ~300 bytes that each inflate to 255 KiB: the session ends at the
    control budget, and what the server held meanwhile stays bounded (one read's blocks
    were all inflated and kept at once: +600 MiB for 1 MiB of them in the probe)."""
    with _serve(podnet, "--control-frame-burst", "200") as proc:
        before = _warm(proc)
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        fwd = _opened(client, ECHO_PORT)
        bomb = {"x-pad": "a" * (255 * 1024)}
        # well past the control burst before the unit repeats (which breaks the
        # compression context: a repeat would end the session for that instead)
        frames = b"".join(_headers_frame(client, fwd.data_sid, bomb) for _ in range(600))
        assert len(frames) < 600 * 1024  # each block is a few hundred bytes on the wire
        sent, answer = _flood_reading(client.sock, frames, 4 << 20)
        peak = _peak_mib(proc.proc.pid)
        _second_client_is_served(proc)
        log = proc.log()
    print(f"sent {sent} bytes of HEADERS, read {len(answer)}, peak RSS {peak:.0f} MiB "
          f"(warm {before:.0f} MiB)")
    assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR]
    assert "HEADERS" in log and "control_frames_per_second" in log
    assert peak - before < 128, (peak, before)
    assert "Traceback" not in log


def _peak_mib(pid: int) -> float:
    return status_mib(pid, "VmHWM")


def test_spdy_settings_keep_only_spdys_own_ids(podnet):
    """SETTINGS frames of distinct ids: the session keeps SPDY's 8 ids, not every one sent
    (4 million were +1.7 GiB in the probe, for as long as the session lived). A frame may
    carry at most 64 entries: one of 40,000 (320 KiB, 5-10 ms of Python each) ends its
    session, and only that one."""
    with _serve(podnet) as proc:
        before = _warm(proc)
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            entries = 64
            for n in range(1000):
                payload = struct.pack(">I", entries) + b"".join(
                    struct.pack(">II", n * entries + i + 1, i) for i in range(entries))
                client.sock.sendall(_control(4, 0, payload))
            fwd = client.roundtrip(ECHO_PORT, b"after the settings")
            assert bytes(fwd.received) == b"after the settings"
            grown = _rss_mib(proc.proc.pid) - before
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as flooder, \
                SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as bystander:
            entries = 40_000
            flooder.sock.sendall(_control(4, 0, struct.pack(">I", entries) + b"".join(
                struct.pack(">II", i + 1, i) for i in range(entries))))
            assert flooder.wait(lambda: flooder.goaway)
            fwd = bystander.roundtrip(ECHO_PORT, b"another session")
            assert bytes(fwd.received) == b"another session"
        log = proc.log()
    print(f"RSS +{grown:.1f} MiB with the session still open")
    assert grown < 32, grown
    assert "Traceback" not in log


def test_spdy_a_long_request_id_is_refused_and_never_logged_whole(podnet):
    with _serve(podnet) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            long_id = "7" * 200_000
            fwd = client.forward(ECHO_PORT, request_id=long_id)  # type: ignore[arg-type]
            assert client.wait(lambda: fwd.error_reset_status == PROTOCOL_ERROR
                               and fwd.reset_status == PROTOCOL_ERROR, 10), \
                (fwd.error_reset_status, fwd.reset_status)
            ok = client.roundtrip(ECHO_PORT, b"the session lives on")
            assert bytes(ok.received) == b"the session lives on"
        log = proc.log()
    assert "a requestid of 200000 characters (at most 128)" in log
    assert max(len(line) for line in log.splitlines()) < 2000
    assert "Traceback" not in log


def _resets(data: bytes) -> list[tuple[int, int]]:
    """(stream id, status) of every RST_STREAM in raw SPDY frames."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        word, flags_length = struct.unpack_from(">II", data, pos)
        length = flags_length & 0xFFFFFF
        if word & 0x80000000 and word & 0xFFFF == 3 and pos + 16 <= len(data):
            out.append(struct.unpack_from(">II", data, pos + 8))
        pos += 8 + length
    return out


def test_spdy_a_unidirectional_stream_is_refused_as_a_protocol_error(podnet):
    """(It was answered with SYN_REPLY, which cannot go on a unidirectional stream: the
    session's "stream failed" bug path, RST INTERNAL_ERROR, an ERROR line.)"""
    with _serve(podnet) as proc:
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        headers = {"streamtype": "data", "port": str(ECHO_PORT), "requestid": "5"}
        client.sock.sendall(_syn_stream(client, 1, headers, FLAG_UNIDIRECTIONAL))
        client.sock.settimeout(10)
        answer = b""
        while len(answer) < 16:
            chunk = client.sock.recv(65536)
            assert chunk, answer
            answer += chunk
        client.sock.close()
        assert _resets(answer) == [(1, PROTOCOL_ERROR)]
        _second_client_is_served(proc)
        log = proc.log()
    assert "refusing stream 1: it is unidirectional" in log
    assert "ERROR" not in log and "Traceback" not in log


def _pair_ending_on_open(client: SpdyPortForwardClient, request_id: str) -> Forward:
    """As client-go opens a pair, but the data stream's SYN_STREAM carries FIN."""
    headers = {"streamtype": "error", "port": str(ECHO_PORT), "requestid": request_id}
    error_sid = client.session.open_stream(headers)
    client.session.end_stream(error_sid)
    data_sid = client.session.open_stream(dict(headers, streamtype="data"), fin=True)
    fwd = Forward(client, ECHO_PORT, request_id, error_sid, data_sid)  # type: ignore[arg-type]
    client._by_sid[error_sid] = (fwd, "error")
    client._by_sid[data_sid] = (fwd, "data")
    client.flush()
    return fwd


def _data_stream_first(client: SpdyPortForwardClient, request_id: int, before) -> Forward:
    """A pair whose data stream comes first: before(data stream id) acts on it, read by
    the server before the error stream comes."""
    headers = {"streamtype": "data", "port": str(ECHO_PORT), "requestid": str(request_id)}
    data_sid = client.session.open_stream(headers)
    before(data_sid)
    client.flush()
    time.sleep(0.2)
    error_sid = client.session.open_stream(dict(headers, streamtype="error"))
    client.session.end_stream(error_sid)
    fwd = Forward(client, ECHO_PORT, request_id, error_sid, data_sid)
    client._by_sid[error_sid] = (fwd, "error")
    client._by_sid[data_sid] = (fwd, "data")
    client.flush()
    return fwd


def test_spdy_a_half_close_before_the_pair_or_with_headers_reaches_the_pod(podnet):
    """The echo pod closes once it reads EOF: the data stream's end proves the EOF came."""
    with _serve(podnet) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            on_open = _pair_ending_on_open(client, "10")
            assert client.wait(on_open.finished, 10), "SYN_STREAM's FIN never reached the pod"
            later = _opened(client, ECHO_PORT)
            later.send(b"abc")
            client.session.send_headers(later.data_sid, {}, fin=True)
            client.flush()
            assert client.wait(later.finished, 10), "HEADERS' FIN never reached the pod"
            assert bytes(later.received) == b"abc"
            # the data stream first, ended with an empty DATA frame before its error
            # stream comes (it was dropped: the pod never saw the end)
            first = _data_stream_first(client, 12, lambda sid: client.session.end_stream(sid))
            assert client.wait(first.finished, 10), "DATA's FIN before the pair was lost"
            # the same with HEADERS and FIN, read before the error stream comes
            second = _data_stream_first(
                client, 13, lambda sid: client.session.send_headers(sid, {}, fin=True))
            assert client.wait(second.finished, 10), "HEADERS' FIN before the pair was lost"
            # data sent on the data stream before its error stream comes is kept for the
            # pair, as on HTTP/2 (it was dropped and charged: a hole in the pod's stream)
            third = _data_stream_first(
                client, 14, lambda sid: client.session.send_data(sid, b"early "))
            third.send(b"late")
            third.close_write()
            assert client.wait(third.finished, 10)
            assert bytes(third.received) == b"early late"
        log = proc.log()
    assert "Traceback" not in log


def test_spdy_frames_that_forward_nothing_are_charged(podnet):
    """Each kind alone, past the control burst, ends its session with GOAWAY; the next
    client is served; a GOAWAY flood writes no line per frame."""
    def empty_data(client: SpdyPortForwardClient, fwd: Forward) -> bytes:
        return struct.pack(">II", fwd.data_sid, 0)

    def unknown(client: SpdyPortForwardClient, fwd: Forward) -> bytes:
        return _control(0x30, 0, b"")

    def goaway(client: SpdyPortForwardClient, fwd: Forward) -> bytes:
        return _control(7, 0, struct.pack(">II", 0, 0))

    def headers(client: SpdyPortForwardClient, fwd: Forward) -> bytes:
        return _headers_frame(client, fwd.data_sid, {"a": "b"})

    kinds = {"an empty DATA frame": empty_data, "an ignored control frame": unknown,
             "a second GOAWAY": goaway, "HEADERS": headers}
    with _serve(podnet, "--control-frame-burst", "200") as proc:
        for what, make in kinds.items():
            client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
            fwd = _opened(client, ECHO_PORT)
            unit = make(client, fwd) if make is not headers else b"".join(
                make(client, fwd) for _ in range(400))
            _, answer = _flood_reading(client.sock, unit, 1 << 20)
            assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR], what
            _second_client_is_served(proc)
        # DATA on the error stream, which carries no connection: a pair whose error
        # stream the client left open
        client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
        error_sid = client.session.open_stream(
            {"streamtype": "error", "port": str(ECHO_PORT), "requestid": "1"})
        client.flush()
        _, answer = _flood_reading(client.sock, struct.pack(">II", error_sid, 1) + b"e",
                                   1 << 20)
        assert _spdy_goaways(answer) == [SPDY_GOAWAY_PROTOCOL_ERROR]
        _second_client_is_served(proc)
        log = proc.log()
    for what in kinds:
        assert f"({what}" in log, what
    assert "(DATA on a stream carrying no connection" in log
    assert log.count("client sent GOAWAY") < 20  # a line per session, not per frame
    assert "Traceback" not in log


def test_spdy_data_held_before_pairs_complete_is_bounded_by_buffer_size(podnet):
    """Data streams opened without their error streams keep what they carry for their
    pair; past buffer_size (256 KiB) held by the session's pending pairs together, the
    pair is refused alone (its data stream reset) and the session goes on."""
    with _serve(podnet) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as client:
            before = _rss_mib(proc.proc.pid)
            streams = []
            for n in range(5):
                headers = {"streamtype": "data", "port": str(ECHO_PORT),
                           "requestid": str(100 + n)}
                sid = client.session.open_stream(headers)
                client.session.send_data(sid, b"h" * (100 << 10))
                streams.append(sid)
                fwd = Forward(client, ECHO_PORT, 100 + n, 0, sid)
                client._by_sid[sid] = (fwd, "data")
            client.flush()
            refused = [client._by_sid[sid][0] for sid in streams[2:]]
            assert client.wait(lambda: all(f.reset_status == CANCEL for f in refused), 10), \
                [f.reset_status for f in refused]
            ok = client.roundtrip(ECHO_PORT, b"the session lives on")
            assert bytes(ok.received) == b"the session lives on"
            assert _rss_mib(proc.proc.pid) - before < 16
        log = proc.log()
    assert "more than 262144 bytes held before pairs completed" in log
    assert "Traceback" not in log
