"""The client session library against a scripted server over a real socket: answers that
arrive together with the upgrade response are not lost."""

import asyncio

import h2.config
import h2.connection
import h2.errors
import h2.events
import h11
import pytest

from crishim.client.transports import ForwardError, open_session
from crishim.protocols import spdy
from crishim.protocols import websocket as ws
from tests.support import until


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


async def _spdy_upgraded(reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> spdy.SpdyConnection:
    """A scripted server's side: the upgrade request read, a 101 to SPDY on
    portforward.crishim.dev/v1 written, and the codec for what follows."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                 b"Upgrade: SPDY/3.1\r\n"
                 b"X-Stream-Protocol-Version: portforward.crishim.dev/v1\r\n\r\n")
    return spdy.SpdyConnection(spdy.SpdyConfig())


def test_a_server_that_does_not_acknowledge_dial_on_data_gets_no_pairs_opened_ahead():
    """A server that speaks portforward.crishim.dev/v1 from before dial: on-data dials a pair
    at once and replies without the acknowledgement: the client resets that pair (no pod
    connection left that nobody reads) and opens no more ahead."""

    async def main() -> None:
        events: list[spdy.Event] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            codec = await _spdy_upgraded(reader, writer)
            while data := await reader.read(65536):
                for ev in codec.receive_data(data):
                    events.append(ev)
                    if isinstance(ev, spdy.StreamOpened):
                        codec.reply(ev.stream_id, {})  # no dial: on-data in the reply
                        if ev.headers.get("streamtype") == "data":
                            codec.send_data(ev.stream_id, b"hi")  # dialled at once
                writer.write(codec.data_to_send())
            writer.close()

        def opened_ahead() -> list[int]:
            return [e.stream_id for e in events if isinstance(e, spdy.StreamOpened)
                    and e.headers.get("dial") == "on-data"]

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x", "spdy")
            assert session.stream_version == "portforward.crishim.dev/v1"
            reader, writer = await session.open_stream(7000)
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            await until(lambda: opened_ahead())  # opened ahead after the first bytes
            sid = opened_ahead()[0]
            await until(lambda: any(isinstance(e, spdy.StreamReset) and e.stream_id == sid
                                    for e in events))  # and reset once answered
            assert not session.open_ahead and not session._ahead
            reader2, _ = await session.open_stream(7000)  # a pair of its own
            assert await asyncio.wait_for(reader2.readexactly(2), 5) == b"hi"
            await asyncio.sleep(0.3)
            assert len(opened_ahead()) == 1  # and none after it
            session.close()

    asyncio.run(main())


ERROR_LINE = "connection refused by a hostile pod\n" * 1800  # 64,800 characters


class ErrorFlood:
    """A stream server's side that answers every stream and sends ERROR_LINE on the first
    error stream until the client resets it, `most` bytes are sent or 10 s pass."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.sent = 0
        self.error_ids: list[int] = []
        self.resets: list[int] = []

    def going(self, reading: asyncio.Future[None]) -> bool:
        return (self.sent < self.most and not set(self.error_ids) & set(self.resets)
                and not reading.done())

    async def spdy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io"
                     b"\r\n\r\n")
        codec = spdy.SpdyConnection(spdy.SpdyConfig())

        async def read() -> None:
            while data := await reader.read(65536):
                for ev in codec.receive_data(data):
                    if isinstance(ev, spdy.StreamOpened):
                        codec.reply(ev.stream_id, {})
                        if ev.headers.get("streamtype") == "error":
                            self.error_ids.append(ev.stream_id)
                    elif isinstance(ev, spdy.StreamReset):
                        self.resets.append(ev.stream_id)
                writer.write(codec.data_to_send())

        reading = asyncio.ensure_future(read())
        async with asyncio.timeout(10):
            while self.going(reading):
                if self.error_ids:
                    codec.send_data(self.error_ids[0], ERROR_LINE.encode())
                    self.sent += len(ERROR_LINE)
                writer.write(codec.data_to_send())
                await writer.drain()
                await asyncio.sleep(0)
        reading.cancel()
        writer.close()

    async def h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()

        async def read() -> None:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                        if (b"streamtype", b"error") in ev.headers:
                            self.error_ids.append(ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset):
                        self.resets.append(ev.stream_id)
                writer.write(conn.data_to_send())

        reading = asyncio.ensure_future(read())
        line = ERROR_LINE.encode()
        async with asyncio.timeout(10):
            while self.going(reading):
                if self.error_ids:
                    sid = self.error_ids[0]
                    n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if n:
                        conn.send_data(sid, line[:n])
                        self.sent += n
                writer.write(conn.data_to_send())
                await writer.drain()
                await asyncio.sleep(0.001)
        reading.cancel()
        writer.close()


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_error_text_past_4_kib_is_cut_and_its_stream_reset(transport):
    """A server that answers a pair and sends error text without end: the client keeps
    4 KiB of it, resets the error stream and ends the connection with the cut text."""

    async def main() -> None:
        flood = ErrorFlood(32 << 20)  # the most it sends (the client kept it all: the bug)
        server = await asyncio.start_server(getattr(flood, transport.replace("-", "_")),
                                            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x",
                                         transport, ping_interval=0)
            reader, writer = await session.open_stream(7000)
            writer.write(b"hi")
            with pytest.raises(ForwardError) as e:
                await asyncio.wait_for(reader.read(), 5)
            message = str(e.value)
            assert e.value.fatal
            assert message.startswith("connection refused by a hostile pod\n")
            assert message.endswith("… (the first 4096 characters of the error stream)")
            assert len(message) < 4096 + 60
            await until(lambda: flood.error_ids and flood.error_ids[0] in flood.resets)
            assert flood.sent < flood.most, flood.sent
            session.close()

    asyncio.run(main())


def test_h2_preface_goes_before_the_ack_of_settings_that_came_with_the_connect():
    """An HTTP/2 server that writes its SETTINGS at accept (the h2 library's, Go's): they
    reach the client before its preface is out; the preface must still come first (its
    SETTINGS ACK went ahead of it: 'Invalid HTTP/2 preamble', the connection reset)."""

    async def main() -> None:
        first: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            writer.write(conn.data_to_send())  # before anything is read
            await writer.drain()
            reads = 0
            while data := await reader.read(65536):
                if not reads:
                    first.append(data)  # each connection's first read
                reads += 1
                conn.receive_data(data)
                writer.write(conn.data_to_send())
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            for _ in range(20):  # the server's SETTINGS must be read before the attach
                session = await open_session(f"http://127.0.0.1:{port}/portforward/x", "h2",
                                             ping_interval=0)
                assert await session.ping(5) < 5
                session.close()
        assert len(first) == 20
        assert all(data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") for data in first)

    asyncio.run(main())


def test_h2_stream_refusal_keeps_4_kib_of_its_body():
    """An HTTP/2 server that refuses a stream with 403 and a 1 MiB body: the client's
    message keeps the status and at most 4 KiB of the body (it kept all of it)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        body = b"no " * (1 << 18)
        pending: dict[int, int] = {}
        while data := await reader.read(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived) and \
                        (b"streamtype", b"data") in ev.headers:
                    conn.send_headers(ev.stream_id, [(":status", "403")])
                    pending[ev.stream_id] = 0
                elif isinstance(ev, h2.events.RequestReceived):
                    conn.send_headers(ev.stream_id, [(":status", "200")])
            for sid, sent in list(pending.items()):
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size,
                        len(body) - sent)
                if n:
                    conn.send_data(sid, body[sent:sent + n], end_stream=sent + n == len(body))
                    pending[sid] = sent + n
                if pending[sid] == len(body):
                    del pending[sid]
            writer.write(conn.data_to_send())
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x", "h2",
                                         ping_interval=0)
            reader, _writer = await session.open_stream(7000)
            with pytest.raises(ForwardError) as e:
                await asyncio.wait_for(reader.read(), 20)
            message = str(e.value)
            assert message.startswith("the server refused the stream (HTTP 403: no no")
            assert len(message) < 4096 + 200, len(message)
            session.close()

    asyncio.run(main())


def test_spdy_data_dropped_for_a_stream_reset_here_gives_the_session_window_back():
    """crishim port-forward over SPDY with windows: DATA a server sent before it learned
    of the client's reset is dropped, and its session window must go back as HTTP/2's
    does; it went back only for DATA a connection took, so each connection reset while
    its download came kept some, and ~270 of them stalled the session for good."""

    async def main() -> None:
        updates: list[tuple[int, int]] = []
        reset = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            codec = await _spdy_upgraded(reader, writer)
            while data := await reader.read(65536):
                late = b""
                for ev in codec.receive_data(data):
                    if isinstance(ev, spdy.StreamOpened):
                        codec.reply(ev.stream_id, {"flow-control": "windows"})
                        if ev.headers.get("streamtype") == "data":
                            codec.send_data(ev.stream_id, b"first")
                    elif isinstance(ev, spdy.WindowUpdateReceived) and reset.is_set():
                        updates.append((ev.stream_id, ev.delta))
                    elif isinstance(ev, spdy.StreamReset):
                        # DATA that was on its way: 3 frames of 100,000 bytes
                        header = (ev.stream_id.to_bytes(4, "big")
                                  + (100_000).to_bytes(4, "big"))
                        late += (header + bytes(100_000)) * 3
                        reset.set()
                writer.write(codec.data_to_send() + late)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x", "spdy")
            reader, writer = await session.open_stream(7000)
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"first"
            writer.transport.abort()  # the local connection reset: the stream is reset
            await asyncio.wait_for(reset.wait(), 5)
            await until(lambda: sum(d for sid, d in updates if sid == 0) >= 300_000)
            session.close()

    asyncio.run(main())


async def _spdy_resetting_data(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
    """Answers each pair, then resets its data stream with CANCEL."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                 b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
    codec = spdy.SpdyConnection(spdy.SpdyConfig())
    while data := await reader.read(65536):
        for ev in codec.receive_data(data):
            if isinstance(ev, spdy.StreamOpened):
                codec.reply(ev.stream_id, {})
                if ev.headers.get("streamtype") == "data":
                    codec.reset_stream(ev.stream_id, spdy.CANCEL)
        writer.write(codec.data_to_send())
    writer.close()


async def _h2_resetting_data(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    while data := await reader.read(65536):
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                conn.send_headers(ev.stream_id, [(":status", "200")])
                if (b"streamtype", b"data") in ev.headers:
                    conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.CANCEL)
        writer.write(conn.data_to_send())
    writer.close()


@pytest.mark.parametrize("transport", ["spdy", "h2"])
def test_a_reset_from_the_server_names_its_code_the_same_on_spdy_and_h2(transport):
    """SPDY said `(RST_STREAM status 5)`, HTTP/2 `(RST_STREAM 8)`: both CANCEL."""

    async def main() -> None:
        server = await asyncio.start_server(
            _spdy_resetting_data if transport == "spdy" else _h2_resetting_data,
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            session = await open_session(f"http://127.0.0.1:{port}/portforward/x",
                                         transport, ping_interval=0)
            stream, _ = await session.open_connection(7000, asyncio.Protocol)
            await until(lambda: stream.failure, 5)
            assert stream.failure == "the server reset the connection (RST_STREAM CANCEL)"
            session.close()

    asyncio.run(main())
