"""RFC 6455 framing after the handshake, sans-IO: the frame parser, masking and the
frames queued for the transport.

Written here rather than taken from wsproto because wsproto copies each payload byte
about five times (buffer append, slice, delete, a masker on a copy, bytes()) and spent
~70% of the server's CPU in a kubectl upload. ``WebSocketFraming`` unmasks once, hands
tunnel bytes on as they arrive, reassembles channel messages, bounds their size, answers
pings and turns every kind of peer misbehaviour into a queued close frame plus a
``Closed`` event (never an exception). ``take_output()`` gives frames as buffers for
writelines.
"""

from __future__ import annotations

import codecs
import os
import struct
from collections.abc import Callable

from ..buffers import gather, immutable
from .events import (
    CLOSE_ABNORMAL,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_UNSUPPORTED_DATA,
    Closed,
    FrameIgnored,
    FramingEvent,
    Message,
    PingReceived,
    ProtocolViolation,
    TunnelData,
)

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_KNOWN_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
_MAX_CONTROL_PAYLOAD = 125
# A partial frame head plus a whole control frame: all the input ever buffered.
_MAX_HEAD_AND_CONTROL = 14 + _MAX_CONTROL_PAYLOAD
# Received close codes a peer may send (RFC 6455 section 7.4; 1005/1006/1015 are local only).
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
# Payloads below this are joined with their frame head into one buffer for the transport.
_JOIN_BELOW = 2048
_MAX_JOIN = 96 * 1024

_Buffers = list[bytes | bytearray | memoryview]

# XOR with a 4-byte mask. websockets' C apply_mask, measured on 4 KiB..1 MiB payloads
# (Python 3.11, this 2-core box): 21-53 GB/s, against 410-970 MB/s for 4 strided
# bytes.translate passes (the pure-Python fallback below, for a websockets built without
# its C extension) and 290-520 MB/s for int.from_bytes ^ repeated mask ^ to_bytes.
_Masker = Callable[[bytes | bytearray | memoryview, bytes | bytearray], bytes]


def _c_masker() -> _Masker | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # websockets installed without its C extension
        return None
    return apply_mask


_apply_mask = _c_masker()

_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]


def _translate_in_place(buf: bytearray, start: int, end: int, key: bytes | bytearray) -> None:
    tables = _XOR_TABLES
    for i in range(4):
        k = key[i]
        if k:
            s = start + i
            buf[s:end:4] = buf[s:end:4].translate(tables[k])


def _unmask_in_place(buf: bytearray, start: int, end: int, key: bytes | bytearray) -> None:
    """XOR ``buf[start:end]`` with ``key`` repeated, ``key[0]`` at ``start``."""
    if _apply_mask is not None:
        buf[start:end] = _apply_mask(memoryview(buf)[start:end], key)
    else:
        _translate_in_place(buf, start, end, key)


# message payload pieces at least this big are handed out as views of the received bytes
_VIEW_MIN = 64 * 1024


def _masked(data: bytes | bytearray | memoryview, key: bytes | bytearray) -> bytes | bytearray:
    """A copy of ``data`` XORed with ``key`` repeated."""
    if _apply_mask is not None:
        return _apply_mask(data, key)
    out = bytearray(data)
    _translate_in_place(out, 0, len(out), key)
    return out


def xor_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytearray:
    """``data`` masked (or unmasked) with the 4-byte ``key`` (RFC 6455 section 5.3)."""
    masked = _masked(data, key)
    return masked if isinstance(masked, bytearray) else bytearray(masked)



class _Failed(Exception):
    """Internal: the peer broke RFC 6455; the close frame is queued."""


class WebSocketFraming:
    """RFC 6455 framing over an established WebSocket (after the handshake), sans-IO.

    ``receive_data`` never raises: every peer misbehaviour becomes a queued close frame
    plus a ``Closed`` event. Input is buffered only while a frame head (at most 14 bytes)
    or a control frame (at most 125 more) is incomplete; payload bytes are unmasked once
    and handed on. Messages are reassembled up to ``max_message_size`` (1009 beyond it).

    ``stream=True`` (a byte tunnel, where message boundaries mean nothing): binary payload
    is handed on as ``TunnelData`` as it arrives, one event per ``receive_data`` call and
    control frame boundary, and a text message fails the connection with 1003.

    ``receive_data(b"")`` means the transport reached EOF. Outgoing messages offered after
    a close frame was sent are discarded: the peer can no longer accept them.
    """

    def __init__(self, client: bool, max_message_size: int = 16 * 1024 * 1024,
                 stream: bool = False) -> None:
        self.client = client
        self.max_message_size = max_message_size
        self.stream = stream
        self.closed = False
        self._close_sent = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._head = bytearray()          # an incomplete frame head / control frame
        self._remaining = 0               # payload bytes of the current data frame still due
        self._key = b""                   # its mask key, rotated to the next byte due
        self._fin = False
        self._message_opcode = 0          # opcode of the message in progress, 0 if none
        self._message_size = 0
        self._parts: list[bytes | bytearray | memoryview] = []
        self._utf8: codecs.IncrementalDecoder | None = None
        # Stream mode: unmasked payload pieces of this read, not yet handed on.
        self._acc: list[bytes | bytearray | memoryview] = []

    @property
    def message_bytes(self) -> int:
        """Payload bytes of a message being reassembled, held here until it ends."""
        return self._message_size if self._message_opcode and not self.stream else 0

    @property
    def closing(self) -> bool:
        """A close frame has been sent or received; no more messages go out."""
        return self.closed or self._close_sent

    # ----------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[FramingEvent]:
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [Closed(CLOSE_ABNORMAL, "transport closed without a close frame")]
        events: list[FramingEvent] = []
        try:
            self._receive(data, events)
        except _Failed:
            pass
        except Exception as exc:  # noqa: BLE001 - a codec bug ends this WebSocket only
            self._fail(1011, f"internal error decoding frames: {exc!r}"[:120], events)
        return events

    def _receive(self, data: bytes | bytearray | memoryview,
                 events: list[FramingEvent]) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        end = len(view)
        pos = 0
        stream = self.stream
        fast = stream and not self.client  # a tunnel's masked frames: _whole_binary_frame
        while pos < end:
            remaining = self._remaining
            if remaining:
                take = end - pos if end - pos < remaining else remaining
                # Counted as it arrives, like a reader that buffers: a peer announcing a
                # huge frame is refused once it has sent more than the limit.
                self._message_size += take
                if self._message_size > self.max_message_size:
                    self._fail(CLOSE_MESSAGE_TOO_BIG, "message larger than "
                                                      f"{self.max_message_size} bytes", events)
                key = self._key
                if stream:
                    if key:
                        self._acc += _masked_pieces([view[pos:pos + take]], key)
                    else:
                        self._acc.append(view[pos:pos + take])
                else:
                    self._payload(view[pos:pos + take], key, events)
                pos += take
                self._remaining = remaining = remaining - take
                if key and take & 3:
                    shift = take & 3
                    self._key = key[shift:] + key[:shift]
                if not remaining and self._fin:
                    self._message_done(events)
                continue
            head = self._head
            if head:
                # Complete the buffered head with at most the bytes one frame head
                # plus control payload can need; the rest of ``view`` stays unread.
                had = len(head)
                head += view[pos:pos + _MAX_HEAD_AND_CONTROL - had]
                if self._acc:
                    self._flush_stream(events)
                used = self._frame(head, 0, len(head), events)
                if not used:
                    pos = end
                    break
                self._head = bytearray()
                pos += used - had
                continue
            if fast and not self._message_opcode:
                used = self._whole_binary_frame(view, pos, end)
                if used:
                    pos += used
                    continue
            if self._acc and view[pos] & 0x08:  # a control frame: keep events in wire order
                self._flush_stream(events)
            used = self._frame(view, pos, end, events)
            if not used:
                self._head = bytearray(view[pos:end])
                break
            pos += used
        if self._acc:
            self._flush_stream(events)

    def _whole_binary_frame(self, view: memoryview, pos: int, end: int) -> int:
        """A tunnel's common frame, whole in ``view`` at ``pos`` outside any message: a
        masked, unfragmented binary frame of 1 to _MAX_JOIN bytes with a 7- or 16-bit
        length. Its payload, unmasked, goes to the stream as _frame and the loop would put
        it; returns the bytes used, 0 for anything else (left to _frame). kubectl 1.30+
        sends a frame per write, two of every three 4 bytes (a SPDY frame's head written
        in two pieces): per frame, this is a third of the general path."""
        if end - pos < 6 or view[pos] != 0x82:
            return 0
        size = view[pos + 1] ^ 0x80  # masked: the bit set
        if not 0 < size < 127:
            return 0
        head = 6
        if size == 126:
            if end - pos < 8:
                return 0
            size = view[pos + 2] << 8 | view[pos + 3]
            if size < 126:
                return 0  # not minimally encoded: _frame says so
            head = 8
        used = head + size
        if pos + used > end or size > _MAX_JOIN or size > self.max_message_size:
            return 0
        self._acc.append(_masked(view[pos + head:pos + used],
                                 bytes(view[pos + head - 4:pos + head])))
        return used

    def _flush_stream(self, events: list[FramingEvent]) -> None:
        # Joined per transport read, not grown in a bytearray (reallocs cost far more).
        acc = self._acc
        first = acc[0]
        if len(acc) == 1 and type(first) is memoryview and type(first.obj) is bytes \
                and len(first) == len(first.obj):
            acc.clear()
            events.append(TunnelData(first.obj))  # a whole received block, unmasked
            return
        # Joined in blocks below malloc's mmap threshold: a fresh mapping per large block
        # page-faulted on every byte (measured: ~370 faults per MiB).
        group: _Buffers = []
        size = 0
        for piece in acc:
            # unmasked into bytes of its own, or a view into received bytes: nobody
            # changes either, so a big one is handed on as it is (the SPDY codec shares
            # such input as it shares bytes); a view of a buffer its owner reuses is copied
            whole = piece if len(piece) >= _VIEW_MIN and immutable(piece) else None
            if whole is not None or len(piece) > _MAX_JOIN:
                if group:
                    events.append(TunnelData(b"".join(group)))
                    group = []
                    size = 0
                if whole is not None:
                    events.append(TunnelData(whole))
                else:
                    for start in range(0, len(piece), _MAX_JOIN):
                        events.append(TunnelData(bytes(piece[start:start + _MAX_JOIN])))
                continue
            if size and size + len(piece) > _MAX_JOIN:
                events.append(TunnelData(b"".join(group)))
                group = []
                size = 0
            group.append(piece)
            size += len(piece)
        if group:
            events.append(TunnelData(b"".join(group)))
        acc.clear()

    def _frame(self, buf: bytearray | memoryview, pos: int, end: int,
               events: list[FramingEvent]) -> int:
        """Parse the frame head at ``buf[pos:]`` (and a whole control frame); return the
        bytes used, or 0 if more input is needed. Raises _Failed on a violation."""
        if end - pos < 2:
            return 0
        b0 = buf[pos]
        b1 = buf[pos + 1]
        opcode = b0 & 0x0F
        if b0 & 0x70:
            self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated "
                                             "extension", events)
        if opcode not in _KNOWN_OPCODES:
            self._fail(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}", events)
        masked = b1 & 0x80
        if self.client:
            if masked:
                self._fail(CLOSE_PROTOCOL_ERROR, "masked frame from the server", events)
        elif not masked:
            self._fail(CLOSE_PROTOCOL_ERROR, "unmasked frame from the client", events)
        size: int = b1 & 0x7F
        used = 2
        if size == 126:
            if end - pos < 4:
                return 0
            (size,) = _LEN16.unpack_from(buf, pos + 2)
            used = 4
            if size < 126:
                self._fail(CLOSE_PROTOCOL_ERROR, "payload length not minimally encoded",
                           events)
        elif size == 127:
            if end - pos < 10:
                return 0
            (size,) = _LEN64.unpack_from(buf, pos + 2)
            used = 10
            if size < 65536 or size >> 63:
                self._fail(CLOSE_PROTOCOL_ERROR, "invalid 64-bit payload length", events)
        fin = b0 & 0x80
        if opcode & 0x08:
            if not fin:
                self._fail(CLOSE_PROTOCOL_ERROR, "fragmented control frame", events)
            if size > _MAX_CONTROL_PAYLOAD:
                self._fail(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes",
                           events)
            if masked:
                used += 4
            if end - pos < used + size:
                return 0
            payload = bytes(buf[pos + used:pos + used + size])
            if masked and size:
                payload = bytes(xor_mask(payload, bytes(buf[pos + used - 4:pos + used])))
            self._control(opcode, payload, events)
            return used + size
        if masked:
            if end - pos < used + 4:
                return 0
            key = bytes(buf[pos + used:pos + used + 4])
            used += 4
            if key == b"\0\0\0\0":
                key = b""
        else:
            key = b""
        if opcode:
            if self._message_opcode:
                self._fail(CLOSE_PROTOCOL_ERROR, "new message started inside a fragmented "
                                                 "message", events)
            if opcode == OP_TEXT:
                if self.stream:
                    reason = "text message in a byte tunnel"
                    events.append(ProtocolViolation(reason, CLOSE_UNSUPPORTED_DATA))
                    self._fail(CLOSE_UNSUPPORTED_DATA, reason, events)
                self._utf8 = codecs.getincrementaldecoder("utf-8")()
            self._message_opcode = opcode
            self._message_size = 0
        elif not self._message_opcode:
            self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to "
                                             "continue", events)
        self._fin = bool(fin)
        self._key = key
        self._remaining = size
        if not size:
            # an empty fragment; or, in a tunnel, an empty message (no bytes to hand on;
            # as a message, an empty one is the channel layer's to judge)
            if not fin or (self.stream and not self._message_size):
                events.append(FrameIgnored("empty data frame"))
            if fin:
                self._message_done(events)
        return used

    def _payload(self, piece: memoryview, key: bytes, events: list[FramingEvent]) -> None:
        """Message mode: keep one piece of a data frame's payload, unmasked."""
        chunk: bytes | bytearray | memoryview
        if key:
            chunk = _masked(piece, key)
        elif immutable(piece) and len(piece) >= _VIEW_MIN:
            chunk = piece  # a view into received bytes, which nobody changes: no copy
        else:
            # a view into a buffer the caller reuses, or a small piece that would keep a
            # whole read alive for a few bytes: copied
            chunk = bytes(piece)
        if self._utf8 is not None:
            try:
                self._utf8.decode(chunk)
            except UnicodeDecodeError as exc:
                self._fail(CLOSE_INVALID_PAYLOAD, f"text message is not UTF-8: {exc.reason}",
                           events)
        # small fragments (1-byte continuation frames) go into one buffer: a byte of
        # memory per payload byte, not an object per fragment (~60 bytes per byte)
        if not gather(self._parts, chunk):
            self._parts.append(chunk)

    def _message_done(self, events: list[FramingEvent]) -> None:
        opcode = self._message_opcode
        self._message_opcode = 0
        self._message_size = 0
        if self.stream:
            return
        parts = self._parts
        only = parts[0] if len(parts) == 1 else None
        data: bytes | memoryview
        if only is not None and not isinstance(only, bytearray):
            data = only
        else:
            data = b"".join(parts)
        parts.clear()
        if opcode == OP_TEXT:
            utf8, self._utf8 = self._utf8, None
            try:
                utf8.decode(b"", True)  # type: ignore[union-attr]
            except UnicodeDecodeError as exc:
                self._fail(CLOSE_INVALID_PAYLOAD, f"text message is not UTF-8: {exc.reason}",
                           events)
        events.append(Message(data, opcode == OP_BINARY))

    def _control(self, opcode: int, payload: bytes, events: list[FramingEvent]) -> None:
        if opcode == OP_PING:
            if not self._close_sent:
                self._queue_frame(OP_PONG, payload)
            events.append(PingReceived(payload))
        elif opcode == OP_CLOSE:
            code, reason = CLOSE_NO_STATUS, ""
            if len(payload) == 1:
                self._fail(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload", events)
            if payload:
                (code,) = _LEN16.unpack_from(payload)
                if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
                    self._fail(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}", events)
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(CLOSE_INVALID_PAYLOAD, "close reason is not UTF-8", events)
            if self._acc:
                self._flush_stream(events)
            if not self._close_sent:
                # The peer started the close handshake: echo its code.
                self._queue_close(code, reason)
            self.closed = True
            events.append(Closed(code, reason))
            raise _Failed  # nothing after a close frame is read
        else:  # a pong: nothing to do (this object pings only when asked to)
            events.append(FrameIgnored("pong"))

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection from above (a channel protocol violation): queue a close
        frame with ``code`` unless one was sent already, and read nothing more."""
        if not self._close_sent:
            self._queue_close(code, reason)
        self.closed = True
        self._parts.clear()
        self._head = bytearray()
        self._remaining = 0

    def _fail(self, code: int, reason: str, events: list[FramingEvent]) -> None:
        """Fail the connection: queue a close frame, report it, stop reading."""
        if self._acc:
            self._flush_stream(events)
        self.fail(code, reason)
        events.append(Closed(code, reason))
        raise _Failed

    # ----------------------------------------------------------------- output

    def _queue_close(self, code: int, reason: str) -> None:
        self._close_sent = True
        if code == CLOSE_NO_STATUS:
            self._queue_frame(OP_CLOSE, b"")
            return
        encoded = reason.encode("utf-8")[:_MAX_CONTROL_PAYLOAD - 2]
        self._queue_frame(OP_CLOSE, _LEN16.pack(code) + encoded.decode(
            "utf-8", "ignore").encode("utf-8"))

    def _queue_frame(self, opcode: int, payload: bytes | bytearray | memoryview,
                     prefix: bytes = b"") -> None:
        """One final frame; ``prefix`` (a channel byte) goes before ``payload``."""
        size = len(prefix) + len(payload)
        if size >= _JOIN_BELOW:
            self._queue_unjoined(opcode, size, [payload], prefix)
            return
        if self.client:
            key = os.urandom(4)
            body = bytearray(prefix)
            body += payload
            _unmask_in_place(body, 0, size, key)
            self._out.append(_frame_head(0x80 | opcode, size, 0x80) + key + body)
        else:
            self._out.append(b"".join((_frame_head(0x80 | opcode, size, 0), prefix, payload)))

    def _queue_buffers(self, opcode: int, buffers: _Buffers, size: int) -> None:
        """One final frame whose payload is ``buffers`` (total ``size``) in order."""
        if size < _JOIN_BELOW:
            self._queue_frame(opcode, b"".join(buffers))
        else:
            self._queue_unjoined(opcode, size, buffers)

    def _queue_unjoined(self, opcode: int, size: int, buffers: _Buffers,
                        prefix: bytes = b"") -> None:
        """A frame of ``prefix`` + ``buffers`` (``size`` bytes) whose payload is not joined
        into one block: the server's buffers go out as they are, the client's are masked
        in pieces."""
        if self.client:
            key = os.urandom(4)
            self._out.append(_frame_head(0x80 | opcode, size, 0x80) + key)
            self._out.extend(_masked_pieces([prefix, *buffers] if prefix else buffers, key))
        else:
            self._out.append(_frame_head(0x80 | opcode, size, 0) + prefix)
            self._out.extend(_stable(b) for b in buffers)

    def send_message(self, data: bytes | bytearray | memoryview | str, binary: bool = True) -> None:
        """Queue one message (not fragmented). ``binary=False`` sends a text message;
        bytes given for a text message must be UTF-8."""
        if self.closing:
            return
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not binary:
            bytes(data).decode("utf-8")  # refuse to send invalid text
        self._queue_frame(OP_BINARY if binary else OP_TEXT, data)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the close handshake (no-op if already closing)."""
        if not self.closing:
            self._queue_close(code, reason)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return bytes(data) if type(data) is not bytes else data

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Drain everything queued as a list of buffers, for ``transport.writelines``:
        payloads are not joined (copied) into one block first."""
        out = self._out
        if not out:
            return []
        self._out = []
        return out


def _frame_head(first: int, size: int, mask_bit: int) -> bytes:
    """A frame head: ``first`` (FIN and opcode), then ``mask_bit`` (0x80 for a masked
    frame, whose key the caller appends) and the payload length, minimally encoded."""
    if size < 126:
        return bytes((first, mask_bit | size))
    if size < 65536:
        return _HEAD16.pack(first, mask_bit | 126, size)
    return _HEAD64.pack(first, mask_bit | 127, size)


def _masked_pieces(buffers: _Buffers, key: bytes) -> list[bytes | bytearray]:
    """``buffers`` masked as one payload, in pieces of at most _MAX_JOIN bytes (a
    large temporary block page-faults on every byte: see _flush_stream)."""
    pieces = []
    offset = 0
    for buf in buffers:
        view = memoryview(buf)
        n = len(view)
        for start in range(0, n, _MAX_JOIN):
            shift = offset & 3
            piece = _masked(view[start:start + _MAX_JOIN],
                            key[shift:] + key[:shift] if shift else key)
            offset += len(piece)
            pieces.append(piece)
    return pieces


def _stable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` itself if nobody can change it before it is written, else a copy."""
    return data if immutable(data) else bytes(data)

