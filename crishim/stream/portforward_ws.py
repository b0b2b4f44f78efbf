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
from collections.abc import Sequence
from typing import cast

from crishim.forward import ForwardContext, ForwardedConnection
from crishim.forward_udp import ForwardedFlow
from crishim.ports import InvalidPort, parse_port
from crishim.protocols import websocket as ws
from crishim.protocols.constants import (
    DIAL_AT_ONCE,
    DIAL_ON_DATA,
    HEADER_CRISHIM_DIAL,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
)
from crishim.protocols.negotiation import websocket_subprotocol
from crishim.runtime import Sandbox
from crishim.stream.admission import Refused
from crishim.stream.portforward_spdy import SpdyPortForwardSession
from crishim.stream.session import ServerSession, SessionProtocol, Upgrade, close_client
from crishim.tokens import StreamRequest

log = logging.getLogger("crishim.websocket")

SUPPORTED_SUBPROTOCOLS = [ws.SPDY_TUNNEL, ws.CHANNEL_BINARY, ws.CHANNEL_BASE64]
# crishim's port-forward extension over the SPDY tunnel (offered by crishim's client only)
SPDY_TUNNEL_CRISHIM = websocket_subprotocol(PORTFORWARD_CRISHIM_V1)
# After the client's close frame, connections still waiting for the pod get this long.
CLOSE_GRACE = 5.0
# What a channel session holds (a message being reassembled, bytes its pods have not
# taken yet) beyond this comes from the server's buffer_budget, as HTTP/2's windows do
# beyond their 64 KiB (at 1 MiB, 300 sessions each holding an unfinished message held
# 319 MiB outside every budget)
FREE_HOLD = 64 * 1024
_GRACEFUL_CLOSE_CODES = (1000, 1001, 1005)


def start(upgrade: Upgrade) -> None:
    """Complete the WebSocket handshake and hand the connection to its session.

    Raises Refused (400/403) before anything is written when the upgrade cannot
    succeed."""
    transport, settings, sandbox = upgrade.transport, upgrade.settings, upgrade.admitted.sandbox
    on_data = dials_on_data(upgrade.request.header(HEADER_CRISHIM_DIAL))
    try:
        supported = ([SPDY_TUNNEL_CRISHIM] if settings.ctx.udp else []) + SUPPORTED_SUBPROTOCOLS
        # how the session dials, in every 101: a client learns from it that it may ask
        response, subprotocol = ws.accept_handshake(
            upgrade.request.raw_headers, supported,
            [(HEADER_CRISHIM_DIAL.encode(),
              (DIAL_ON_DATA if on_data else DIAL_AT_ONCE).encode())])
    except ws.HandshakeError as e:  # the codec's own refusal, as the client codec shares it
        raise Refused(e.status, e.reason, [(k.decode("latin-1"), v.decode("latin-1"))
                                           for k, v in e.headers]) from None
    if subprotocol in (ws.SPDY_TUNNEL, SPDY_TUNNEL_CRISHIM):
        if on_data:
            raise Refused(400, f"{HEADER_CRISHIM_DIAL}: {DIAL_ON_DATA} is for the channel "
                               "protocol; SPDY streams ask for it a pair at a time (dial: "
                               "on-data)")
        tunnel = ws.ByteStreamTunnel()
        spdy_session = SpdyPortForwardSession(
            settings.ctx, sandbox, settings.creation_timeout, settings.idle_timeout,
            lambda chunks: _tunnel_writelines(tunnel, transport, chunks),
            lambda: _tunnel_close(tunnel, transport, spdy_session.violated_budget,
                                  spdy_session.protocol_failed))
        spdy_session.transport_name = "spdy-over-websocket"  # as the client and docs name it
        spdy_session.stream_version = (PORTFORWARD_CRISHIM_V1 if subprotocol == SPDY_TUNNEL_CRISHIM
                                       else PORTFORWARD_PROTOCOL)
        transport.write(response)
        upgrade.adopt(spdy_session, SpdyTunnelProtocol(spdy_session, tunnel, transport))
        return
    base64 = subprotocol == ws.CHANNEL_BASE64
    ports = requested_ports(upgrade.admitted.query, upgrade.admitted.stream_request, base64)
    session = ChannelPortForwardSession(settings.ctx, sandbox, ports, base64,
                                        settings.idle_timeout, on_data)
    transport.write(response)
    upgrade.adopt(session, ChannelTransportProtocol(session, transport))


def dials_on_data(value: str) -> bool:
    """A channel upgrade's Crishim-Dial: on-data (a session opened ahead: the port
    prefaces and the dials wait for the client's first message, an empty one too) or
    at-once (the default); Refused 400 for another value."""
    value = value.strip().lower()
    if value in ("", DIAL_AT_ONCE):
        return False
    if value == DIAL_ON_DATA:
        return True
    raise Refused(400, f"unknown {HEADER_CRISHIM_DIAL} {value!r}: expected {DIAL_ON_DATA} or "
                       f"{DIAL_AT_ONCE}")


def requested_ports(query: dict[str, list[str]], stream_request: StreamRequest,
                    base64: bool) -> list[int]:
    """Ports from the query (``port=80&port=443``, ``ports=80,443``) or else from the CRI
    PortForwardRequest the token was issued for; Refused 400 if none or invalid."""
    values = query.get("port", []) + query.get("ports", [])
    ports: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                ports.append(parse_port(part.strip()))
            except InvalidPort as e:
                raise Refused(400, f"{e} (in the query)") from None
    if not ports:
        ports = list(stream_request.ports)
    if not ports:
        raise Refused(400, "no port to forward: the WebSocket channel protocol needs the "
                           "ports in the query (?port=80&port=443) or in the CRI "
                           "PortForwardRequest")
    limit = ws.max_channel_ports(base64)
    if len(ports) > limit:
        raise Refused(400, f"{len(ports)} ports requested; one WebSocket carries at most "
                           f"{limit} in this subprotocol")
    return ports


def charge_websocket_event(session: ServerSession,
                           event: ws.PingReceived | ws.FrameIgnored | ws.ProtocolViolation
                           ) -> bool:
    """A WebSocket frame that carries nothing forwarded, on either WebSocket transport:
    pings and ignored frames charged to the control budget, a violation logged (its close
    frame is queued); False once a budget ended the session."""
    match event:
        case ws.PingReceived():
            return session.charge_control("WebSocket ping")
        case ws.FrameIgnored():
            return session.charge_control(f"WebSocket {event.kind}")
        case ws.ProtocolViolation():
            session.protocol_error("%s sandbox=%s: %s (close code %d)", session.transport_name,
                                   session.sandbox_id, event.reason, event.code, logger=log)
    return True


# --------------------------------------------------------------------------- SPDY tunnel


def _flush_tunnel(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport) -> None:
    out = tunnel.take_output()
    if out and not transport.is_closing():
        transport.writelines(out)


def _tunnel_writelines(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport,
                       chunks: Sequence[bytes | bytearray | memoryview]) -> None:
    # SPDY frames go into WebSocket frames as buffers: no join copy on the way out.
    tunnel.send_buffers(cast("list[bytes | bytearray | memoryview]", chunks))
    _flush_tunnel(tunnel, transport)


def _tunnel_close(tunnel: ws.ByteStreamTunnel, transport: asyncio.Transport,
                  violation: bool, protocol_failed: bool = False) -> None:
    """The tunnel's close: 1008 for a budget overrun, 1002 for malformed SPDY (RFC 6455
    7.4.1; it was 1000), else 1000."""
    tunnel.close(ws.CLOSE_POLICY_VIOLATION if violation else
                 ws.CLOSE_PROTOCOL_ERROR if protocol_failed else ws.CLOSE_NORMAL)
    _flush_tunnel(tunnel, transport)
    close_client(transport, linger=violation)


class SpdyTunnelProtocol(SessionProtocol):
    """asyncio glue: binary WebSocket messages in, the SPDY byte stream to the session."""

    session: SpdyPortForwardSession

    def __init__(self, session: SpdyPortForwardSession, tunnel: ws.ByteStreamTunnel,
                 transport: asyncio.Transport) -> None:
        super().__init__(session, transport)
        self.tunnel = tunnel
        # the tunnel's framing keeps nothing of a read past it (payload comes out
        # unmasked into new buffers or joined, a partial head is copied): it reads the
        # loop's read buffer in place
        self.lend_reads = True

    def received(self, data: bytes | memoryview) -> None:
        self._handle(self.tunnel.receive_data(data))

    def eof_received(self) -> bool:
        self._handle(self.tunnel.receive_data(b""))
        return False

    def _handle(self, events: list[ws.TunnelEvent]) -> None:
        session = self.session
        # one write towards each pod per WebSocket read, not one per unmasked piece
        session.begin_batch()
        try:
            for event in events:
                if session.closing:
                    return  # a budget ended it: the rest of the read goes unanswered
                match event:
                    case ws.TunnelData():
                        session.receive(event.data)
                    case ws.PingReceived() | ws.FrameIgnored() | ws.ProtocolViolation():
                        charge_websocket_event(session, event)  # the next event sees a close
                    case ws.Closed():
                        _flush_tunnel(self.tunnel, self.transport)
                        self.session.close(
                            f"WebSocket closed ({event.code} {event.reason})".strip())
                        return
        finally:
            session.end_batch()
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

    def send(self, data: bytes | memoryview) -> None:
        s = self.session  # never lending (lent_fd -1): data is bytes
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
        if reason and not (s.closing or s.codec.framing.closing):
            port = s.codec.ports[self.index]
            s.codec.send_error(self.index, f"error forwarding port {port} to pod sandbox "
                                           f"{s.sandbox.id}: {reason}")
        s.flush()
        s.port_done()

    @property
    def pod_done(self) -> bool:
        return self._pod_done


class ChannelPortForwardSession(ServerSession):
    """One WebSocket in the Kubernetes channel protocol: one forwarded connection per port."""

    transport_name = "websocket"

    def __init__(self, ctx: ForwardContext, sandbox: Sandbox, ports: list[int], base64: bool,
                 idle_timeout: float, on_data: bool = False) -> None:
        super().__init__(ctx, sandbox, idle_timeout)
        self.codec = ws.ChannelCodec(ports, base64)
        self.transport_name = "websocket-base64" if base64 else "websocket"
        self.channels = [_PortChannel(self, i) for i in range(len(ports))]
        self.on_data = on_data  # opened ahead: the ports wait for the client's first message
        self._charged = 0  # bytes taken from the server's buffer budget (see _account)

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if not self.on_data:
            self._start_ports()
        self.arm_idle_timer()

    def _start_ports(self) -> None:
        """The port prefaces, then a connection per port."""
        self.on_data = False
        self.codec.start()
        self.flush()
        for channel, port in zip(self.channels, self.codec.ports):
            channel.conn = self.open_connection(port, channel)

    def flush(self) -> None:
        if self.output_held:
            return  # release_output() flushes
        out = self.codec.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def port_done(self) -> None:
        """A port ended from the pod's side; when all have, end the WebSocket cleanly."""
        if self.closing or self.transport is None or self.transport.is_closing():
            return  # closing: the goodbye (1001) is the close frame
        if all(ch.pod_done for ch in self.channels) and not self.codec.framing.closing:
            log.debug("%s sandbox=%s: all ports done, closing", self.transport_name,
                      self.sandbox.id)
            self.codec.close(ws.CLOSE_NORMAL, "all ports done")
            self.flush()
            self.call_later(CLOSE_GRACE, self._finished)  # a client that never answers

    # --- input --------------------------------------------------------------------------
    def receive(self, data: bytes | memoryview) -> None:
        if self._closed:
            return
        self.last_activity = time.monotonic()
        for event in self.codec.receive_data(data):
            first = self.on_data and isinstance(event, ws.ChannelData)
            if first:
                self._start_ports()  # the client's first message: now the ports are dialled
            match event:
                case ws.ChannelData():
                    if not event.data and not first and not self.charge_control(
                            "an empty WebSocket data message"):
                        return  # it forwards nothing (300,000 of them were all read)
                    conn = self.channels[event.index].conn
                    if conn is not None:
                        conn.client_data(event.data)
                case ws.PingReceived() | ws.FrameIgnored() | ws.ProtocolViolation():
                    if not charge_websocket_event(self, event):
                        return
                case ws.Closed():
                    self._closed_by_peer(event)
                    return
        if self._account():
            self.flush()

    # --- the server's buffer budget ------------------------------------------------------
    def held(self) -> int:
        """Bytes this session holds: the message being reassembled, what waits for a
        dial, and what its pods' sockets have not taken."""
        held = self.codec.framing.message_bytes + self.pending_up
        for conn in self.connections:
            pod = getattr(conn, "pod", None)
            if pod is not None:
                held += pod.get_write_buffer_size()
        return held

    def _account(self, growing: bool = True) -> bool:
        """Charge what the session holds beyond FREE_HOLD to the server's buffer budget,
        or give back what it no longer holds. False, the session closed with 1013, when
        it would hold more than the budget has left."""
        if self._closed:
            return False
        held = self.held()
        want = max(0, held - FREE_HOLD)
        if want > self._charged:
            if not growing:
                return True
            if not self.ctx.take_bytes(want - self._charged):
                budget = self.ctx.flood.buffer_budget
                reason = (f"holding {held} bytes towards pods would pass the server's "
                          f"buffer_budget ({budget} bytes, shared by every session)")
                self.codec.close(ws.CLOSE_TRY_AGAIN_LATER, "crishim's buffer budget is spent; "
                                                           "try again later")
                self.violated(reason)
                return False
        else:
            self.ctx.return_bytes(self._charged - want)
        self._charged = want
        return True

    def resume_client_reading(self, key: object) -> None:
        super().resume_client_reading(key)
        self._account(growing=False)  # a pod took what it held

    def connection_finished(self, conn: ForwardedConnection | ForwardedFlow) -> None:
        super().connection_finished(conn)
        self._account(growing=False)

    def end(self, close_transport: bool) -> None:
        self.ctx.return_bytes(self._charged)
        self._charged = 0
        super().end(close_transport)

    def _closed_by_peer(self, event: ws.Closed) -> None:
        self.flush()
        if event.code in _GRACEFUL_CLOSE_CODES:
            # The client is done sending on every port: half-close towards the pods.
            for conn in list(self.connections):
                conn.client_eof()
            if self.connections:
                self.call_later(CLOSE_GRACE, lambda: self.close_connections(
                    "client closed the WebSocket"))
        else:
            self.close_connections(f"WebSocket closed ({event.code} {event.reason})".strip())
        self._finished()

    def _finished(self) -> None:
        """The WebSocket is done; connections in their grace period may go on."""
        if not self._closed:
            self.end(close_transport=True)

    # --- closing ------------------------------------------------------------------------
    def drain(self) -> None:
        """Server shutting down: a session opened ahead, its ports not dialled yet, ends
        now (close 1001): it would be a new connection."""
        if self.on_data and not self._closed:
            self.close("crishim is shutting down")

    def goodbye(self, reason: str, violation: bool) -> None:
        self.codec.close(ws.CLOSE_POLICY_VIOLATION if violation else ws.CLOSE_GOING_AWAY,
                         reason[:100])

    def close_transport(self) -> None:
        if self.transport is not None:
            close_client(self.transport, linger=self.violated_budget)


class ChannelTransportProtocol(SessionProtocol):
    """asyncio glue for the channel protocol after the 101."""

    def eof_received(self) -> bool:
        # EOF without a close frame is the codec's abnormal close (1006), not a goodbye.
        self.session.receive(b"")
        return False
