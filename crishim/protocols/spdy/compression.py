"""SPDY/3 header blocks: the name/value layout and its zlib compression with the SPDY/3
preset dictionary, inflation bounded so a small block cannot expand without limit."""

from __future__ import annotations

import struct
import zlib

from .constants import MAX_FRAME_PAYLOAD
from .errors import CompressionError, HeaderBlockError


def _build_dictionary() -> bytes:
    # SPDY/3 draft, section 2.6.10.1: 65 length-prefixed words, then one raw run.
    words = (
        "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
        "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
        "authorization", "cache-control", "connection", "content-base", "content-encoding",
        "content-language", "content-length", "content-location", "content-md5",
        "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
        "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
        "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
        "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
        "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
        "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
        "public", "set-cookie", "keep-alive", "origin",
    )
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        "502504505"
        "203 Non-Authoritative Information204 No Content301 Moved Permanently"
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found"
        "500 Internal Server Error501 Not Implemented503 Service Unavailable"
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
        "application/xhtml+xml,text/plain,text/javascript,public"
        "privatemax-age=gzip,deflate,sdch"
        "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    out = bytearray()
    for word in words:
        raw = word.encode("ascii")
        out += len(raw).to_bytes(4, "big") + raw
    out += tail.encode("ascii")
    return bytes(out)


#: The zlib preset dictionary every SPDY/3 header block is compressed with (1423 bytes).
SPDY3_DICTIONARY = _build_dictionary()

_U32 = struct.Struct(">I")


def pack_header_block(headers: dict[str, str]) -> bytes:
    """Lay out a header block (uncompressed): names lowercased, values kept raw.

    Several values of one header travel as one value joined by NUL.
    """
    lowered: dict[bytes, bytes] = {}
    for name, value in headers.items():
        raw_name = name.lower().encode("latin-1")
        if not raw_name:
            raise ValueError("header names must not be empty")
        if raw_name in lowered:
            raise ValueError(f"header {name!r} appears twice once lowercased")
        lowered[raw_name] = value.encode("latin-1")
    parts = [_U32.pack(len(lowered))]
    for raw_name, raw_value in lowered.items():
        parts.append(_U32.pack(len(raw_name)))
        parts.append(raw_name)
        parts.append(_U32.pack(len(raw_value)))
        parts.append(raw_value)
    return b"".join(parts)


# Pairs one header block may carry: a port-forward stream has 3 to 5 (client-go's
# streamtype, port, requestid; crishim's protocol and dial). Each costs a loop turn in
# Python: 25,600 tiny ones inflated from 56 KB took 10 ms, charged as one stream open.
MAX_HEADER_PAIRS = 64


def unpack_header_block(raw: bytes) -> dict[str, str]:
    """Parse an inflated header block; raises :class:`HeaderBlockError` if malformed.

    Names are lowercased (lenient towards peers that do not); bytes are decoded
    as latin-1 so nothing is lost or rejected for its encoding.
    """
    size = len(raw)
    if size == 0:
        return {}
    if size < 4:
        raise HeaderBlockError(f"header block of {size} bytes has no pair count")
    (count,) = _U32.unpack_from(raw, 0)
    # Each pair needs at least two length fields, which caps any honest count.
    if count > (size - 4) // 8:
        raise HeaderBlockError(f"pair count {count} does not fit in a {size}-byte block")
    if count > MAX_HEADER_PAIRS:
        raise HeaderBlockError(f"{count} header pairs (at most {MAX_HEADER_PAIRS})")
    headers: dict[str, str] = {}
    pos = 4
    for _ in range(count):
        if pos + 4 > size:
            raise HeaderBlockError("header block ends inside a name length")
        (name_len,) = _U32.unpack_from(raw, pos)
        pos += 4
        if name_len == 0:
            raise HeaderBlockError("header block has an empty name")
        if pos + name_len > size:
            raise HeaderBlockError(f"name length {name_len} runs past the block end")
        name = raw[pos:pos + name_len].decode("latin-1").lower()
        pos += name_len
        if pos + 4 > size:
            raise HeaderBlockError("header block ends inside a value length")
        (value_len,) = _U32.unpack_from(raw, pos)
        pos += 4
        if pos + value_len > size:
            raise HeaderBlockError(f"value length {value_len} runs past the block end")
        if name in headers:
            raise HeaderBlockError(f"header {name!r} appears twice")
        headers[name] = raw[pos:pos + value_len].decode("latin-1")
        pos += value_len
    if pos != size:
        raise HeaderBlockError(f"{size - pos} stray bytes after the last header")
    return headers


# Keeps a compressed block, plus deflate's worst-case growth, inside one frame.
MAX_RAW_HEADER_BLOCK = MAX_FRAME_PAYLOAD - 64 * 1024


class HeaderEncoder:
    """Outgoing header compression: one zlib stream for the session's life."""

    def __init__(self, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self._deflater = zlib.compressobj(level, zlib.DEFLATED, 15, 8,
                                          zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)

    def encode(self, headers: dict[str, str]) -> bytes:
        """Compress one block; invalid headers raise ValueError before the context moves."""
        raw = pack_header_block(headers)
        if len(raw) > MAX_RAW_HEADER_BLOCK:
            raise ValueError(f"header block of {len(raw)} bytes cannot fit in one frame")
        return self._deflater.compress(raw) + self._deflater.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecoder:
    """Incoming header decompression, bounded by ``max_size`` inflated bytes per block."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._inflater = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self.broken = False

    def inflate(self, block: bytes | memoryview) -> bytes:
        """Inflate one block; raises :class:`CompressionError` and stays broken after."""
        if self.broken:
            raise CompressionError("header decompression context is already broken")
        try:
            raw = self._inflater.decompress(block, self.max_size + 1)
        except zlib.error as exc:
            self.broken = True
            raise CompressionError(f"header block does not inflate: {exc}") from None
        if len(raw) > self.max_size:
            self.broken = True
            raise CompressionError(f"header block inflates beyond {self.max_size} bytes")
        if self._inflater.eof:
            # The peer ended its zlib stream; the next block would have nowhere to go.
            self.broken = True
            raise CompressionError("header block ends the session's zlib stream")
        return raw

    def decode(self, block: bytes | memoryview) -> dict[str, str]:
        return unpack_header_block(self.inflate(block))

