"""The client session library against a scripted server over a real socket: answers that
arrive together with the upgrade response are not lost."""

import asyncio

import h11
import pytest

from crishim.client.transports import ForwardError, open_session
from crishim.protocols import websocket as ws


async def _scripted_channel_server(script) -> tuple[asyncio.AbstractServer, int]:
    """Accept one WebSocket upgrade; write the 101 and script(codec)'s frames in ONE write."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        request = conn.next_event()
        response, _ = ws.accept_handshake(list(request.headers), [ws.CHANNEL_BINARY])
        codec = ws.ChannelCodec([7000], base64=False)
        codec.start()
        script(codec)
        writer.write(response + b"".join(bytes(b) for b in codec.take_output()))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_channel_error_and_close_in_the_upgrade_read_reach_the_port():
    async def main() -> None:
        def refuse(codec: ws.ChannelCodec) -> None:
            codec.send_error(0, "connection refused")
            codec.close(ws.CLOSE_NORMAL)

        server, port = await _scripted_channel_server(refuse)
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x",
                                         "websocket", [7000])
            reader, _ = await session.open_stream(7000)
            with pytest.raises(ForwardError, match="connection refused"):
                await asyncio.wait_for(reader.read(), 5)

    asyncio.run(main())


def test_channel_data_before_the_port_is_opened_is_delivered():
    async def main() -> None:
        def greet(codec: ws.ChannelCodec) -> None:
            codec.send_data(0, b"hello early")
            codec.close(ws.CLOSE_NORMAL)

        server, port = await _scripted_channel_server(greet)
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x",
                                         "websocket", [7000])
            reader, _ = await session.open_stream(7000)
            assert await asyncio.wait_for(reader.read(), 5) == b"hello early"

    asyncio.run(main())
