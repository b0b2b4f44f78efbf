"""Read-side backpressure shared by the server's sessions and the client's: one transport
read by many forwarded connections, paused while any of them is congested; the read
buffer their protocols read into; and how views of it are written on (write_lent)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Hashable, Sequence


class ReadGate:
    """Pauses a transport's reading while at least one key holds it.

    Each congested party (a forwarded connection, a stream) holds the gate with its own key;
    the transport reads again once the last key lets go. Pausing twice with the same key
    needs one resume. The transport is passed per call because sessions get theirs after
    they are built (and may have none, e.g. in tests)."""

    __slots__ = ("_holders",)

    def __init__(self) -> None:
        self._holders: set[Hashable] = set()

    def pause(self, key: Hashable, transport: asyncio.ReadTransport | None) -> None:
        if not self._holders and transport is not None:
            transport.pause_reading()
        self._holders.add(key)

    def resume(self, key: Hashable, transport: asyncio.ReadTransport | None) -> None:
        if key not in self._holders:
            return
        self._holders.discard(key)
        if not self._holders and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def forget(self, key: Hashable) -> None:
        """Drop `key` without touching the transport (its owner is gone)."""
        self._holders.discard(key)

    def holds(self, key: Hashable) -> bool:
        return key in self._holders

    @property
    def paused(self) -> bool:
        return bool(self._holders)


# Reads of up to 1 MiB, not the loop's 256 KiB, by crishim serve (from pods and clients)
# and crishim port-forward (from its session): a quarter of the reads, DATA frames and
# writes per MiB, and fewer wake-ups down the line (client-go also spends less per byte on
# bigger frames). One buffer per thread's loop, shared by every connection: what is kept
# of a read is copied out before the next (the rest is written from it: write_lent).
READ_SIZE = 1 << 20
_reads = threading.local()


def read_buffer() -> memoryview:
    """The calling thread's read buffer (BufferedProtocol.get_buffer)."""
    view: memoryview | None = getattr(_reads, "view", None)
    if view is None:
        view = _reads.view = memoryview(bytearray(READ_SIZE))
    return view


def plain_socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor of transport's socket where its bytes go out as they are (plain
    TCP, not through TLS), for write_lent; -1 where they do not."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None or \
            transport.get_extra_info("ssl_object") is not None:
        return -1
    return int(sock.fileno())


# Pieces of one read written with one writev(2) (IOV_MAX is 1024); more are joined first.
_MAX_IOV = 512


def write_lent(transport: asyncio.WriteTransport, fd: int,
               pieces: list[bytes | memoryview]) -> None:
    """Write views of the loop's read buffer, which the next read overwrites, so the
    transport must not keep them: while it holds nothing they go straight to its socket
    `fd` with one writev(2); only what the socket did not take is copied, joined, and
    queued on the transport (usually nothing; one buffer however many pieces)."""
    if not transport.get_write_buffer_size() and len(pieces) <= _MAX_IOV and \
            not transport.is_closing():
        try:
            sent = os.writev(fd, pieces)
        except OSError:  # EAGAIN, or an error the transport's own write meets below
            sent = 0
        if sent:
            left = unsent(pieces, sent)
            if left:
                transport.write(b"".join(left))
            return
    transport.write(b"".join(pieces))


def unsent(pieces: Sequence[bytes | bytearray | memoryview], sent: int
           ) -> list[bytes | bytearray | memoryview]:
    """What is left of pieces once their first `sent` bytes were written."""
    for i, piece in enumerate(pieces):
        size = len(piece)
        if sent < size:
            rest = list(pieces[i:])
            if sent:
                rest[0] = memoryview(piece)[sent:]
            return rest
        sent -= size
    return []
