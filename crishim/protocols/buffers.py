"""What the codecs may keep of their input without copying it."""

from __future__ import annotations

from typing import TypeGuard


def immutable(data: object) -> TypeGuard[bytes | memoryview]:
    """`bytes`, or a memoryview of `bytes`: nobody can change it under a view handed out,
    so a codec may keep it (or views of it) as it is; anything else (a bytearray, a view
    of a buffer its owner reuses) is copied first."""
    return type(data) is bytes or (type(data) is memoryview and type(data.obj) is bytes)


# pieces smaller than this are gathered into one bytearray as they come: a flood of
# 1-byte frames costs a byte of memory per byte, not an object per piece (~40-60 bytes)
GATHER_BELOW = 4096


def gather(parts: list[bytes | bytearray | memoryview],
           piece: bytes | bytearray | memoryview) -> bool:
    """Add a small piece to the small buffer `parts` ends with (made a bytearray on the
    way). False when the piece or that buffer is not small, or `parts` is empty: the
    caller appends the piece as it keeps pieces (copied or not)."""
    if not parts or len(piece) >= GATHER_BELOW:
        return False
    last = parts[-1]
    if type(last) is not bytearray:
        if len(last) >= GATHER_BELOW:
            return False
        last = parts[-1] = bytearray(last)
    last += piece
    return True


class Outbound:
    """Bytes for one stream waiting for the peer's flow-control window (HTTP/2, and SPDY
    where the peer asked for windows)."""

    __slots__ = ("chunks", "eof", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.eof = False  # the stream's end goes out with the last queued byte
        self.size = 0

    def append(self, data: bytes | memoryview) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def take(self, n: int) -> bytes | memoryview:
        """Up to n bytes from the front: the first chunk, or a memoryview slice of it
        where it is longer (no copy). Only while chunks are left."""
        chunks = self.chunks
        chunk = chunks[0]
        if n >= len(chunk):
            chunks.pop(0)
        else:
            view = memoryview(chunk)
            chunks[0] = view[n:]
            chunk = view[:n]
        self.size -= len(chunk)
        return chunk
