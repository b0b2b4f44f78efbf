"""A test client for crishim's HTTP/2 port-forward (docs/protocol.md §5), on the `h2`
library in the client role over a real socket: h2c prior knowledge, Upgrade: h2c, or TLS
with ALPN h2. Each forward is an error stream plus a data stream sharing a requestid."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

WINDOW = 16 * 1024 * 1024
CONNECTION_WINDOW = 256 * 1024 * 1024
MAX_FRAME = 256 * 1024
_request_ids = itertools.count(1)


class StreamState:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.received = 0
        self.ended = asyncio.Event()
        self.responded = asyncio.Event()
        self.reset_code: int | None = None
        self.remote_ended = False

    def body(self) -> bytes:
        return b"".join(self.chunks)


class H2Client:
    """One HTTP/2 connection to crishim's stream server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h2.connection.H2Connection, path: str) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.path = path
        self.streams: dict[int, StreamState] = {1: StreamState()}
        self.window_opened = asyncio.Event()
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.hold_acks: set[int] = set()  # streams whose DATA we do not acknowledge yet
        self._held: dict[int, int] = {}
        self._task: asyncio.Task | None = None

    # --- connecting ----------------------------------------------------------------------
    @staticmethod
    def _new_conn(window: int = WINDOW) -> h2.connection.H2Connection:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
        })
        conn.max_inbound_frame_size = MAX_FRAME
        return conn

    @classmethod
    async def connect(cls, url: str, mode: str = "prior", path: str | None = None,
                      reading: bool = True, window: int = WINDOW,
                      connection_window: int = CONNECTION_WINDOW) -> H2Client:
        """mode: prior (h2c prior knowledge), upgrade (Upgrade: h2c) or tls (ALPN h2).
        reading=False: nothing the server sends is read until start_reading(); window:
        the streams' receive window, connection_window the connection's."""
        u = urlsplit(url)
        path = path or u.path
        conn = cls._new_conn(window)
        rest = b""
        if mode == "tls":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the tests compare certificates themselves
            ctx.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.open_connection(u.hostname, u.port, ssl=ctx)
            alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if alpn != "h2":
                raise AssertionError(f"ALPN selected {alpn!r}, not h2")
            conn.initiate_connection()
        else:
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            if mode == "upgrade":
                settings = conn.initiate_upgrade_connection().decode()
                writer.write((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                              f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                              f"HTTP2-Settings: {settings}\r\n\r\n").encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError(f"closed during the upgrade: {head!r}")
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    writer.close()
                    raise UpgradeRefused(head.decode(errors="replace"), rest)
            else:
                conn.initiate_connection()
        if connection_window > 65535:
            conn.increment_flow_control_window(connection_window - 65535)
        client = cls(reader, writer, conn, path)
        client.flush()
        if rest:
            client._receive(rest)
        if reading:
            client.start_reading()
        return client

    def start_reading(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    # --- I/O -----------------------------------------------------------------------------
    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    break
                self._receive(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for state in self.streams.values():
                state.ended.set()
                state.responded.set()
            self.window_opened.set()

    def _receive(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            state = self.streams.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and state is not None:
                state.headers = dict(ev.headers)
                state.status = int(state.headers[":status"])
                state.responded.set()
            elif isinstance(ev, h2.events.DataReceived):
                if state is not None:
                    state.chunks.append(ev.data)
                    state.received += len(ev.data)
                if ev.stream_id in self.hold_acks:
                    self._held[ev.stream_id] = (self._held.get(ev.stream_id, 0)
                                                + ev.flow_controlled_length)
                else:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length,
                                                        ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and state is not None:
                state.remote_ended = True
                state.ended.set()
            elif isinstance(ev, h2.events.StreamReset) and state is not None:
                state.reset_code = int(ev.error_code)
                state.ended.set()
                state.responded.set()
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self.window_opened.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = ev
        self.flush()

    def release_acks(self, sid: int) -> None:
        """Acknowledge what a held stream received, and everything it receives from now."""
        self.hold_acks.discard(sid)
        held = self._held.pop(sid, 0)
        if held:
            self.conn.acknowledge_received_data(held, sid)
            self.flush()

    def write_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        if not self.writer.is_closing():
            try:
                self.conn.close_connection()
                self.flush()
            except h2.exceptions.ProtocolError:
                pass
            self.writer.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except TimeoutError:
                self._task.cancel()

    # --- streams -------------------------------------------------------------------------
    def open_stream(self, headers: list[tuple[str, str]], end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = StreamState()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self.flush()
        return sid

    def request_headers(self, **extra: str) -> list[tuple[str, str]]:
        return [(":method", "POST"), (":scheme", "http"), (":authority", "crishim"),
                (":path", self.path), *extra.items()]

    async def send(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        view = memoryview(data)
        while view:
            if self.closed.is_set():
                raise ConnectionError("connection closed while sending")
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_opened.clear()
                await asyncio.wait_for(self.window_opened.wait(), 60)
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, view[:n])
            view = view[n:]
            self.flush()
            await self.writer.drain()
        if end_stream:
            self.conn.end_stream(sid)
            self.flush()

    async def forward(self, port: int, request_id: str | None = None,
                      check: bool = True) -> Forward:
        """Open the error stream, then the data stream; wait for both responses."""
        request_id = request_id or str(next(_request_ids))
        error_id = self.open_stream(self.request_headers(
            streamtype="error", port=str(port), requestid=request_id), end_stream=True)
        data_id = self.open_stream(self.request_headers(
            streamtype="data", port=str(port), requestid=request_id))
        fwd = Forward(self, data_id, error_id)
        for sid in (error_id, data_id):
            await asyncio.wait_for(self.streams[sid].responded.wait(), 30)
            if check and self.streams[sid].status != 200:
                raise AssertionError(f"stream {sid}: status {self.streams[sid].status} "
                                     f"{self.streams[sid].body()!r}")
        return fwd


class UpgradeRefused(Exception):
    def __init__(self, head: str, body: bytes) -> None:
        super().__init__(head)
        self.head = head
        self.body = body


class Forward:
    """One forwarded connection: a data stream and its error stream."""

    def __init__(self, client: H2Client, data_id: int, error_id: int) -> None:
        self.client = client
        self.data_id = data_id
        self.error_id = error_id

    @property
    def data(self) -> StreamState:
        return self.client.streams[self.data_id]

    @property
    def error(self) -> StreamState:
        return self.client.streams[self.error_id]

    async def write(self, payload: bytes, end_stream: bool = False) -> None:
        await self.client.send(self.data_id, payload, end_stream)

    async def close_write(self) -> None:
        self.client.conn.end_stream(self.data_id)
        self.client.flush()

    def reset(self) -> None:
        self.client.conn.reset_stream(self.data_id)
        self.client.flush()

    async def read_all(self, timeout: float = 120) -> bytes:
        """Everything the pod sent, until END_STREAM or RST_STREAM on the data stream."""
        await asyncio.wait_for(self.data.ended.wait(), timeout)
        return self.data.body()

    async def read_until(self, marker: bytes, timeout: float = 30) -> bytes:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while marker not in self.data.body():
            if self.data.ended.is_set() or loop.time() > end:
                break
            await asyncio.sleep(0.005)
        return self.data.body()

    async def error_text(self, timeout: float = 30) -> str:
        await asyncio.wait_for(self.error.ended.wait(), timeout)
        return self.error.body().decode()
