"""crishim check's pod servers (run in the sandbox, where any process may connect): the
source makes its bytes as the reader takes them, and a first line that is not a size
closes the connection."""

from __future__ import annotations

import asyncio
import os

from crishim.client.podservers import MAX_SIZED, SizedSink, Source, source_bytes
from tests.support import status_mib


async def _exchange(protocol, request: bytes, read_at_most: int) -> bytes:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    got = bytearray()
    while len(got) < read_at_most:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
        if not chunk:
            break
        got += chunk
    writer.close()
    server.close()
    return bytes(got)


def test_the_source_sends_what_it_promised():
    got = asyncio.run(_exchange(Source, b"5000001\n", 10_000_000))
    assert got == source_bytes(5_000_001)


def test_a_source_of_a_tebibyte_is_made_as_it_is_read():
    """source_bytes(N) was built whole first: a 1 TiB request took the pod server to
    5.2 GB before it was killed."""
    before = status_mib(os.getpid())
    got = asyncio.run(_exchange(Source, b"%d\n" % MAX_SIZED, 16 << 20))
    assert len(got) >= 16 << 20 and got[:1000] == source_bytes(1000)
    # the 16 MiB read, its copy and the buffers on the way are ~40 MiB; a process that ran
    # the whole suite before this grew 76 MiB (its heap's state), against GBs for the bug
    assert status_mib(os.getpid()) - before < 256


def test_a_first_line_that_is_no_size_closes_the_connection():
    for protocol in (Source, SizedSink):
        for request in (b"abc\n", b"%d\n" % (MAX_SIZED + 1), b"9" * 5000 + b"\n"):
            assert asyncio.run(_exchange(protocol, request, 1)) == b""
