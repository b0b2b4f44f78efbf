"""Datagrams on a byte stream, sans-IO: how a forwarded UDP flow keeps its boundaries on a
data stream (SPDY, HTTP/2) that only carries bytes.

Each datagram travels as a 2-byte big-endian length, then that many bytes:

    +--------+--------+------------------ ... ---+
    | length (uint16) | payload (length bytes)   |
    +--------+--------+------------------ ... ---+

Two bytes are enough: a UDP payload is at most 65,507 bytes over IPv4 and 65,527 over
IPv6 (jumbograms aside), both below 65,536. A zero length is a valid, empty datagram.
A datagram may be split across any number of data frames, and one frame may carry many.

The decoder never raises on peer bytes: a length above its limit sets `error` and ends
decoding (the flow is then reset by whoever drives it), and its buffer never holds more
than one partial datagram (at most 65,536 bytes beyond the frame being parsed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

LENGTH_SIZE = 2
MAX_DATAGRAM = 0xFFFF  # what the 2-byte length can say
MAX_UDP_PAYLOAD = 65507  # IPv4's limit: what a flow forwards by default
_LENGTH = struct.Struct(">H")

__all__ = ["LENGTH_SIZE", "MAX_DATAGRAM", "MAX_UDP_PAYLOAD", "DatagramDecoder",
           "encode_datagram", "encode_datagrams"]


def encode_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """One datagram as it travels on the data stream. ValueError if it cannot be framed
    (a local caller's error: the kernel never hands over a bigger UDP payload)."""
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(payload)} bytes does not fit the 2-byte "
                         f"length (at most {MAX_DATAGRAM})")
    return _LENGTH.pack(len(payload)) + bytes(payload)


def encode_datagrams(payloads: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """Several datagrams as one write (a burst read from a socket in one go)."""
    return b"".join(encode_datagram(p) for p in payloads)


class DatagramDecoder:
    """Bytes from a data stream in, whole datagrams out, boundaries as sent."""

    __slots__ = ("max_datagram", "error", "datagrams", "_buffer")

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be in 0..{MAX_DATAGRAM}, got {max_datagram}")
        self.max_datagram = max_datagram
        self.error: str | None = None  # set once the peer broke the framing; then inert
        self.datagrams = 0  # decoded so far
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete datagram held until the rest arrives."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The datagrams completed by data, in order; [] once `error` is set."""
        if self.error is not None or not data:
            return []
        buf = self._buffer
        if buf:  # a partial datagram waits
            buf += data
            if len(buf) >= LENGTH_SIZE:
                (length,) = _LENGTH.unpack_from(buf, 0)
                if length <= self.max_datagram and len(buf) < LENGTH_SIZE + length:
                    return []  # still incomplete: kept (joining per piece was quadratic)
            data = bytes(buf)  # complete (or over the limit): join once, parse from start
            buf.clear()
        view = memoryview(data)
        out: list[bytes] = []
        pos, end = 0, len(view)
        while end - pos >= LENGTH_SIZE:
            (length,) = _LENGTH.unpack_from(view, pos)
            if length > self.max_datagram:
                self.error = (f"datagram {self.datagrams + 1} announces {length} bytes, more "
                              f"than the {self.max_datagram} this flow accepts")
                return out
            if end - pos - LENGTH_SIZE < length:
                break
            start = pos + LENGTH_SIZE
            out.append(bytes(view[start:start + length]))
            pos = start + length
            self.datagrams += 1
        if pos < end:
            buf += view[pos:]
        return out

    def truncated(self) -> str | None:
        """At the end of the stream: why the last datagram is incomplete, or None."""
        if self.error is None and self._buffer:
            have = len(self._buffer)
            if have < LENGTH_SIZE:
                return f"the stream ended inside a datagram's length ({have} of 2 bytes)"
            (length,) = _LENGTH.unpack_from(self._buffer, 0)
            return (f"the stream ended inside a datagram: {have - LENGTH_SIZE} of "
                    f"{length} bytes")
        return None
