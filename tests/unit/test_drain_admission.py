"""A SIGTERM drain refuses connections that have not presented a token at once; an HTTP/2
connection whose first stream is past admission's draining check (its token redeemed,
its sandbox being resolved) is not one of them: it becomes a session and is drained as
one, as an HTTP/1.1 request in that state is."""

from __future__ import annotations

import asyncio

from crishim.config import Config
from crishim.forward import ForwardContext
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from crishim.stream.server import StreamServer
from crishim.tokens import StreamRequest, TokenStore
from tests.support.h2_pf_client import H2Client


class _SlowResolve(NamedNetnsRuntime):
    """Resolving waits until the test lets it go (a slow runtime's PodSandboxStatus)."""

    def __init__(self) -> None:
        super().__init__(Config(sandboxes={"web": "host"}))
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def resolve(self, sandbox_id: str) -> Sandbox:
        self.entered.set()
        await self.release.wait()
        return await super().resolve(sandbox_id)


async def _drain_while_admitting() -> tuple[int | None, int, int]:
    plugin = _SlowResolve()
    tokens = TokenStore()
    server = StreamServer(tokens, ForwardContext(plugin))
    await server.start()
    url = f"http://127.0.0.1:{server.port}/portforward/" + tokens.issue(StreamRequest("web", ()))
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", server.port)
    client = await H2Client.connect(url)
    sid = client.open_stream(client.request_headers(streamtype="error", port="80",
                                                    requestid="0"), end_stream=True)
    await asyncio.wait_for(plugin.entered.wait(), 5)
    drain = asyncio.create_task(server.drain(10))
    await asyncio.sleep(0.05)
    refused = await asyncio.wait_for(silent_reader.read(), 5)  # no head yet: refused now
    plugin.release.set()
    try:
        await asyncio.wait_for(client.streams[sid].responded.wait(), 5)
    except TimeoutError:
        pass
    status = client.streams[sid].status
    sessions = len(server.sessions)
    client.writer.close()
    silent.close()
    await drain
    return status, sessions, refused.startswith(b"HTTP/1.1 503")


def test_an_h2_connection_past_its_draining_check_is_served_through_the_drain():
    status, sessions, refused = asyncio.run(_drain_while_admitting())
    assert refused  # a connection without a token is refused as the drain begins
    assert status == 200  # the admitted first stream is answered
    assert sessions == 1  # a live session, drained as one
