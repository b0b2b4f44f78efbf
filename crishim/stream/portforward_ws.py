"""Port-forward over WebSocket (docs/protocol.md §3 and §4).

Two transports share the upgrade:

* ``SPDY/3.1+portforward.k8s.io`` (kubectl 1.31+, ``crictl --transport websocket``): the
  WebSocket carries a raw SPDY byte stream; ``SpdyPortForwardSession`` runs on it
  unchanged, only its bytes are wrapped into and unwrapped from binary messages.
* ``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io`` or no subprotocol (the Python
  ``kubernetes`` client and other non-Go clients): the Kubernetes channel protocol, one
  forwarded connection per requested port, opened when the session starts.

What the channel protocol cannot say, and what crishim does instead:

* It has no per-channel half-close. The pod's EOF on a port sends nothing (as in the
  kubelet); that port is done from the pod's side, and once every port is done the server
  closes the WebSocket with 1000, so a one-port client sees the pod's EOF as the end of
  the socket. A client's close frame (1000/1001/none) is the client's half-close of every
  port: the pod gets a FIN after the bytes already received, and connections still open
  after ``CLOSE_GRACE`` seconds are closed.
* Its error channel is text to the client, and every known client ends only that port on
  it (the kubelet writes every failure there), so a failed connection (refused, reset)
  always writes its reason on its error channel, whatever ``error_policy`` says
  (``error_policy`` exists for client-go's SPDY client, which ends the whole session on
  any text).
* Malformed input (unknown channel, a write to an error channel, bad base64, a broken
  frame, an oversized message) closes that WebSocket with the codec's close code; the
  forwarded connections of that session are reset, nothing else is touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from crishim.forward import ForwardContext, ForwardedConnection, SessionBase, SessionProtocol
from crishim.forward_udp import ForwardedFlow
from crishim.ports import InvalidPort, parse_port
from crishim.protocols import websocket as ws
from crishim.protocols.constants import PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL
from crishim.protocols.negotiation import websocket_subprotocol
from crishim.runtime import Sandbox
from crishim.stream.portforward_spdy import SpdyPortForwardSession
from crishim.stream.server import HttpError

if TYPE_CHECKING:
    from crishim.stream.server import Request, StreamServer
    from crishim.tokens import StreamRequest

log = logging.getLogger("crishim.websocket")

SUPPORTED_SUBPROTOCOLS = [ws.SPDY_TUNNEL, ws.CHANNEL_BINARY, ws.CHANNEL_BASE64]
# crishim's port-forward extension over the SPDY tunnel (offered by crishim's client only)
SPDY_TUNNEL_CRISHIM = websocket_subprotocol(PORTFORWARD_CRISHIM_V1)
# After the client's close frame, connections still waiting for the pod get this long.
CLOSE_GRACE = 5.0
_GRACEFUL_CLOSE_CODES = (1000, 1001, 1005)


def start(server: StreamServer, transport: asyncio.Transport, request: Request,
          sandbox: Sandbox, token_request: StreamRequest, rest: bytes) -> None:
    """Complete the WebSocket handshake and hand the connection to its session.

    Raises HttpError (400/403) before anything is written when the upgrade cannot
    succeed; StreamServer.dispatch renders it."""
    try:
        supported = ([SPDY_TUNNEL_CRISHIM] if server.ctx.udp else []) + SUPPORTED_SUBPROTOCOLS
        response, subprotocol = ws.accept_handshake(request.raw_headers, supported)
    except ws.HandshakeError as e:
        raise HttpError(e.status, e.reason,
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in e.headers]
                        ) from None
    if subprotocol in (ws.SPDY_TUNNEL, SPDY_TUNNEL_CRISHIM):
        tunnel = ws.ByteStreamTunnel()
        spdy_session = SpdyPortForwardSession(
            server.ctx, sandbox, server.creation_timeout, server.idle_timeout,
            lambda chunks: _tunnel_writelines(tunnel, transport, chunks),
            lambda: _tunnel_close(tunnel, transport))
        spdy_session.transport_name = "spdy-websocket"
        spdy_session.stream_version = (PORTFORWARD_CRISHIM_V1 if subprotocol == SPDY_TUNNEL_CRISHIM
                                       else PORTFORWARD_PROTOCOL)
        transport.write(response)
        server.adopt(transport, spdy_session, SpdyTunnelProtocol(spdy_session, tunnel, transport),
                     rest)
        return
    base64 = subprotocol == ws.CHANNEL_BASE64
    ports = requested_ports(request, token_request, base64)
    session = ChannelPortForwardSession(server.ctx, sandbox, ports, base64, server.idle_timeout)
    transport.write(response)
    server.adopt(transport, session, ChannelTransportProtocol(session, transport), rest)


def requested_ports(request: Request, token_request: StreamRequest, base64: bool) -> list[int]:
    """Ports from the query (``port=80&port=443``, ``ports=80,443``) or else from the CRI
    PortForwardRequest the token was issued for; HttpError 400 if none or invalid."""
    values = request.query.get("port", []) + request.query.get("ports", [])
    ports: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                ports.append(parse_port(part.strip()))
            except InvalidPort as e:
                raise HttpError(400, f"{e} (in the query)") from None
    if not ports:
        ports = list(token_request.ports)
    if not ports:
        raise HttpError(400, "no port to forward: the WebSocket channel protocol needs the "
                             "ports in the query (?port=80&port=443) or in the CRI "
                             "PortForwardRequest")
    limit = ws.max_channel_ports(base64)
    if len(ports) > limit:
        raise HttpError(400, f"{len(ports)} ports requested; one WebSocket carries at most "
                             f"{limit} in this subprotocol")
    return ports


# --------------------------------------------------------------------------- SPDY tunnel


def _flush_tunnel(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport) -> None:
    out = tunnel.take_output()
    if out and not transport.is_closing():
        transport.writelines(out)


def _tunnel_writelines(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport,
                       chunks: list) -> None:
    # SPDY frames go into WebSocket frames as buffers: no join copy on the way out.
    tunnel.send_buffers(chunks)
    _flush_tunnel(tunnel, transport)


def _tunnel_close(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport) -> None:
    tunnel.close(ws.CLOSE_NORMAL)
    _flush_tunnel(tunnel, transport)
    transport.close()


class SpdyTunnelProtocol(SessionProtocol):
    """asyncio glue: binary WebSocket messages in, the SPDY byte stream to the session."""

    session: SpdyPortForwardSession

    def __init__(self, session: SpdyPortForwardSession, tunnel: ws.ByteStreamTunnel,
                 transport: asyncio.Transport) -> None:
        super().__init__(session, transport)
        self.tunnel = tunnel

    def data_received(self, data: bytes) -> None:
        self._handle(self.tunnel.receive_data(data))

    def eof_received(self) -> bool:
        self._handle(self.tunnel.receive_data(b""))
        return False

    def _handle(self, events: list[ws.TunnelEvent]) -> None:
        for event in events:
            match event:
                case ws.TunnelData():
                    self.session.receive(event.data)
                case ws.ProtocolViolation():
                    log.info("spdy-websocket sandbox=%s: %s (close code %d)",
                             self.session.sandbox.id, event.reason, event.code)
                case ws.Closed():
                    _flush_tunnel(self.tunnel, self.transport)
                    self.session.close(
                        f"WebSocket closed ({event.code} {event.reason})".strip())
                    return
        _flush_tunnel(self.tunnel, self.transport)  # pongs


# --------------------------------------------------------------------------- channels


class _PortChannel:
    """Port ``index``'s data channel (2i) and error channel (2i+1) as a forward Channel."""

    __slots__ = ("session", "index", "conn", "_failed", "_pod_done", "_finished")

    def __init__(self, session: ChannelPortForwardSession, index: int) -> None:
        self.session = session
        self.index = index
        self.conn: ForwardedConnection | None = None
        self._failed = False
        self._pod_done = False
        self._finished = False

    def send(self, data: bytes) -> None:
        s = self.session
        s.last_activity = time.monotonic()
        s.codec.send_data(self.index, data)
        s.flush()

    def send_eof(self) -> None:
        # No half-close on the wire: the port is done from the pod's side.
        self._pod_done = True
        self.session.port_done()

    def abort(self) -> None:
        self._failed = True

    def finish(self, error: str | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._pod_done = True
        s = self.session
        reason = error or (self.conn.reason if self._failed and self.conn is not None else "")
        if reason and not s.codec.framing.closing:
            port = s.codec.ports[self.index]
            s.codec.send_error(self.index, f"error forwarding port {port} to pod sandbox "
                                           f"{s.sandbox.id}: {reason}")
        s.flush()
        s.port_done()

    @property
    def pod_done(self) -> bool:
        return self._pod_done


class ChannelPortForwardSession(SessionBase):
    """One WebSocket in the Kubernetes channel protocol: one forwarded connection per port."""

    transport_name = "websocket"

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox, ports: list[int], base64: bool,
                 idle_timeout: float) -> None:
        super().__init__(ctx, sandbox)
        self.codec = ws.ChannelCodec(ports, base64)
        self.transport_name = "websocket-base64" if base64 else "websocket"
        self.idle_timeout = idle_timeout
        self.channels = [_PortChannel(self, i) for i in range(len(ports))]
        self.on_closed = None
        self._closed = False
        self._timers: list[asyncio.TimerHandle] = []

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.codec.start()
        self.flush()
        for channel, port in zip(self.channels, self.codec.ports):
            channel.conn = self.open_connection(port, channel)
        self.arm_idle_timer()

    def _call_later(self, delay: float, fn) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, fn))

    def flush(self) -> None:
        out = self.codec.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def port_done(self) -> None:
        """A port ended from the pod's side; when all have, end the WebSocket cleanly."""
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        if all(ch.pod_done for ch in self.channels) and not self.codec.framing.closing:
            log.debug("websocket sandbox=%s: all ports done, closing", self.sandbox.id)
            self.codec.close(ws.CLOSE_NORMAL, "all ports done")
            self.flush()
            self._call_later(CLOSE_GRACE, self._end)  # a client that never answers the close

    # --- input --------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        for event in self.codec.receive_data(data):
            match event:
                case ws.ChannelData():
                    conn = self.channels[event.index].conn
                    if conn is not None:
                        conn.client_data(event.data)
                case ws.ProtocolViolation():
                    log.info("websocket sandbox=%s: %s (close code %d)", self.sandbox.id,
                             event.reason, event.code)
                case ws.Closed():
                    self._closed_by_peer(event)
                    return
        self.flush()

    def _closed_by_peer(self, event: ws.Closed) -> None:
        self.flush()
        if event.code in _GRACEFUL_CLOSE_CODES:
            # The client is done sending on every port: half-close towards the pods.
            for conn in list(self.connections):
                conn.client_eof()
            if self.connections:
                self._call_later(CLOSE_GRACE, lambda: self.close_connections(
                    "client closed the WebSocket"))
        else:
            self.close_connections(f"WebSocket closed ({event.code} {event.reason})".strip())
        self._end()

    # --- closing ------------------------------------------------------------------------
    def _end(self) -> None:
        """The WebSocket is finished: close the transport and leave the registry."""
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        if not self.connections:
            self._cancel_timers()
        if self.on_closed is not None:
            self.on_closed()

    def _cancel_timers(self) -> None:
        self.cancel_idle_timer()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        super().connection_finished(conn)
        if self._closed and not self.connections:
            self._cancel_timers()

    def close(self, reason: str) -> None:
        """End from the server's side (drain deadline, idle timeout)."""
        if self._closed:
            return
        self.codec.close(1001, reason[:100])
        self.flush()
        self.close_connections(reason)
        self._end()

    def drain(self) -> None:
        """Server shutting down: the channel protocol cannot say so; ports carry on."""

    def connection_lost(self) -> None:
        if not self._closed:
            self.close_connections("client connection lost")
            self._end()


class ChannelTransportProtocol(SessionProtocol):
    """asyncio glue for the channel protocol after the 101."""

    def eof_received(self) -> bool:
        # EOF without a close frame is the codec's abnormal close (1006), not a goodbye.
        self.session.receive(b"")
        return False
