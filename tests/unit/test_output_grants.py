"""What waits for a client to read is granted from the output budget: a session admitted
while it is spent holds 64 KiB towards its client until sessions holding the budget end,
then gets the whole allowance (4 x buffer_size), oldest waiting first. In-process stream
server, real HTTP/2 connections on 127.0.0.1, unprivileged."""

from __future__ import annotations

import asyncio

from crishim.budget import FloodLimits
from crishim.config import Config
from crishim.flow import READ_SIZE
from crishim.forward import ForwardContext
from crishim.sandboxes import NamedNetnsRuntime
from crishim.stream.server import OUTPUT_UNGRANTED, StreamServer
from crishim.tokens import StreamRequest, TokenStore
from tests.support.h2_pf_client import H2Client

BUFFER = 256 * 1024
ALLOWANCE = 4 * BUFFER + READ_SIZE  # what one admitted session takes from the budget


async def _sessions_and_marks() -> list[list[int]]:
    ctx = ForwardContext(NamedNetnsRuntime(Config(sandboxes={"web": "host"})),
                         buffer_size=BUFFER, flood=FloodLimits(buffer_budget=2 * ALLOWANCE))
    tokens = TokenStore()
    server = StreamServer(tokens, ctx)
    await server.start()
    clients, order = [], []  # the clients and their sessions, oldest first

    def high_marks() -> list[int]:  # each live session's mark towards its client
        return [s.transport.get_write_buffer_limits()[1] for s in order
                if s in server.sessions]

    for _ in range(4):
        url = f"http://127.0.0.1:{server.port}/portforward/" + tokens.issue(
            StreamRequest("web", ()))
        client = await H2Client.connect(url)
        sid = client.open_stream(client.request_headers(streamtype="error", port="80",
                                                        requestid="0"), end_stream=True)
        await asyncio.wait_for(client.streams[sid].responded.wait(), 5)
        (new,) = server.sessions.difference(order)
        order.append(new)
        clients.append(client)
    marks = [high_marks()]
    for client in clients[:2]:  # the two that hold the budget end, one after the other
        live = len(server.sessions)
        client.writer.close()
        for _ in range(500):
            if len(server.sessions) < live:
                break
            await asyncio.sleep(0.01)
        marks.append(high_marks())
    for client in clients[2:]:
        client.writer.close()
    await server.drain(1)
    return marks


def test_sessions_admitted_while_the_budget_is_spent_get_it_as_it_frees():
    full = 4 * BUFFER
    marks = asyncio.run(_sessions_and_marks())
    # two allowances in the budget: the first two sessions have theirs, the others wait
    assert marks[0] == [full, full, OUTPUT_UNGRANTED, OUTPUT_UNGRANTED]
    # the first ends: the oldest waiting session is granted, the last still waits
    assert marks[1] == [full, full, OUTPUT_UNGRANTED]
    # the second ends: the last is granted too
    assert marks[2] == [full, full]
