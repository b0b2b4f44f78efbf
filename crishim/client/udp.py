"""The client side of a forwarded UDP port (`crishim port-forward SANDBOX 5353:53/udp`): a
local UDP socket whose every peer address (source addr:port) is one flow, i.e. one
forwarded connection opened with `protocol: udp` on a session that negotiated
`portforward.crishim.dev/v1`.

A local datagram goes length-prefixed onto its flow's data stream; what comes back is
split at the same boundaries and sent to that peer from the local socket. A flow ends
when the server ends it (its idle timeout, ICMP port unreachable from the pod) or the
session ends; the peer's next datagram opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from crishim.protocols.datagram import MAX_DATAGRAM, DatagramDecoder, encode_datagram

log = logging.getLogger("crishim.client.udp")

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
# opens one forwarded connection with protocol udp to the remote port; may raise
OpenFlow = Callable[[int, Callable[[], asyncio.Protocol]], asyncio.Transport]


class UdpFlow(asyncio.Protocol):
    """One local peer's flow: the protocol of its forwarded connection's stream."""

    def __init__(self, listener: UdpListener, peer: Address) -> None:
        self.listener = listener
        self.peer = peer
        self.stream: asyncio.Transport | None = None
        self.decoder = DatagramDecoder(MAX_DATAGRAM)
        self.congested = False
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.dropped = 0  # local datagrams dropped while the session was congested

    def send(self, datagram: bytes) -> None:
        if self.stream is None or self.stream.is_closing():
            return
        if self.congested:
            self.dropped += 1  # UDP has no backpressure: drop as a congested link would
            return
        self.datagrams_up += 1
        self.stream.write(encode_datagram(datagram))

    # --- asyncio.Protocol of the forwarded connection -----------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.stream = transport

    def data_received(self, data: bytes) -> None:
        local = self.listener.transport
        for datagram in self.decoder.receive_data(data):
            self.datagrams_down += 1
            if local is not None:
                local.sendto(datagram, self.peer)
        if self.decoder.error is not None and self.stream is not None:
            log.warning("udp flow from %s: %s; resetting it", self.peer, self.decoder.error)
            self.stream.abort()

    def eof_received(self) -> bool:
        return False  # the server ended the flow: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.flow_ended(self, exc)

    def pause_writing(self) -> None:
        self.congested = True

    def resume_writing(self) -> None:
        self.congested = False


class UdpListener(asyncio.DatagramProtocol):
    """A local UDP socket and its flow table, one flow per peer address."""

    def __init__(self, remote_port: int, local_port: int, open_flow: OpenFlow,
                 on_flow_failed: Callable[[UdpListener, Exception], None],
                 announce: bool = True) -> None:
        self.remote_port = remote_port
        self.local_port = local_port
        self.open_flow = open_flow
        self.on_flow_failed = on_flow_failed
        self.announce = announce
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[Address, UdpFlow] = {}
        self.flows_opened = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if self.closed:
                return
            flow = UdpFlow(self, addr)
            try:
                self.open_flow(self.remote_port, lambda: flow)
            except Exception as e:  # the session is gone or refuses new streams
                self.on_flow_failed(self, e)
                return
            self.flows[addr] = flow
            self.flows_opened += 1
            if self.announce:
                print(f"Handling connection for {self.local_port}/udp", flush=True)
        flow.send(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP about a datagram we sent to a local peer that has gone: nothing to end
        log.debug("udp listener %d: %s", self.local_port, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def flow_ended(self, flow: UdpFlow, exc: Exception | None) -> None:
        if self.flows.get(flow.peer) is flow:
            del self.flows[flow.peer]
        if exc is not None and not self.closed:
            self.on_flow_failed(self, exc)

    def close(self) -> None:
        """Stop listening and end every flow."""
        if self.closed:
            return
        self.closed = True
        for flow in list(self.flows.values()):
            if flow.stream is not None:
                flow.stream.close()
        self.flows.clear()
        if self.transport is not None:
            self.transport.close()
