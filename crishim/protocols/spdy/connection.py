"""Sans-IO SPDY/3.1 codec: bytes in, events out; calls in, bytes out.

A :class:`SpdyConnection` owns no socket and no event loop. Feed it what the
transport read with :meth:`SpdyConnection.receive_data`, act on the returned
events, and write whatever :meth:`SpdyConnection.data_to_send` hands back. The
same class serves both roles; :attr:`SpdyConfig.client` picks stream-id parity.

Deliberate choices (docs/protocol.md §2.2 and §2.5):

* Flow control is reported (``WindowUpdateReceived``) but not enforced unless
  asked (:meth:`SpdyConnection.enforce_send_windows`): spdystream neither sends
  nor honours WINDOW_UPDATE, so waiting for window credit would stall every
  kubectl port-forward after 64 KiB. A peer that asks for windows (crishim's own
  client, docs/protocol.md §8.6) gets them: :meth:`SpdyConnection.send_queued`
  sends what the stream's and the session's windows allow.
* DATA payloads are handed out as they arrive, so the input buffer holds at
  most one frame header or one control frame, never a 16 MiB data frame.
* Header blocks share one zlib context per direction for the whole session.
  A block that cannot be inflated (garbage, or bigger than
  ``max_header_block`` once inflated) desynchronises that context, so it ends
  the session; a block that inflates fine but is malformed only resets its stream.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import NoReturn

from ..buffers import Outbound, immutable
from ..credit import WindowUpdateCredit
from .compression import HeaderDecoder, HeaderEncoder, unpack_header_block
from .constants import (
    CANCEL,
    FLAG_FIN,
    FLAG_SETTINGS_CLEAR_SETTINGS,
    FLAG_UNIDIRECTIONAL,
    FLOW_CONTROL_ERROR,
    FRAME_TOO_LARGE,
    GOAWAY,
    GOAWAY_INTERNAL_ERROR,
    GOAWAY_OK,
    GOAWAY_PROTOCOL_ERROR,
    HEADERS,
    INITIAL_SESSION_WINDOW,
    INVALID_STREAM,
    MAX_FRAME_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SPDY_VERSION,
    STREAM_ALREADY_CLOSED,
    STREAM_IN_USE,
    SYN_REPLY,
    SYN_STREAM,
    UNSUPPORTED_VERSION,
    WINDOW_UPDATE,
)
from .errors import (
    CompressionError,
    HeaderBlockError,
    SessionClosedError,
    StreamClosedError,
)
from .events import (
    DataReceived,
    Event,
    FrameIgnored,
    GoAwayReceived,
    HeadersReceived,
    PingAcknowledged,
    PingReceived,
    SessionTerminated,
    SettingsReceived,
    StreamError,
    StreamOpened,
    StreamReplied,
    StreamReset,
    WindowUpdateReceived,
)

_UNLIMITED = 1 << 62
# SPDY/3.1's settings ids (SETTINGS_UPLOAD_BANDWIDTH .. CLIENT_CERTIFICATE_VECTOR_SIZE)
_KNOWN_SETTINGS = frozenset(range(1, 9))
_KNOWN_CONTROL_TYPES = frozenset(
    (SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE)
)

_U32 = struct.Struct(">I")
# entries one SETTINGS frame may carry: SPDY/3.1 defines 8 ids. Each is handled in Python:
# 40,000 in one frame (320 KiB, within the control-frame limit) took 5-10 ms, charged as
# one control frame, so 90 such frames a second held a core at half its time
MAX_SETTINGS_ENTRIES = 64
_U32_PAIR = struct.Struct(">II")
_SYN_STREAM_PREFIX = struct.Struct(">IIBB")
_SETTING = struct.Struct(">II")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SpdyConfig:
    """Role and limits of one session. Every limit bounds memory held per session."""

    client: bool = False
    max_frame_size: int = 16 * 1024 * 1024 - 1
    max_header_block: int = 256 * 1024
    max_concurrent_streams: int = 10000
    max_data_chunk: int = 256 * 1024
    #: Largest DATA payload put in one outgoing frame; longer sends are split.
    max_send_frame: int = 64 * 1024
    #: How many closed stream ids are remembered to tell late frames from bogus ones.
    closed_stream_memory: int = 1024
    #: How many of our own unanswered PING ids are remembered.
    max_outstanding_pings: int = 1024
    #: Work one receive_data call does before it stops and keeps the rest of its input
    #: (``backlogged``) for the next call: frames, and bytes inflated from header blocks
    #: (the events of one call, decoded headers included, are all held at once). 0: no
    #: limit (a caller that does not call again when ``backlogged`` must keep it so).
    max_frames_per_receive: int = 0
    max_inflated_per_receive: int = 0
    #: zlib level for outgoing header blocks.
    header_compression_level: int = zlib.Z_DEFAULT_COMPRESSION
    #: DataReceived.data as a memoryview into the received ``bytes`` (no copy) when
    #: receive_data is given immutable bytes, or a buffer it is told is lent; other
    #: mutable input is always copied.
    zero_copy: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_size <= MAX_FRAME_PAYLOAD:
            raise ValueError(f"max_frame_size must be within 1..{MAX_FRAME_PAYLOAD}")
        if not 1 <= self.max_send_frame <= MAX_FRAME_PAYLOAD:
            raise ValueError(f"max_send_frame must be within 1..{MAX_FRAME_PAYLOAD}")
        for name in ("max_header_block", "max_concurrent_streams", "max_data_chunk",
                     "closed_stream_memory", "max_outstanding_pings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("max_frames_per_receive", "max_inflated_per_receive"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def max_control_frame(self) -> int:
        """Largest control frame buffered whole: a header block may not deflate to
        more than its inflated limit plus zlib's framing slack."""
        return min(self.max_frame_size, self.max_header_block + 64 * 1024)



# --------------------------------------------------------------------------- connection

_CLOSED_RESET = 1  # reset by either side: late frames are dropped silently
_CLOSED_FINISHED = 2  # both sides sent FIN: more data from the peer is an error


class _Stream:
    __slots__ = (
        "alive",
        "local_open",
        "peer_initiated",
        "remote_open",
        "recv_window",
        "replied",
        "send_window",
        "stream_id",
    )

    def __init__(self, stream_id: int, peer_initiated: bool, local_open: bool,
                 remote_open: bool, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        # only counted while windows are enforced, less the connection's _send_shift
        self.send_window = send_window
        self.recv_window = recv_window
        self.peer_initiated = peer_initiated
        self.local_open = local_open
        self.remote_open = remote_open
        self.replied = False
        self.alive = True


class _Terminated(Exception):
    """Unwinds frame processing after a fatal error was recorded."""


class SpdyConnection:
    """One SPDY/3.1 session, either role, without I/O.

    ``receive_data`` never raises on any byte content: peer misbehaviour comes
    back as :class:`StreamError` (stream reset, session lives) or
    :class:`SessionTerminated` (GOAWAY queued, input ignored from then on).
    Local calls raise only for caller mistakes (sending after our own FIN, on a
    never-opened stream, bad arguments); sending on a stream that is already
    reset or finished is a silent no-op, because that race is normal.
    """

    def __init__(self, config: SpdyConfig = SpdyConfig()) -> None:
        self.config = config
        self._our_parity = 1 if config.client else 0
        self._next_stream_id = 1 if config.client else 2
        self._next_ping_id = 1 if config.client else 2
        self._encoder = HeaderEncoder(config.header_compression_level)
        self._decoder = HeaderDecoder(config.max_header_block)
        self._control_limit = config.max_control_frame

        self._inbuf = bytearray()
        # input a receive_data call left for the next one once it had done its share
        self._backlog = b""
        self._frames_left = 0
        self._inflate_left = 0
        self._stopped = False
        # A DATA frame (or an ignored control frame) still being read: bytes left,
        # where they go (None: discard) and its FIN flag.
        self._payload_left = 0
        self._payload_target: _Stream | None = None
        self._payload_fin = False

        self._outbuf: list[bytes | memoryview] = []
        self._share_input = False
        self._outbuf_size = 0

        self._streams: dict[int, _Stream] = {}
        self._peer_stream_count = 0
        self._closed: dict[int, int] = {}
        # spdystream sends no WINDOW_UPDATE; past this credit they are reported as
        # FrameIgnored, for the budget
        self._window_update_credit = WindowUpdateCredit()
        self._last_peer_stream_id = 0
        self._last_accepted_peer_stream_id = 0
        self._outstanding_pings: dict[int, None] = {}

        # send windows (enforce_send_windows): None while they are not enforced; with
        # offer_send_windows, a peer's SETTINGS before its first stream turns them on
        self._initial_send_window: int | None = None
        self._windows_offered = False
        # what later SETTINGS_INITIAL_WINDOW_SIZEs moved every stream's send window by:
        # added when a window is read (a walk over thousands of streams per SETTINGS was
        # a client's cheap way to cost crishim a millisecond a frame)
        self._send_shift = 0
        # receive windows, turned on with the send windows where offered with one: DATA
        # past a stream's window resets it, past the session's ends the session
        self._offered_recv_window: int | None = None
        self._initial_recv_window: int | None = None
        self._session_recv_window = INITIAL_SESSION_WINDOW
        self._discarded = 0  # DATA dropped here this read: its session window goes back
        self._session_send_window = INITIAL_SESSION_WINDOW

        self.peer_settings: dict[int, int] = {}
        self.terminated = False
        self.goaway_sent = False
        self.goaway_received = False

    # ----------------------------------------------------------------- introspection

    @property
    def open_stream_count(self) -> int:
        return len(self._streams)

    @property
    def bytes_to_send(self) -> int:
        return self._outbuf_size

    @property
    def buffered_input(self) -> int:
        """Bytes held back waiting for the rest of a frame header or control frame."""
        return len(self._inbuf)

    @property
    def backlogged(self) -> bool:
        """A receive_data call stopped at its share of work (max_frames_per_receive,
        max_inflated_per_receive) with whole frames left: call receive_data again (b""
        will do) once its events are handled."""
        return bool(self._backlog)

    @property
    def remembered_closed_streams(self) -> int:
        return len(self._closed)

    def is_stream_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def reset_here(self, stream_id: int) -> bool:
        """The stream was reset (recently, within closed_stream_memory): DATA the peer
        sent before it learned is expected, not a frame to charge."""
        return self._closed.get(stream_id) == _CLOSED_RESET

    @property
    def send_windows_enforced(self) -> bool:
        return self._initial_send_window is not None

    @property
    def session_send_window(self) -> int:
        """Bytes DATA on all streams together may carry now (MAX_WINDOW without windows)."""
        if self._initial_send_window is None:
            return MAX_WINDOW
        return self._session_send_window

    def stream_send_window(self, stream_id: int) -> int:
        """The stream's own window, the session's aside (MAX_WINDOW without windows, 0
        for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return MAX_WINDOW if self._initial_send_window is None else stream.send_window

    def send_window(self, stream_id: int) -> int:
        """Bytes DATA on the stream may carry now: the smaller of its window and the
        session's while windows are enforced, else MAX_WINDOW (0 for a stream that is
        gone)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        if self._initial_send_window is None:
            return MAX_WINDOW
        return min(stream.send_window + self._send_shift, self._session_send_window)

    def can_send(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.local_open

    # ----------------------------------------------------------------- output

    def data_to_send(self) -> bytes:
        """Drain everything queued for the transport."""
        out = self._outbuf
        if not out:
            return b""
        if len(out) == 1 and type(out[0]) is bytes:
            data = out[0]
        else:
            data = b"".join(out)
        out.clear()
        self._outbuf_size = 0
        return data

    def take_output(self) -> list[bytes | memoryview]:
        """Drain everything queued as a list of buffers, for ``transport.writelines``:
        the payloads are not joined (copied) into one block first."""
        out = self._outbuf
        if not out:
            return []
        self._outbuf = []
        self._outbuf_size = 0
        return out

    def _queue(self, chunk: bytes | memoryview) -> None:
        self._outbuf.append(chunk)
        self._outbuf_size += len(chunk)

    def _queue_control(self, frame_type: int, flags: int, payload: bytes) -> None:
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"control frame payload of {len(payload)} bytes is too large")
        self._queue(_U32_PAIR.pack(0x80000000 | (SPDY_VERSION << 16) | frame_type,
                                   (flags << 24) | len(payload)) + payload)

    def _queue_rst(self, stream_id: int, status: int) -> None:
        self._queue_control(RST_STREAM, 0, _U32_PAIR.pack(stream_id & MAX_STREAM_ID, status))

    def _queue_goaway(self, status: int) -> None:
        self._queue_control(GOAWAY, 0, _U32_PAIR.pack(self._last_accepted_peer_stream_id,
                                                      status))

    # ----------------------------------------------------------------- local actions

    def open_stream(self, headers: dict[str, str], fin: bool = False, associated_id: int = 0,
                    priority: int = 0) -> int:
        """Queue a SYN_STREAM and return the new stream's id."""
        if self.terminated:
            raise SessionClosedError("the session has terminated")
        if self.goaway_received:
            raise SessionClosedError("the peer sent GOAWAY; no new streams")
        if not 0 <= priority <= 7:
            raise ValueError(f"priority {priority} is outside 0..7")
        if not 0 <= associated_id <= MAX_STREAM_ID:
            raise ValueError(f"associated stream id {associated_id} is out of range")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise SessionClosedError("stream ids are exhausted; open a new session")
        block = self._encoder.encode(headers)
        self._next_stream_id += 2
        prefix = _SYN_STREAM_PREFIX.pack(stream_id, associated_id, priority << 5, 0)
        self._queue_control(SYN_STREAM, FLAG_FIN if fin else 0, prefix + block)
        self._streams[stream_id] = _Stream(stream_id, False, not fin, True,
                                           (self._initial_send_window or 0) - self._send_shift,
                                           self._initial_recv_window or 0)
        return stream_id

    def reply(self, stream_id: int, headers: dict[str, str] | None = None,
              fin: bool = False) -> None:
        """Accept a peer stream with SYN_REPLY (no-op if it is already reset)."""
        stream = self._writable_stream(stream_id)
        if stream is None:
            return
        if not stream.peer_initiated:
            raise ValueError(f"stream {stream_id} is ours; only the peer can reply to it")
        if stream.replied:
            raise ValueError(f"stream {stream_id} was already replied to")
        block = self._encoder.encode(headers or {})
        self._queue_control(SYN_REPLY, FLAG_FIN if fin else 0, _U32.pack(stream_id) + block)
        stream.replied = True
        if fin:
            self._close_local(stream)

    def send_headers(self, stream_id: int, headers: dict[str, str], fin: bool = False) -> None:
        """Queue a HEADERS frame (no-op if the stream is already reset)."""
        stream = self._writable_stream(stream_id)
        if stream is None:
            return
        block = self._encoder.encode(headers)
        self._queue_control(HEADERS, FLAG_FIN if fin else 0, _U32.pack(stream_id) + block)
        if fin:
            self._close_local(stream)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview,
                  fin: bool = False, lent: bool = False) -> None:
        """Queue DATA frames of at most ``max_send_frame`` bytes each.

        Never waits for window credit (with windows enforced, the caller sends no more
        than send_window allows: send_queued). A no-op if the stream is already reset or
        finished; raises :class:`StreamClosedError` if we already sent FIN on it.
        ``lent``: ``data`` is a buffer its owner reuses, and the caller takes the output
        and writes it out (or copies it) before that: it is sliced by view, not copied.
        """
        stream = self._writable_stream(stream_id)
        if stream is None:
            return
        # Immutable bytes (or a view of them) are sliced by view; anything mutable is
        # copied once here.
        view = memoryview(data) if lent or immutable(data) else memoryview(bytes(data))
        total = len(view)
        chunk = self.config.max_send_frame
        pack = _U32_PAIR.pack
        out = self._outbuf
        if total <= chunk:
            out.append(pack(stream_id, ((FLAG_FIN if fin else 0) << 24) | total))
            if total:
                out.append(data if type(data) is bytes else view)
        else:
            for offset in range(0, total, chunk):
                piece = view[offset:offset + chunk]
                last = offset + chunk >= total
                out.append(pack(stream_id, ((FLAG_FIN if fin and last else 0) << 24)
                                | len(piece)))
                out.append(piece)
        frames = (total + chunk - 1) // chunk or 1
        self._outbuf_size += total + 8 * frames
        self._window_update_credit.earn(frames)
        if self._initial_send_window is not None:
            stream.send_window -= total
            self._session_send_window -= total
        if fin:
            self._close_local(stream)

    def enforce_send_windows(self, initial: int) -> None:
        """Honour the peer's windows from now on: every stream's starts at `initial` (the
        peer's SETTINGS_INITIAL_WINDOW_SIZE; streams open already, on which nothing was
        sent yet, too), the session's at 64 KiB, and both grow by its WINDOW_UPDATEs. Send
        with send_queued, or with send_data no more than send_window allows."""
        if not 0 <= initial <= MAX_WINDOW:
            raise ValueError(f"initial window {initial} is outside 0..{MAX_WINDOW}")
        self._initial_send_window = initial
        self._send_shift = 0
        for stream in self._streams.values():
            stream.send_window = initial

    def offer_send_windows(self, receive_window: int | None = None) -> None:
        """Let the peer ask for windows: a SETTINGS_INITIAL_WINDOW_SIZE (at most 2^31-1)
        it sends before any stream is opened turns them on (enforce_send_windows) as the
        frame is read, so the frames after it in the same input are already under them.
        Later SETTINGS only move the windows of a session that has them. With
        `receive_window`, ours are enforced from then on too (enforce_receive_windows):
        the caller announces it (SETTINGS) and raises the session's (WINDOW_UPDATE)."""
        self._windows_offered = True
        self._offered_recv_window = receive_window

    @property
    def session_receive_window(self) -> int:
        """What the peer may still send on the session (with receive windows enforced)."""
        return self._session_recv_window

    @property
    def receive_windows_enforced(self) -> bool:
        return self._initial_recv_window is not None

    def enforce_receive_windows(self, initial: int) -> None:
        """DATA counts against the stream's window (`initial`, our SETTINGS) and the
        session's (64 KiB until our WINDOW_UPDATEs raise it); send_window_update gives
        them back. DATA dropped here (a stream gone or refused) gives its session window
        back by itself, in one WINDOW_UPDATE per receive_data call."""
        if not 0 <= initial <= MAX_WINDOW:
            raise ValueError(f"initial window {initial} is outside 0..{MAX_WINDOW}")
        # called again (a smaller window than offered): streams open already move by the
        # difference, what they received still counted
        before = self._initial_recv_window
        self._initial_recv_window = initial
        for stream in self._streams.values():
            stream.recv_window = initial if before is None else \
                stream.recv_window + initial - before

    def stop_send_windows(self) -> None:
        """The peer turned out not to honour windows (it never answered our asking for
        them): send without them from now on."""
        self._initial_send_window = None

    def stop_receive_windows(self) -> None:
        """The peer turned out not to honour windows: DATA counts against none."""
        self._initial_recv_window = None

    def send_queued(self, stream_id: int, out: Outbound) -> bool:
        """Send from the front of `out` what the windows allow (a chunk split at the
        window as memoryview slices, no copy) and its end once it is empty and asked. True
        when `out` is empty, False when a window closed first. A stream that is gone
        takes everything (it is dropped, as send_data drops it)."""
        chunks = out.chunks
        while chunks:
            window = min(self.send_window(stream_id), self.config.max_send_frame)
            if window <= 0:
                if stream_id not in self._streams:
                    chunks.clear()
                    out.size = 0
                    break
                return False
            chunk = out.take(window)
            self.send_data(stream_id, chunk, fin=out.eof and not chunks)
            if out.eof and not chunks:
                return True
        if out.eof:
            self.send_data(stream_id, b"", fin=True)
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side with an empty DATA frame carrying FIN."""
        self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, status: int = CANCEL) -> None:
        """Queue RST_STREAM and forget the stream (no-op if it is already gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or self.terminated:
            return
        self._queue_rst(stream_id, status)
        self._forget(stream, _CLOSED_RESET)

    def ping(self, ping_id: int | None = None) -> int:
        """Queue a PING; its echo arrives as :class:`PingAcknowledged`."""
        if ping_id is None:
            ping_id = self._next_ping_id
            self._next_ping_id = (self._next_ping_id + 2) & 0xFFFFFFFF
        elif not 0 <= ping_id <= 0xFFFFFFFF:
            raise ValueError(f"ping id {ping_id} is not a 32-bit value")
        elif ping_id & 1 != self._our_parity:
            # The peer would take a ping of its own parity for an echo and drop it.
            raise ValueError(f"ping id {ping_id} has the peer's parity")
        if self.terminated:
            return ping_id
        pings = self._outstanding_pings
        pings[ping_id] = None
        if len(pings) > self.config.max_outstanding_pings:
            del pings[next(iter(pings))]
        self._queue_control(PING, 0, _U32.pack(ping_id))
        return ping_id

    def goaway(self, status: int = GOAWAY_OK) -> None:
        """Queue GOAWAY once; new peer streams are refused from now on."""
        if self.goaway_sent or self.terminated:
            return
        self.goaway_sent = True
        self._queue_goaway(status)

    def send_window_update(self, stream_id: int, delta: int) -> None:
        """Queue WINDOW_UPDATE (stream 0 addresses the session window)."""
        if not 1 <= delta <= MAX_STREAM_ID:
            raise ValueError(f"window delta {delta} is outside 1..{MAX_STREAM_ID}")
        if self.terminated or (stream_id != 0 and stream_id not in self._streams):
            return
        if self._initial_recv_window is not None:
            if stream_id:
                self._streams[stream_id].recv_window += delta
            else:
                self._session_recv_window += delta
        self._queue_control(WINDOW_UPDATE, 0, _U32_PAIR.pack(stream_id, delta))

    def send_settings(self, settings: dict[int, int], clear: bool = False) -> None:
        """Queue a SETTINGS frame with the given id -> value pairs."""
        if self.terminated:
            return
        parts = [_U32.pack(len(settings))]
        for setting_id, value in settings.items():
            if not 0 <= setting_id <= 0xFFFFFF or not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"setting {setting_id}={value} does not fit the frame")
            parts.append(_SETTING.pack(setting_id, value))
        self._queue_control(SETTINGS, FLAG_SETTINGS_CLEAR_SETTINGS if clear else 0,
                            b"".join(parts))

    def encode_headers(self, headers: dict[str, str]) -> bytes:
        """Compress a header block with the outgoing context (advances that context)."""
        return self._encoder.encode(headers)

    def decode_headers(self, block: bytes) -> dict[str, str]:
        """Inflate and parse a header block with the incoming context (advances it)."""
        return self._decoder.decode(block)

    def _writable_stream(self, stream_id: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.local_open:
                return stream
            raise StreamClosedError(f"stream {stream_id} is already closed for sending")
        if self.terminated or self._was_opened(stream_id):
            return None
        raise StreamClosedError(f"stream {stream_id} was never opened")

    def _was_opened(self, stream_id: int) -> bool:
        if stream_id <= 0:
            return False
        if stream_id & 1 == self._our_parity:
            return stream_id < self._next_stream_id
        return stream_id <= self._last_peer_stream_id

    # ----------------------------------------------------------------- stream bookkeeping

    def _close_local(self, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._forget(stream, _CLOSED_FINISHED)

    def _close_remote(self, stream: _Stream) -> None:
        stream.remote_open = False
        if not stream.local_open:
            self._forget(stream, _CLOSED_FINISHED)

    def _forget(self, stream: _Stream, how: int) -> None:
        stream.alive = False
        del self._streams[stream.stream_id]
        if stream.peer_initiated:
            self._peer_stream_count -= 1
        self._remember_closed(stream.stream_id, how)

    def _remember_closed(self, stream_id: int, how: int) -> None:
        closed = self._closed
        closed.pop(stream_id, None)
        closed[stream_id] = how
        if len(closed) > self.config.closed_stream_memory:
            del closed[next(iter(closed))]

    def _stream_error(self, stream_id: int, status: int, reason: str,
                      events: list[Event]) -> None:
        self._queue_rst(stream_id, status)
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._forget(stream, _CLOSED_RESET)
        else:
            self._remember_closed(stream_id, _CLOSED_RESET)
        events.append(StreamError(stream_id, status, reason))

    def _fail(self, status: int, reason: str, events: list[Event]) -> NoReturn:
        """Record a fatal error: GOAWAY queued, state dropped. Raises to unwind."""
        self._queue_goaway(status)
        self.goaway_sent = True
        self.terminated = True
        for stream in self._streams.values():
            stream.alive = False
        self._streams.clear()
        self._closed.clear()
        self._outstanding_pings.clear()
        self._peer_stream_count = 0
        self._payload_left = 0
        self._payload_target = None
        events.append(SessionTerminated(status, reason))
        raise _Terminated

    # ----------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview,
                     lent: bool = False) -> list[Event]:
        """Consume bytes read from the transport; never raises on any byte content.

        ``lent``: with ``zero_copy``, DataReceived.data may be views of a mutable ``data``
        that the caller reuses once it has acted on the events: whoever keeps a piece
        past that copies it (nothing in the codec keeps a view of its input)."""
        events: list[Event] = []
        if self.terminated:
            return events
        if self._backlog:  # only after a call stopped at its share: copying is fine here
            data = self._backlog + bytes(data)
            self._backlog = b""
            lent = False
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        config = self.config
        self._share_input = config.zero_copy and (lent or immutable(data))
        budgeted = bool(config.max_frames_per_receive or config.max_inflated_per_receive)
        self._frames_left = config.max_frames_per_receive or _UNLIMITED
        self._inflate_left = config.max_inflated_per_receive or _UNLIMITED
        try:
            try:
                offset = 0
                if self._inbuf:
                    offset = self._complete_buffered(view, events)
                consumed = self._process(view[offset:], events, budgeted)
                if self._discarded:
                    discarded, self._discarded = self._discarded, 0
                    self.send_window_update(0, discarded)
                if self._stopped:
                    self._stopped = False
                    self._backlog = bytes(view[offset + consumed:])
                elif offset + consumed < len(view):
                    self._inbuf += view[offset + consumed:]
            except _Terminated:
                self._inbuf = bytearray()
                self._backlog = b""
            except Exception as exc:  # noqa: BLE001 - a bug ends the session, not the transport
                try:
                    self._fail(GOAWAY_INTERNAL_ERROR, f"internal codec error: {exc!r}", events)
                except _Terminated:
                    self._inbuf = bytearray()
                    self._backlog = b""
        finally:
            view.release()
        return events

    def _complete_buffered(self, view: memoryview, events: list[Event]) -> int:
        """Top up the held-back header or control frame from ``view`` and process it.

        Only the missing bytes are copied, so DATA payload that follows is never
        copied into the buffer. Returns how much of ``view`` was used.
        """
        inbuf = self._inbuf
        used = 0
        available = len(view)
        if len(inbuf) < 8:
            take = min(8 - len(inbuf), available)
            inbuf += view[:take]
            used = take
            if len(inbuf) < 8:
                return used
        needed = self._unit_size(inbuf) - len(inbuf)
        if needed > 0:
            take = min(needed, available - used)
            inbuf += view[used:used + take]
            used += take
            if take < needed:
                return used
        unit = bytes(inbuf)
        self._inbuf = bytearray()
        with memoryview(unit) as unit_view:
            self._process(unit_view, events)
        return used

    def _unit_size(self, header: bytearray) -> int:
        """Bytes to hold before processing: a whole control frame if it is buffered,
        otherwise just the 8-byte header (DATA and ignored frames stream through)."""
        word: int
        flags_length: int
        word, flags_length = _U32_PAIR.unpack_from(header, 0)
        if word & 0x80000000:
            length = flags_length & 0xFFFFFF
            frame_type = word & 0xFFFF
            version = (word >> 16) & 0x7FFF
            if (frame_type in _KNOWN_CONTROL_TYPES or version != SPDY_VERSION) and \
                    length <= self._control_limit:
                return 8 + length
        return 8

    def _process(self, view: memoryview, events: list[Event], budgeted: bool = False) -> int:
        """Handle every complete unit in ``view``; return the bytes consumed. ``budgeted``:
        stop (``_stopped``) before a frame once this call has done its share of work."""
        size = len(view)
        pos = 0
        unpack_header = _U32_PAIR.unpack_from
        max_chunk = self.config.max_data_chunk
        while True:
            left = self._payload_left
            if left:
                take = size - pos
                if take == 0:
                    return pos
                take = min(take, left)
                take = min(take, max_chunk)
                left -= take
                self._payload_left = left
                target = self._payload_target
                if target is not None:
                    if target.alive:
                        fin = self._payload_fin and not left
                        piece = view[pos:pos + take]
                        events.append(DataReceived(target.stream_id, piece if self._share_input
                                                   else bytes(piece), fin))
                        if fin:
                            self._close_remote(target)
                    elif self._initial_recv_window is not None:
                        # the stream died within the frame: the rest is dropped here, and
                        # its session window goes back (the whole frame was the stream's)
                        self._discarded += take
                    if not left:
                        self._payload_target = None
                pos += take
                continue
            if size - pos < 8:
                return pos
            if budgeted:
                self._frames_left -= 1
                if self._frames_left < 0 or self._inflate_left < 0:
                    self._stopped = True
                    return pos
            word, flags_length = unpack_header(view, pos)
            length = flags_length & 0xFFFFFF
            flags = flags_length >> 24
            if word & 0x80000000:
                frame_type = word & 0xFFFF
                version = (word >> 16) & 0x7FFF
                if version == SPDY_VERSION and frame_type not in _KNOWN_CONTROL_TYPES:
                    # Unknown control frames are ignored, streamed past without buffering.
                    events.append(FrameIgnored(frame_type))
                    pos += 8
                    self._payload_left = length
                    self._payload_target = None
                    continue
                if length > self._control_limit:
                    self._fail(GOAWAY_PROTOCOL_ERROR,
                               f"control frame type {frame_type} of {length} bytes exceeds "
                               f"the {self._control_limit}-byte limit", events)
                if size - pos < 8 + length:
                    return pos
                payload = view[pos + 8:pos + 8 + length]
                pos += 8 + length
                if version != SPDY_VERSION:
                    self._on_bad_version(version, frame_type, payload, events)
                else:
                    self._on_control(frame_type, flags, payload, events)
            else:
                pos += 8
                self._on_data_header(word, flags, length, events)

    # ----------------------------------------------------------------- frame handlers

    def _on_data_header(self, stream_id: int, flags: int, length: int,
                        events: list[Event]) -> None:
        fin = bool(flags & FLAG_FIN)
        self._payload_left = length
        self._payload_fin = fin
        self._payload_target = None
        if stream_id == 0:
            self._fail(GOAWAY_PROTOCOL_ERROR, "DATA frame on stream 0", events)
        counted = self._initial_recv_window is not None
        if counted:
            self._session_recv_window -= length
            if self._session_recv_window < 0:
                self._fail(GOAWAY_PROTOCOL_ERROR, f"DATA of {length} bytes past the session's "
                           "receive window", events)
            self._discarded += length  # unless a stream takes it, below
        stream = self._streams.get(stream_id)
        if stream is None:
            closed_as = self._closed.get(stream_id)
            if closed_as == _CLOSED_FINISHED:
                self._stream_error(stream_id, STREAM_ALREADY_CLOSED,
                                   f"DATA on stream {stream_id} after the peer's FIN", events)
            elif closed_as is None:
                self._stream_error(stream_id, INVALID_STREAM,
                                   f"DATA on stream {stream_id}, which is not open", events)
            return
        if not stream.remote_open:
            self._stream_error(stream_id, STREAM_ALREADY_CLOSED,
                               f"DATA on stream {stream_id} after the peer's FIN", events)
            return
        if length > self.config.max_frame_size:
            self._stream_error(stream_id, FRAME_TOO_LARGE,
                               f"DATA frame of {length} bytes exceeds the "
                               f"{self.config.max_frame_size}-byte limit", events)
            return
        if counted:
            stream.recv_window -= length
            if stream.recv_window < 0:
                self._stream_error(stream_id, FLOW_CONTROL_ERROR,
                                   f"DATA of {length} bytes past stream {stream_id}'s receive "
                                   "window", events)
                return
            self._discarded -= length
        if length:
            self._payload_target = stream
        else:  # an empty frame is an event too: it may end the stream, or dial its pair
            events.append(DataReceived(stream_id, b"", fin))
            if fin:
                self._close_remote(stream)

    def _on_bad_version(self, version: int, frame_type: int, payload: memoryview,
                        events: list[Event]) -> None:
        if frame_type == SYN_STREAM and len(payload) >= 4:
            stream_id = _U32.unpack_from(payload, 0)[0] & MAX_STREAM_ID
            if stream_id:
                self._stream_error(stream_id, UNSUPPORTED_VERSION,
                                   f"SYN_STREAM speaks SPDY/{version}, not SPDY/3", events)
                return
        self._fail(GOAWAY_PROTOCOL_ERROR,
                   f"control frame type {frame_type} speaks SPDY/{version}, not SPDY/3", events)

    def _on_control(self, frame_type: int, flags: int, payload: memoryview,
                    events: list[Event]) -> None:
        if frame_type == SYN_STREAM:
            self._on_syn_stream(flags, payload, events)
        elif frame_type == SYN_REPLY or frame_type == HEADERS:
            self._on_reply_or_headers(frame_type, flags, payload, events)
        elif frame_type == RST_STREAM:
            self._on_rst_stream(payload, events)
        elif frame_type == SETTINGS:
            self._on_settings(payload, events)
        elif frame_type == PING:
            self._on_ping(payload, events)
        elif frame_type == GOAWAY:
            self._on_goaway(payload, events)
        else:
            self._on_window_update(payload, events)

    def _inflate(self, frame_name: str, block: memoryview, events: list[Event]) -> bytes:
        try:
            raw = self._decoder.inflate(block)
            self._inflate_left -= len(raw)
            return raw
        except CompressionError as exc:
            self._fail(GOAWAY_PROTOCOL_ERROR, f"{frame_name}: {exc}", events)

    def _on_syn_stream(self, flags: int, payload: memoryview, events: list[Event]) -> None:
        if len(payload) < 10:
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"SYN_STREAM of {len(payload)} bytes is shorter than 10", events)
        stream_id, associated_id = _U32_PAIR.unpack_from(payload, 0)
        stream_id &= MAX_STREAM_ID
        associated_id &= MAX_STREAM_ID
        priority = payload[8] >> 5
        # Inflate before any check: the shared context must see every block.
        raw = self._inflate("SYN_STREAM", payload[10:], events)
        if stream_id == 0:
            self._fail(GOAWAY_PROTOCOL_ERROR, "SYN_STREAM with stream id 0", events)
        if stream_id & 1 == self._our_parity:
            self._stream_error(stream_id, PROTOCOL_ERROR,
                               f"SYN_STREAM id {stream_id} has the parity of our own streams",
                               events)
            return
        if stream_id <= self._last_peer_stream_id:
            if stream_id in self._streams:
                reason = f"second SYN_STREAM for open stream {stream_id}"
            else:
                reason = (f"SYN_STREAM id {stream_id} does not increase "
                          f"(last was {self._last_peer_stream_id})")
            self._stream_error(stream_id, PROTOCOL_ERROR, reason, events)
            return
        self._last_peer_stream_id = stream_id
        if self.goaway_sent:
            self._stream_error(stream_id, REFUSED_STREAM, "the session is going away", events)
            return
        try:
            headers = unpack_header_block(raw)
        except HeaderBlockError as exc:
            self._stream_error(stream_id, PROTOCOL_ERROR, f"SYN_STREAM header block: {exc}", events)
            return
        if self._peer_stream_count >= self.config.max_concurrent_streams:
            self._stream_error(stream_id, REFUSED_STREAM,
                               f"{self._peer_stream_count} peer streams are already open",
                               events)
            return
        fin = bool(flags & FLAG_FIN)
        unidirectional = bool(flags & FLAG_UNIDIRECTIONAL)
        self._last_accepted_peer_stream_id = stream_id
        if fin and unidirectional:
            self._remember_closed(stream_id, _CLOSED_FINISHED)
        else:
            self._streams[stream_id] = _Stream(stream_id, True, not unidirectional, not fin,
                                               (self._initial_send_window or 0)
                                               - self._send_shift,
                                               self._initial_recv_window or 0)
            self._peer_stream_count += 1
        events.append(StreamOpened(stream_id, associated_id, headers, fin, unidirectional,
                                   priority))

    def _on_reply_or_headers(self, frame_type: int, flags: int, payload: memoryview,
                             events: list[Event]) -> None:
        name = "SYN_REPLY" if frame_type == SYN_REPLY else "HEADERS"
        if len(payload) < 4:
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"{name} of {len(payload)} bytes is shorter than 4", events)
        stream_id = _U32.unpack_from(payload, 0)[0] & MAX_STREAM_ID
        raw = self._inflate(name, payload[4:], events)
        if stream_id == 0:
            self._fail(GOAWAY_PROTOCOL_ERROR, f"{name} with stream id 0", events)
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id not in self._closed:
                self._stream_error(stream_id, INVALID_STREAM,
                                   f"{name} for stream {stream_id}, which is not open", events)
            return
        if frame_type == SYN_REPLY:
            if stream.peer_initiated:
                self._stream_error(stream_id, PROTOCOL_ERROR,
                                   f"SYN_REPLY for stream {stream_id}, which the peer opened",
                                   events)
                return
            if stream.replied:
                self._stream_error(stream_id, STREAM_IN_USE,
                                   f"second SYN_REPLY for stream {stream_id}", events)
                return
        elif not stream.remote_open:
            self._stream_error(stream_id, STREAM_ALREADY_CLOSED,
                               f"HEADERS on stream {stream_id} after the peer's FIN", events)
            return
        try:
            headers = unpack_header_block(raw)
        except HeaderBlockError as exc:
            self._stream_error(stream_id, PROTOCOL_ERROR, f"{name} header block: {exc}", events)
            return
        fin = bool(flags & FLAG_FIN)
        if frame_type == SYN_REPLY:
            stream.replied = True
            events.append(StreamReplied(stream_id, headers, fin))
        else:
            events.append(HeadersReceived(stream_id, headers, fin))
        if fin and stream.remote_open:
            self._close_remote(stream)

    def _on_rst_stream(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 8:
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"RST_STREAM of {len(payload)} bytes instead of 8", events)
        stream_id, status = _U32_PAIR.unpack_from(payload, 0)
        stream_id &= MAX_STREAM_ID
        if stream_id == 0:
            self._fail(GOAWAY_PROTOCOL_ERROR, "RST_STREAM for stream 0", events)
        stream = self._streams.get(stream_id)
        if stream is None:  # never answer a reset with a reset
            if stream_id not in self._closed:  # never opened, or long gone: budgeted
                events.append(FrameIgnored(RST_STREAM))
            return
        self._forget(stream, _CLOSED_RESET)
        events.append(StreamReset(stream_id, status))

    def _on_settings(self, payload: memoryview, events: list[Event]) -> None:
        size = len(payload)
        if size < 4:
            self._fail(GOAWAY_PROTOCOL_ERROR, f"SETTINGS of {size} bytes has no count", events)
        (count,) = _U32.unpack_from(payload, 0)
        if size != 4 + 8 * count:
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"SETTINGS announces {count} entries in {size} bytes", events)
        if count > MAX_SETTINGS_ENTRIES:  # each is a loop turn in Python (see above)
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"SETTINGS of {count} entries (at most {MAX_SETTINGS_ENTRIES})", events)
        settings: dict[int, int] = {}
        for offset in range(4, size, 8):
            flags_id, value = _SETTING.unpack_from(payload, offset)
            setting_id = flags_id & 0xFFFFFF
            if setting_id in _KNOWN_SETTINGS:  # unknown ids are ignored, not kept
                settings[setting_id] = value
        initial = settings.get(SETTINGS_INITIAL_WINDOW_SIZE)
        if (initial is not None and self._initial_send_window is None
                and self._windows_offered and initial <= MAX_WINDOW
                and self._last_peer_stream_id == 0
                and self._next_stream_id == (1 if self.config.client else 2)):
            self.enforce_send_windows(initial)
            if self._offered_recv_window is not None:
                self.enforce_receive_windows(self._offered_recv_window)
        elif initial is not None and self._initial_send_window is not None:
            if initial > MAX_WINDOW:
                self._fail(GOAWAY_PROTOCOL_ERROR,
                           f"SETTINGS_INITIAL_WINDOW_SIZE {initial} is above 2^31-1", events)
            # SPDY/3.1 2.6.8: every stream's window moves by the difference
            self._send_shift += initial - self._initial_send_window
            self._initial_send_window = initial
        self.peer_settings.update(settings)
        events.append(SettingsReceived(settings))

    def _on_ping(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(GOAWAY_PROTOCOL_ERROR, f"PING of {len(payload)} bytes instead of 4",
                       events)
        (ping_id,) = _U32.unpack_from(payload, 0)
        if ping_id & 1 == self._our_parity:
            if ping_id in self._outstanding_pings:
                del self._outstanding_pings[ping_id]
                events.append(PingAcknowledged(ping_id))
            return  # an echo of nothing we sent is ignored, as the spec says
        self._queue_control(PING, 0, bytes(payload))
        events.append(PingReceived(ping_id))

    def _on_goaway(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 8:
            self._fail(GOAWAY_PROTOCOL_ERROR, f"GOAWAY of {len(payload)} bytes instead of 8",
                       events)
        last_good, status = _U32_PAIR.unpack_from(payload, 0)
        self.goaway_received = True
        events.append(GoAwayReceived(last_good & MAX_STREAM_ID, status))

    def _on_window_update(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 8:
            self._fail(GOAWAY_PROTOCOL_ERROR,
                       f"WINDOW_UPDATE of {len(payload)} bytes instead of 8", events)
        stream_id, delta = _U32_PAIR.unpack_from(payload, 0)
        stream_id &= MAX_STREAM_ID
        delta &= MAX_STREAM_ID
        if stream_id == 0:
            if delta == 0:
                self._fail(GOAWAY_PROTOCOL_ERROR, "session WINDOW_UPDATE with delta 0", events)
        elif stream_id not in self._streams:
            events.append(FrameIgnored(WINDOW_UPDATE))  # late, for a stream that is gone
            return
        elif delta == 0:
            self._stream_error(stream_id, PROTOCOL_ERROR,
                               f"WINDOW_UPDATE with delta 0 on stream {stream_id}", events)
            return
        if self._initial_send_window is not None:
            # enforced windows take every update (one that is ignored would stall the
            # stream for good); past the credit it is still charged, as below
            if stream_id == 0:
                self._session_send_window += delta
                if self._session_send_window > MAX_WINDOW:
                    self._fail(GOAWAY_PROTOCOL_ERROR,
                               "session WINDOW_UPDATE takes the window past 2^31-1", events)
            else:
                stream = self._streams[stream_id]
                stream.send_window += delta
                if stream.send_window + self._send_shift > MAX_WINDOW:
                    self._stream_error(stream_id, FLOW_CONTROL_ERROR,
                                       f"WINDOW_UPDATE takes stream {stream_id}'s window "
                                       "past 2^31-1", events)
                    return
            if not self._window_update_credit.spend():
                events.append(FrameIgnored(WINDOW_UPDATE))
            events.append(WindowUpdateReceived(stream_id, delta))
            return
        if stream_id == 0:  # counted ahead of enforce_send_windows: the session's window
            # is often raised in the same read as the SETTINGS that asks for windows
            self._session_send_window = min(self._session_send_window + delta, MAX_WINDOW)
        if not self._window_update_credit.spend():  # credit for no DATA we sent: budgeted
            events.append(FrameIgnored(WINDOW_UPDATE))
            return
        events.append(WindowUpdateReceived(stream_id, delta))
