"""The `h2` library's H2Connection, with its byte handling made fit for bulk DATA.

Profiling a port-forward showed h2 itself as the wall, not the protocol: for every
received frame h2 evaluates `repr(frame)` for its trace log, and hyperframe's DATA repr
hexlifies the whole payload; the frame buffer copies each byte three times on the way in
(into a bytearray, out as a slice, `.tobytes()`); sending copies it four times (body
join, header + body, the output bytearray, `bytes()` of it) into allocations big enough
to cost page faults. `H2Codec` keeps all of h2's state machines and flow control and
changes only the byte handling at both ends:

- in: frames are parsed straight from the received `bytes`; DATA payloads are handed out
  as memoryviews into them, as they arrive, like crishim's SPDY codec: a DATA frame split
  over reads reaches h2 as consecutive DATA pieces of the same stream (END_STREAM on the
  last), so h2 accounts exactly the same flow-controlled bytes. Only frames h2 would accept
  whole are split (open stream, within both windows, no header block pending), so every
  piece is accepted just the same; any other DATA frame (closed stream, window exceeded:
  h2 answers those per frame), padded ones and every other frame type are buffered whole
  and parsed by hyperframe as before. `receive_data(data, lent=True)` takes a buffer its
  owner reuses (crishim serve's read buffer, as for SPDY) without copying it: the events'
  DATA are views of it, to be acted on (or copied) before the owner reads again, and only
  what is left of a frame that goes on in the next read is copied (`keep`);
- out: `take_output()` returns the frames as a list for `transport.writelines`: a DATA
  frame is its 9-byte header and the caller's payload object, never joined;
- DATA's short way: a DATA frame with no flags received on a stream that takes it, or
  sent without END_STREAM or padding on a stream that may send, within both windows, is
  handled here: the windows change as h2 changes them, and nothing else would (both
  state machines keep their state for DATA there); the received frame's header is read
  with one struct, not into a hyperframe object. One small frame: 3.8 -> 1.0 us to send,
  7.8 -> 3.3 us to receive; bulk decoding 0.051 -> 0.030 ms per MiB; anything else (a
  window exceeded, a stream without its headers yet or with a content-length, a closed
  one) goes through h2 as before, with h2's errors (tests/unit/test_h2codec.py compares
  both ways with stock h2);
- headers: `LiteralHeaderEncoder` sends every field as a literal without indexing, each
  field's bytes cached: hpack's encoder searched its tables for every field to save ~160
  bytes per HEADERS on a loopback hop. A client opening a forwarded connection (two
  HEADERS) 147-269 -> 77-81 us, the server's response HEADERS 25.5 -> 20 us, and the
  server decodes the literals no slower (244-344 -> 222 us per connection);
- streams: h2 counts open streams by walking every stream it holds, at every stream
  opened either way, so a new connection cost more the more were live (server, two
  HEADERS: 414 us with none live, 1,050 with 500, 1,979 with 2,000).
  `_open_streams` answers from the number of streams held while that is below the
  concurrency limit in question (the answer to "may one more open?" is the same) and
  walks only when the table has doubled since the last walk, which also drops the closed
  streams as h2's walk does: O(1) amortised, the table at most twice the live streams
  (or 64). benchmarks/h2_streams.py measures it.
- received headers: hpack decodes a block field by field, each with a debug log call and
  a copy of the rest of the block; h2 then checks it with a chain of seven generators and
  decodes it with another. `LiteralHeaderDecoder` reads the blocks LiteralHeaderEncoder
  writes in one loop (any other block goes to hpack whole), and with
  `validate_inbound_headers` (h2's default) `H2Codec` turns h2's own pass off and runs
  `header_block_problem` instead: the same rules (RFC 9113 8.2.1 characters, 8.2.2
  connection-specific fields and TE, 8.3 pseudo-header fields, :authority/Host, an empty
  :path), one pass, a regular expression per name and value (tests/unit/test_h2_headers.py
  holds both to hpack's and h2's results on generated blocks). A block found malformed is
  the same ProtocolError at the same place (h2 answers it with GOAWAY); a name or value
  that is not valid in the configured encoding is one too, not an internal error. The
  server's receive of a forwarded connection's two HEADERS: 275-284 us -> 242 (the check)
  -> 170-174 (the decoder); benchmarks/h2_streams.py prints it beside h2's stock handling.
- errors, where h2 departs from RFC 9113: a header block that cannot be decoded ends the
  connection with COMPRESSION_ERROR (4.3; h2 says PROTOCOL_ERROR), RST_STREAM on an idle
  stream with PROTOCOL_ERROR (6.4; h2 ignores it); a stream depending on itself (5.3.1),
  a body other than its content-length (8.1.1) and a second HEADERS that does not end the
  stream (8.1) reset that stream alone with PROTOCOL_ERROR and a StreamError event (h2
  ends the connection).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import hpack
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    Event,
    InformationalResponseReceived,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import FrameDataMissingError, InvalidBodyLengthError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamState
from hpack.hpack import encode_integer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError, InvalidPaddingError
from hyperframe.flags import Flags
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from crishim.protocols.buffers import Outbound
from crishim.protocols.credit import WindowUpdateCredit

if TYPE_CHECKING:
    from typing_extensions import Buffer

_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_DATA_TYPE = 0x0
_SETTINGS_TYPE = 0x4
# entries one SETTINGS frame may carry: RFC 9113 defines 7 and extensions a few more; h2
# handles each entry in Python (an enum lookup, an object): 40,000 of them in one frame
# within MAX_FRAME_SIZE held the event loop ~350 ms, and every session on it waited
MAX_SETTINGS_ENTRIES = 64
_FLAG_END_STREAM = 0x1
_FLAG_PADDED = 0x8
_COALESCE = 4096  # small control frames written in the same flush are joined up to this
_RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_DATA_FLAG_NAMES = {flag.name for flag in DataFrame.defined_flags}  # shared, only read
_CONNECTION_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
_WALK_MIN = 64  # streams held before _open_streams walks them at all


# frames that cost the receiver no answer and no work beyond what they carry
_FREE_FRAMES = (ContinuationFrame, GoAwayFrame)

# RFC 9113 8.2.1: a name is no byte in 0x00-0x20, 0x41-0x5a (upper case) or 0x7f-0xff, and
# no colon but a pseudo-header's leading one; a value has no NUL, LF or CR and neither
# starts nor ends with a space or a tab (an empty value is allowed)
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00\n\r]|\A[ \t]|[ \t]\Z")
_CONNECTION_SPECIFIC = frozenset((b"connection", b"proxy-connection", b"keep-alive",
                                  b"transfer-encoding", b"upgrade"))
_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":status",
                     b":protocol"))
_REQUEST_ONLY = frozenset((b":scheme", b":path", b":authority", b":method", b":protocol"))
_HEADER_EVENTS = (RequestReceived, ResponseReceived, TrailersReceived,
                  InformationalResponseReceived)


def header_block_problem(headers: Sequence[tuple[bytes, bytes]], response: bool,
                         trailer: bool) -> str | None:
    """What is malformed in a received header block, as h2's inbound validation judges it
    (None: nothing). `response`: the block came from a server; `trailer`: it ends a
    stream whose headers came before."""
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    for name, value in headers:
        if _NAME.fullmatch(name) is None:
            return f"malformed header name {name!r}"
        if value and _BAD_VALUE.search(value) is not None:
            return f"malformed value of header {name!r}"
        if name[0] == 0x3A:  # ':'
            if name in pseudo:
                return f"duplicate pseudo-header field {name!r}"
            if regular:
                return f"pseudo-header field {name!r} after a regular one"
            if name not in _PSEUDO:
                return f"unknown pseudo-header field {name!r}"
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and not (response or trailer):
                return "an empty :path"
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            return f"connection-specific header field {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return f"TE header {value!r} other than trailers"
        if name == b"host" and not (response or trailer):
            if host is not None:
                return "more than one Host header"
            host = value
    if trailer:
        return f"pseudo-header fields {sorted(pseudo)} in trailers" if pseudo else None
    if response:
        if b":status" not in pseudo:
            return "a response without :status"
        if pseudo & _REQUEST_ONLY:
            return f"request pseudo-header fields {sorted(pseudo & _REQUEST_ONLY)} in a response"
        return None
    if b":method" not in pseudo:
        return "a request without :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            return "a CONNECT request with :scheme or :path"
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        return "a request without :scheme or :path"
    if b":status" in pseudo:
        return "a request with :status"
    if b":protocol" in pseudo and not connect:
        return "a :protocol pseudo-header field outside CONNECT"
    if authority is None and host is None:
        return "a request with neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return "a request whose :authority and Host differ"
    return None


class Overloaded(ProtocolError):
    """A frame past the receiver's budget: the connection ends with ENHANCE_YOUR_CALM."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class CompressionError(ProtocolError):
    """A header block that cannot be decoded: the connection ends with COMPRESSION_ERROR
    (RFC 9113 4.3; h2 makes hpack's own errors PROTOCOL_ERROR, and lets this one through)."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class StreamError(StreamReset):
    """This side reset the stream with PROTOCOL_ERROR for what the peer sent on it, where
    h2 would end the connection (RFC 9113 5.4.2; see H2Codec._stream_error_reason):
    `reason` says what. The connection and its other streams go on."""

    def __init__(self, stream_id: int, reason: str) -> None:
        super().__init__(stream_id=stream_id, error_code=ErrorCodes.PROTOCOL_ERROR,
                         remote_reset=False)
        self.reason = reason


# DATA on a stream this side reset that is not charged: what may have been in flight when
# the peer learned, the stream's receive window at the reset in bytes, in at most
# LATE_DATA_FRAMES plus a frame per LATE_DATA_FRAME_BYTES of it; remembered for the last
# LATE_DATA_STREAMS streams reset
LATE_DATA_FRAMES = 16
LATE_DATA_FRAME_BYTES = 16384  # HTTP/2's default largest frame: what a bulk sender sends
LATE_DATA_STREAMS = 4096


class ViewDataFrame(DataFrame):
    """A DATA frame whose payload is a memoryview into the received bytes, with a repr
    that does not hexlify the payload (h2 formats every received frame)."""

    def parse_body(self, data: memoryview) -> None:
        pad = self.parse_padding_data(data)
        # a view, not a copy
        self.data = data[pad:len(data) - self.pad_length]  # type: ignore[assignment]
        self.body_len = len(data)
        if self.pad_length and self.pad_length >= self.body_len:
            raise InvalidPaddingError("Padding is too long.")

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


def _data_piece(stream_id: int, payload: memoryview, end_stream: bool) -> ViewDataFrame:
    """A piece of a DATA frame (stream_id is not 0): hyperframe's constructor's result,
    set directly (it builds the flag set's valid names and checks the id every time)."""
    f = ViewDataFrame.__new__(ViewDataFrame)
    f.stream_id = stream_id
    flags = f.flags = Flags.__new__(Flags)
    flags._valid_flags = _DATA_FLAG_NAMES
    flags._flags = {"END_STREAM"} if end_stream else set()
    f.pad_length = 0
    f.data = payload  # type: ignore[assignment]  # a view, not a copy
    f.body_len = len(payload)
    return f


class ViewFrameBuffer(FrameBuffer):
    """h2's FrameBuffer without copies: holds the received `bytes` objects themselves and
    yields DATA payload pieces as they arrive (see the module docstring)."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._views: list[memoryview] = []  # unconsumed input, oldest first
        self._start = 0  # bytes of _views[0] already consumed
        self._avail = 0
        # a DATA frame whose payload is still arriving: stream id, bytes left, END_STREAM
        self._data_stream = 0
        self._data_left = 0
        self._data_end = False
        # (stream id, length) -> may this DATA frame be handed out in pieces?
        self.can_split: Callable[[int, int], bool] = lambda stream_id, length: False
        self.lent = False  # the input is a buffer its owner reuses: see keep()
        # bytes a header block may hold while it waits for END_HEADERS (h2 bounds only the
        # number of CONTINUATION frames, 64, so up to 64 frames of MAX_FRAME_SIZE each)
        self.max_header_block = 2 * h2.connection.H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if self._headers_buffer or (isinstance(f, (HeadersFrame, PushPromiseFrame))
                                    and "END_HEADERS" not in f.flags):
            held = sum(len(x.data) for x in self._headers_buffer)
            held += len(getattr(f, "data", b""))
            if held > self.max_header_block:
                raise Overloaded(f"a header block of more than {self.max_header_block} bytes "
                                 "(twice MAX_HEADER_LIST_SIZE) without END_HEADERS")
        return super()._update_header_buffer(f)

    def add_data(self, data: Buffer) -> None:
        if type(data) is not bytes and not self.lent:
            data = bytes(data)  # memoryviews handed out must not see the bytes change
        view = memoryview(data)
        if self._preamble_len:
            n = min(self._preamble_len, len(view))
            super().add_data(view[:n])  # h2 checks the client preface and consumes it
            view = view[n:]
        if view:
            self._views.append(view)
            self._avail += len(view)

    def keep(self) -> None:
        """Copy what is left unconsumed of a lent input (a frame that goes on in the next
        read), joined into one object: its owner is about to reuse the buffer."""
        views = self._views
        if views:
            first = views[0][self._start:]
            self._views = [memoryview(b"".join([first, *views[1:]]) if len(views) > 1
                                      else first.tobytes())]
            self._start = 0

    def _take(self, n: int) -> memoryview:
        """Consume n bytes (n <= _avail): a view into one received object when they lie in
        one, else a new joined object (only frames straddling reads)."""
        views = self._views
        first = views[0]
        start = self._start
        end = start + n
        self._avail -= n
        if end <= len(first):
            if end == len(first):
                views.pop(0)
                self._start = 0
            else:
                self._start = end
            return first[start:end]
        parts = [first[start:]]
        views.pop(0)
        need = n - len(parts[0])
        while need:
            v = views[0]
            if len(v) <= need:
                parts.append(v)
                views.pop(0)
                need -= len(v)
            else:
                parts.append(v[:need])
                views[0] = v  # unchanged object; the offset carries the rest
                self._start = need
                need = 0
                break
        else:
            self._start = 0
        return memoryview(b"".join(parts))

    def _peek_header(self) -> memoryview:
        first = self._views[0]
        start = self._start
        if len(first) - start >= 9:
            return first[start:start + 9]
        out = bytearray()
        for i, v in enumerate(self._views):
            out += v[start:] if i == 0 else v
            if len(out) >= 9:
                break
        return memoryview(bytes(out[:9]))

    def __next__(self) -> Frame:
        while True:
            if self._data_left:
                f = self._next_data_piece_exact()
                if f is None:
                    raise StopIteration
                f = self._update_header_buffer(f)
                if f is not None:
                    return f
                continue
            if self._avail < 9:
                raise StopIteration
            header = self._peek_header()
            hi, lo, kind, flags, stream_id = _HEADER.unpack(header)
            length = hi << 8 | lo
            stream_id &= 0x7FFFFFFF
            if kind == _DATA_TYPE and not flags & _FLAG_PADDED and length and stream_id \
                    and not self._headers_buffer and self.can_split(stream_id, length):
                # the hot one, without a frame object for the header
                self._validate_frame_length(length)
                self._take(9)
                self._data_stream = stream_id
                self._data_left = length
                self._data_end = bool(flags & _FLAG_END_STREAM)
                continue
            if kind == _SETTINGS_TYPE and length > 6 * MAX_SETTINGS_ENTRIES:
                raise Overloaded(f"a SETTINGS frame of {length // 6} entries (at most "
                                 f"{MAX_SETTINGS_ENTRIES})")
            try:
                f, length = Frame.parse_frame_header(header)
            except (InvalidDataError, InvalidFrameError) as err:
                raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
            self._validate_frame_length(length)
            if self._avail < 9 + length:
                raise StopIteration
            self._take(9)
            body = self._take(length) if length else memoryview(b"")
            if type(f) is DataFrame:
                f = ViewDataFrame(f.stream_id)
                f.parse_flags(flags)
            try:
                f.parse_body(body)
            except InvalidDataError as err:
                raise ProtocolError("Received frame with non-compliant data") from err
            except InvalidFrameError as err:
                raise FrameDataMissingError("Frame data missing or invalid") from err
            f = self._update_header_buffer(f)
            if f is not None:
                return f

    def _next_data_piece_exact(self) -> Frame | None:
        """The next piece of the DATA frame in progress: what has arrived of it, up to the
        end of the oldest received object."""
        if not self._avail:
            return None
        n = min(self._data_left, len(self._views[0]) - self._start)
        self._data_left -= n
        piece = self._take(n)
        return _data_piece(self._data_stream, piece, self._data_end and not self._data_left)


class _Payload:
    """A memoryview slice on its way through h2's send_data, which copies a memoryview
    (`tobytes()`) and takes anything else as it is: DATA frames split at a window or the
    frame size go out without that copy (20.6 % of crishim port-forward's CPU in an h2
    upload, py-spy). Unwrapped again in _prepare_for_sending."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)


def _unwrapped(data: object) -> bytes | memoryview:
    """A DATA payload as it goes on the wire: a _Payload's view, anything else as it is."""
    return data.view if type(data) is _Payload else cast("bytes | memoryview", data)


_Headers = (Iterable[hpack.HeaderTuple | tuple[bytes | str, bytes | str]
                    | tuple[bytes | str, bytes | str, bool | None]]
            | dict[bytes | str, bytes | str])
_FIELD_CACHE = 64  # encoded fields kept: the constant ones of a session's requests


class LiteralHeaderEncoder(hpack.Encoder):
    """HPACK that never touches the dynamic table: each field a literal without indexing
    (RFC 7541 6.2.2; never indexed, 6.2.3, where h2 marks a field sensitive) with a
    literal name, so a field's bytes do not depend on what came before and are cached.
    Table size updates the peer's SETTINGS call for are still sent first."""

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[tuple[object, object, bool], bytes] = {}

    def encode(self, headers: _Headers, huffman: bool = True) -> bytes:
        if isinstance(headers, dict):
            return super().encode(headers, huffman)
        block = []
        if self.header_table.resized:
            block.append(self._encode_table_size_change())
            self.header_table.resized = False
        fields = self._fields
        for header in headers:
            if isinstance(header, hpack.HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and bool(header[2])
            key = (header[0], header[1], sensitive)
            field = fields.get(key)
            if field is None:
                name, value = _utf8(header[0]), _utf8(header[1])
                # string lengths: 7-bit prefix integers, Huffman bit clear
                field = b"".join((b"\x10" if sensitive else b"\x00",
                                  encode_integer(len(name), 7), name,
                                  encode_integer(len(value), 7), value))
                if len(fields) < _FIELD_CACHE:
                    fields[key] = field
            block.append(field)
        return b"".join(block)


def _utf8(text: object) -> bytes:
    return text if type(text) is bytes else str(text).encode("utf-8")


class LiteralHeaderDecoder(hpack.Decoder):
    """hpack's Decoder, with a fast path for blocks of what LiteralHeaderEncoder writes:
    literal fields without indexing or never indexed, literal names, no Huffman, lengths
    under 127. Such a block leaves the decoder's state alone, so any other block is
    decoded by hpack itself, from its start (~35 us less per HEADERS here). A block that
    cannot be decoded is a CompressionError."""

    def decode(self, data: bytes, raw: bool = False) -> Iterable[hpack.HeaderTuple]:
        try:
            headers = self._plain_literals(data)
            if headers is None:
                return super().decode(data, raw)
            self._assert_valid_table_size()
        except hpack.OversizedHeaderListError:
            raise  # h2's DenialOfServiceError: ENHANCE_YOUR_CALM
        except (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError) as err:
            # what h2's own wrapping catches (hpack's errors, and older hpacks' others)
            raise CompressionError(f"Error decoding header block: {err}") from err
        if raw:
            return headers
        try:
            return [type(h)(h[0].decode("utf-8"), h[1].decode("utf-8")) for h in headers]
        except UnicodeDecodeError as err:
            raise hpack.HPACKDecodingError("Unable to decode headers as UTF-8") from err

    def _plain_literals(self, data: bytes) -> list[hpack.HeaderTuple] | None:
        if type(data) is not bytes:
            data = bytes(data)
        out: list[hpack.HeaderTuple] = []
        size = 0
        pos, end = 0, len(data)
        limit = self.max_header_list_size
        while pos < end:
            first = data[pos]
            if first & 0xEF:  # anything but 0x00 (without indexing) and 0x10 (never)
                return None
            pos += 1
            if pos >= end:
                return None
            length = data[pos]
            if length >= 0x7F:  # Huffman, or a multi-byte length: hpack's
                return None
            name = data[pos + 1:pos + 1 + length]
            pos += 1 + length
            if pos >= end:
                return None
            length = data[pos]
            if length >= 0x7F or pos + 1 + length > end or len(name) == 0:
                return None
            value = data[pos + 1:pos + 1 + length]
            pos += 1 + length
            size += 32 + len(name) + len(value)  # RFC 7541 4.1, as hpack counts it
            if size > limit:
                raise hpack.OversizedHeaderListError(
                    f"A header list larger than {limit} has been received")
            out.append(hpack.NeverIndexedHeaderTuple(name, value) if first
                       else hpack.HeaderTuple(name, value))
        return out


class H2Codec(h2.connection.H2Connection):
    """H2Connection with the zero-copy input and the list output described above."""

    # how closed streams ended, for late frames on them: h2 keeps 65,536 per connection,
    # ~25 MiB a long-lived session grew by over 160,000 forwards; SPDY's codec keeps 1,024
    MAX_CLOSED_STREAMS = 1024

    def inbound_window_max(self, size: int) -> None:
        """The connection's receive window is `size` in all: h2 gives back what was
        received once half of that is processed (increment_flow_control_window made its
        max the window left at the time, less what was outstanding)."""
        self._inbound_flow_control_window_manager.max_window_size = size

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        config = config or h2.config.H2Configuration(client_side=True)
        # received header blocks: checked and decoded here, in one pass (see above)
        self._check_headers = config.validate_inbound_headers
        self._decode_as = config.header_encoding if isinstance(config.header_encoding,
                                                                str) else None
        config.validate_inbound_headers = False
        config.header_encoding = None
        super().__init__(config=config)
        self.decoder = LiteralHeaderDecoder()
        self.decoder.max_header_list_size = self.DEFAULT_MAX_HEADER_LIST_SIZE
        self.incoming_buffer: ViewFrameBuffer = ViewFrameBuffer(
            server=not self.config.client_side)
        self.incoming_buffer.can_split = self._accepts_data
        self._frame_dispatch_table[ViewDataFrame] = self._receive_data_frame
        self._output: list[bytes | memoryview] = []
        # called with each frame that opens a stream or costs work or an answer without
        # carrying data (see _receive_frame); raises Overloaded to end the connection
        self.charge_frame: Callable[[Frame, bool], None] | None = None
        self.window_update_credit = WindowUpdateCredit()
        # stream id -> [bytes, frames] of late DATA still free on it (see _late_data)
        self._late_allowance: dict[int, list[int]] = {}
        self._walk_at = _WALK_MIN  # len(self.streams) at which _open_streams walks again

    def _open_streams(self, remainder: int) -> int:
        """Open streams of one parity, or (while that cannot change the answer) an upper
        bound: h2 compares the result + 1 with max_concurrent_streams and nothing else."""
        held = len(self.streams)
        outbound = remainder == int(self.config.client_side)
        limit = (self.remote_settings if outbound else self.local_settings).max_concurrent_streams
        if held < self._walk_at and held < limit:
            return held
        count = super()._open_streams(remainder)  # counts, and drops the closed streams
        self._walk_at = max(_WALK_MIN, 2 * len(self.streams))
        return count

    def reset_stream(self, stream_id: int, error_code: ErrorCodes | int = 0) -> None:
        stream = self.streams.get(stream_id)
        window = max(0, stream._inbound_window_manager.current_window_size) \
            if stream is not None else 0
        super().reset_stream(stream_id, error_code)
        allowance = self._late_allowance
        if len(allowance) >= LATE_DATA_STREAMS:
            del allowance[next(iter(allowance))]
        allowance[stream_id] = [window, LATE_DATA_FRAMES + window // LATE_DATA_FRAME_BYTES]

    def _late_data(self, frame: DataFrame) -> bool:
        """DATA on a stream this side reset, within what may have been in flight when the
        peer learned (the stream's window at the reset): a refused connection's first
        bytes, an upload in flight when the pod reset. Not charged: 1,100 refusals with
        their first bytes in flight ended sessions at max_connections_per_session. Past it
        charged: h2 answers each with RST_STREAM (20,000 frames on one reset stream were
        20,000 free answers)."""
        left = self._late_allowance.get(frame.stream_id)
        if left is None:
            return False
        size = len(frame.data) + (frame.pad_length or 0)
        if size > left[0] or left[1] <= 0 or not (size or "END_STREAM" in frame.flags):
            del self._late_allowance[frame.stream_id]
            return False
        left[0] -= size
        left[1] -= 1
        return True

    def _accepts_data(self, stream_id: int, length: int) -> bool:
        """Would h2 take a DATA frame of this length on this stream without complaint?"""
        stream = self.streams.get(stream_id)
        return (stream is not None
                and stream.state_machine.state in _RECEIVING
                and self.state_machine.state is not ConnectionState.CLOSED
                and length <= stream._inbound_window_manager.current_window_size
                and length <= self._inbound_flow_control_window_manager.current_window_size)

    def _receive_frame(self, frame: Frame) -> list[Event]:
        """h2's, after `charge_frame` for every frame but DATA on a stream that takes it,
        WINDOW_UPDATE within the credit DATA sent earns (WindowUpdateCredit),
        CONTINUATION and GOAWAY: its second argument says whether the frame opens a
        stream."""
        charge = self.charge_frame
        if charge is not None and not isinstance(frame, _FREE_FRAMES):
            if isinstance(frame, DataFrame):
                # data h2 would answer with RST_STREAM, or a frame that carries no data
                # (padding only counts as none) and ends nothing
                if not self._accepts_data(frame.stream_id, 0):
                    if not self._late_data(frame):
                        charge(frame, False)
                elif not (len(frame.data) or "END_STREAM" in frame.flags):
                    charge(frame, False)
            elif isinstance(frame, WindowUpdateFrame):
                if not self.window_update_credit.spend():
                    charge(frame, False)
            elif isinstance(frame, HeadersFrame):
                charge(frame, frame.stream_id not in self.streams)
            else:
                charge(frame, False)
        if type(frame) is ViewDataFrame and not frame.flags:
            events = self._receive_plain_data(frame)
            if events is not None:
                return events
        try:
            events = super()._receive_frame(frame)
        except ProtocolError as e:
            reason = self._stream_error_reason(frame, e)
            if reason is None:
                raise
            return self._stream_error(frame, reason)
        if self._check_headers or self._decode_as:
            for event in events:
                if isinstance(event, _HEADER_EVENTS):
                    self._receive_header_block(event)
        return events

    def _stream_error_reason(self, frame: Frame, error: ProtocolError) -> str | None:
        """Why `error`, raised by h2 for `frame`, is a stream error (RFC 9113 5.4.2), not the
        connection error h2 makes it; None: it is one. h2 raises these once the frame's
        header block, if any, is decoded (the HPACK context is in step) and its stream is
        open; a stream never opened (idle) is left to h2, RST_STREAM being no answer there
        (6.4: the peer would take it for a connection error)."""
        if self.state_machine.state is ConnectionState.CLOSED:
            return None  # the connection could not take the frame at all
        sid = frame.stream_id
        if isinstance(error, InvalidBodyLengthError):  # raised only by DATA
            return f"a body other than its content-length: {error}"  # 8.1.1
        if type(error) is not ProtocolError:  # flow control, too many streams, ...
            return None
        if (isinstance(frame, PriorityFrame)
                or (isinstance(frame, HeadersFrame) and "PRIORITY" in frame.flags)) \
                and frame.depends_on == sid and not self._idle(sid):
            return "a stream that depends on itself"  # 5.3.1
        stream = self.streams.get(sid)
        if isinstance(frame, HeadersFrame) and "END_STREAM" not in frame.flags \
                and stream is not None and stream.state_machine.trailers_received:
            return "a second HEADERS that does not end the stream"  # 8.1: trailers end it
        return None

    def _stream_error(self, frame: Frame, reason: str) -> list[Event]:
        """RST_STREAM PROTOCOL_ERROR on the frame's stream, and the event that says so. A
        DATA frame's bytes go back to the connection's window: nobody else sees them."""
        sid = frame.stream_id
        stream = self.streams.get(sid)
        if stream is not None and not stream.closed:
            self.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
        else:  # a PRIORITY frame on a stream closed already: the frame alone
            rst = RstStreamFrame(sid)
            rst.error_code = ErrorCodes.PROTOCOL_ERROR
            self._prepare_for_sending([rst])
        if isinstance(frame, DataFrame):
            self.acknowledge_received_data(frame.flow_controlled_length, sid)
        return [StreamError(sid, reason)]

    def _idle(self, stream_id: int) -> bool:
        """The stream was never opened, by either side (RFC 9113 5.1)."""
        highest = (self.highest_outbound_stream_id if self._stream_id_is_outbound(stream_id)
                   else self.highest_inbound_stream_id)
        return stream_id not in self.streams and stream_id > highest

    def _receive_rst_stream_frame(self, frame: RstStreamFrame
                                  ) -> tuple[list[Frame], list[Event]]:
        """h2's, but RST_STREAM on an idle stream is a connection error of type
        PROTOCOL_ERROR (RFC 9113 6.4), where h2 ignores it."""
        if self._idle(frame.stream_id):
            raise ProtocolError(f"RST_STREAM on idle stream {frame.stream_id}")
        return super()._receive_rst_stream_frame(frame)

    def _receive_plain_data(self, frame: ViewDataFrame) -> list[Event] | None:
        """A DATA frame with no flags on a stream that takes it, as h2 would handle it
        (both windows consumed, one DataReceived), without the two state machines'
        transitions, which change nothing for DATA in these states, and h2's trace
        formatting: a small frame cost ~8 us this way and ~3.5 us now, and the first
        byte of every forwarded connection crosses two. None: anything else, left to h2
        (a window exceeded, a stream without headers or with a content-length, ...)."""
        n = len(frame.data)
        if not self._accepts_data(frame.stream_id, n):
            return None
        stream = self.streams[frame.stream_id]
        if not stream.state_machine.headers_received \
                or stream._expected_content_length is not None:
            return None
        self._inbound_flow_control_window_manager.current_window_size -= n
        stream._inbound_window_manager.current_window_size -= n
        event = DataReceived(stream_id=frame.stream_id)
        event.data = frame.data
        event.flow_controlled_length = n
        return [event]

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False,
                  pad_length: int | None = None) -> None:
        """h2's; a DATA frame that neither ends its stream nor is padded, on a stream that
        may send, within both windows and the frame size, is queued here directly (the
        windows decreased as h2 would; no state changes for DATA in these states)."""
        self.window_update_credit.earn(1)
        n = len(data)
        if not end_stream and pad_length is None and n <= self.max_outbound_frame_size \
                and n <= self.outbound_flow_control_window \
                and self.state_machine.state in _CONNECTION_OPEN:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.state_machine.state in _SENDING \
                    and n <= stream.outbound_flow_control_window:
                stream.outbound_flow_control_window -= n
                self.outbound_flow_control_window -= n
                self._queue_data(stream_id, _unwrapped(data), 0)
                return
        super().send_data(stream_id, data, end_stream, pad_length)

    def _queue_data(self, stream_id: int, data: bytes | memoryview, flags: int) -> None:
        """A DATA frame (no padding) into the output: header and payload, the payload not
        copied when big, small frames joined up to _COALESCE."""
        n = len(data)
        header = _HEADER.pack(n >> 8, n & 0xFF, _DATA_TYPE, flags, stream_id)
        if n > _COALESCE:
            self._out().extend((header, data))
            return
        self._queue(header + data)

    def _queue(self, raw: bytes) -> None:
        """A frame's bytes into the output, small ones joined up to _COALESCE."""
        out = self._out()
        last = out[-1] if out else None
        if type(last) is bytes and len(last) + len(raw) <= _COALESCE:
            out[-1] = last + raw
        else:
            out.append(raw)

    def _out(self) -> list[bytes | memoryview]:
        """The output list, after what h2 wrote to its own buffer (the connection
        preface), so that the order on the wire is kept."""
        out = self._output
        if self._data_to_send:
            out.append(bytes(self._data_to_send))
            self._data_to_send = bytearray()
        return out

    def _receive_header_block(self, event: RequestReceived | ResponseReceived |
                              TrailersReceived | InformationalResponseReceived) -> None:
        """Check a received header block (ProtocolError: h2 answers it with GOAWAY) and
        decode it in place as h2 would have."""
        headers = cast("list[tuple[bytes, bytes]]", event.headers or [])
        if self._check_headers:
            problem = header_block_problem(
                headers,
                response=isinstance(event, (ResponseReceived, InformationalResponseReceived)),
                trailer=isinstance(event, TrailersReceived))
            if problem is not None:
                raise ProtocolError(f"received {problem}")
        encoding = self._decode_as
        if encoding:
            try:
                decoded = [(name.decode(encoding), value.decode(encoding))
                           for name, value in headers]
            except UnicodeDecodeError:
                raise ProtocolError(f"received a header that is not {encoding}") from None
            event.headers = cast("list[tuple[bytes, bytes]]", decoded)  # as h2 decodes

    def send_queued(self, stream_id: int, out: Outbound) -> bool:
        """Send from the front of `out` what the stream's and the connection's windows
        allow, a chunk split at the window as memoryview slices (no copy). True when `out`
        is empty (its END_STREAM sent if asked), False when the window closed first.
        ProtocolError (the stream was reset meanwhile) propagates."""
        chunks = out.chunks
        while chunks:
            window = min(self.local_flow_control_window(stream_id),
                         self.max_outbound_frame_size)
            if window <= 0:
                return False
            chunk = out.take(window)
            last = out.eof and not chunks
            payload = cast("bytes", _Payload(chunk)) if type(chunk) is memoryview else chunk
            self.send_data(stream_id, payload, end_stream=last)
            if last:
                return True
        if out.eof:
            self.end_stream(stream_id)
        return True

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        if not frames:
            return
        for f in frames:
            if type(f) is DataFrame and "PADDED" not in f.flags and f.data:
                self._queue_data(f.stream_id, _unwrapped(f.data),
                                 _FLAG_END_STREAM if "END_STREAM" in f.flags else 0)
            else:
                self._queue(f.serialize())

    def receive_data(self, data: Buffer, lent: bool = False) -> list[Event]:
        """h2's, and with `lent` the input may be a buffer its owner reuses once the
        events are acted on: DATA payloads in the events are views of it (act on them, or
        copy them, before returning to the owner), and what is left of a frame that goes
        on in the next read is copied here."""
        buffer = self.incoming_buffer
        buffer.lent = lent
        # an encoded block within the advertised list size is never bigger than it (each
        # field counts 32 bytes more than its name and value): twice is ample
        buffer.max_header_block = 2 * (self.local_settings.max_header_list_size
                                       or self.DEFAULT_MAX_HEADER_LIST_SIZE)
        try:
            return super().receive_data(data)
        finally:
            if lent:
                buffer.lent = False
                buffer.keep()

    def take_output(self) -> list[bytes | memoryview]:
        """Everything queued to send, as buffers for `transport.writelines`."""
        out = self._out()
        if not out:
            return []
        self._output = []
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        """h2's API, for callers that want one block (joins; the hot path uses
        take_output)."""
        out = self.take_output()
        data = b"".join(out)
        if amount is not None and len(data) > amount:
            self._output = [data[amount:]]
            data = data[:amount]
        return data

    def clear_outbound_data_buffer(self) -> None:
        super().clear_outbound_data_buffer()
        self._output = []
