"""The client side of a forwarded UDP port (`crishim port-forward SANDBOX 5353:53/udp`): a
local UDP socket whose every peer address (source addr:port) is one flow, i.e. one
forwarded connection opened with `protocol: udp` on a session that negotiated
`portforward.crishim.dev/v1`.

A local datagram goes length-prefixed onto its flow's data stream; what comes back is
split at the same boundaries and sent to that peer from the local socket. A flow ends
when the server ends it (its idle timeout, ICMP port unreachable from the pod) or the
session ends; the peer's next datagram opens a new one.

The flows of one port-forward, every listener's together, are at most `FlowLimit.most`
(--max-udp-flows): a new peer past it has its datagrams dropped and counted, no flow
opened. Each flow is a stream pair the server counts against max_connections_per_session
(4,096), and peers are as many as source addresses and ports: 6,000 sprayed at the local
port opened a flow each, the server refused those past its limit, and the data crishim's
client had already sent on them ended the whole session (SPDY GOAWAY, every TCP forward
of the command with it); over HTTP/2 the 4,096 flows, idle for the server's 60 s, left no
room for the command's TCP connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from crishim.protocols.datagram import (
    MAX_DATAGRAM,
    MAX_UDP_PAYLOAD,
    DatagramDecoder,
    encode_datagrams,
)

log = logging.getLogger("crishim.client.udp")

READ_BATCH = 64  # datagrams read per wakeup
# a peer whose flow just failed (refused by a limit, the pod's ICMP port unreachable) has
# its datagrams dropped this long before a new flow is tried: 6,000 peers past the
# server's connection limit reopened a refused flow per datagram
RETRY_AFTER = 0.25
FAILED_PEERS_KEPT = 4096
SOCKET_BUFFER = 4 << 20
# UDP flows one port-forward may have open at once (--max-udp-flows): a quarter of crishim
# serve's max_connections_per_session, so the session's TCP connections keep the rest
MAX_FLOWS = 1024
Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
# opens one forwarded connection with protocol udp to the remote port; may raise
OpenFlow = Callable[[int, Callable[[], asyncio.Protocol]], asyncio.Transport]


class FlowLimit:
    """The UDP flows one port-forward has open, every listener's together, and the most it
    may (a new peer past it is not given one)."""

    __slots__ = ("most", "live")

    def __init__(self, most: int = MAX_FLOWS) -> None:
        if most < 1:
            raise ValueError(f"at least 1 UDP flow, got {most}")
        self.most = most
        self.live = 0


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

    def send(self, datagrams: list[bytes]) -> None:
        if self.stream is None or self.stream.is_closing():
            return
        self.datagrams_up += len(datagrams)
        self.stream.write(encode_datagrams(datagrams))

    # --- asyncio.Protocol of the forwarded connection -----------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.stream = transport

    def data_received(self, data: bytes) -> None:
        for datagram in self.decoder.receive_data(data):
            self.datagrams_down += 1
            self.listener.sendto(datagram, self.peer)
        if self.decoder.error is not None and self.stream is not None:
            log.warning("udp flow from %s: %s; resetting it", self.peer, self.decoder.error)
            self.stream.abort()

    def eof_received(self) -> bool:
        return False  # the server ended the flow: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.flow_ended(self, exc)

    def pause_writing(self) -> None:
        self.congested = True
        self.listener.flow_congested(self)

    def resume_writing(self) -> None:
        self.congested = False
        self.listener.flow_drained(self)


class UdpListener:
    """A local UDP socket and its flow table, one flow per peer address. The socket is
    read directly (not through an asyncio datagram transport, which drops empty
    datagrams): a batch of datagrams per wakeup, one stream write per flow per batch."""

    def __init__(self, sock: socket.socket, remote_port: int, local_port: int,
                 open_flow: OpenFlow, on_flow_failed: Callable[[UdpListener, Exception], None],
                 announce: bool = True, limit: FlowLimit | None = None) -> None:
        self.sock = sock
        self.remote_port = remote_port
        self.local_port = local_port
        self.open_flow = open_flow
        self.on_flow_failed = on_flow_failed
        self.announce = announce
        self.flows: dict[Address, UdpFlow] = {}
        self.limit = limit or FlowLimit()
        self.flows_opened = 0
        self.over_limit = 0  # datagrams from new peers while limit.most flows were open
        self.dropped = 0  # datagrams to local peers the socket could not take
        self.held_back = 0  # datagrams from peers whose flow failed within RETRY_AFTER
        self.too_big = 0  # local datagrams over MAX_UDP_PAYLOAD, dropped
        self._failed_at: dict[Address, float] = {}
        self.closed = False
        # flows whose stream cannot take more now: the socket is not read meanwhile, and
        # the kernel drops what overflows its buffer (UDP has no backpressure to pass on)
        self._congested: set[UdpFlow] = set()
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(MAX_DATAGRAM + 1)
        sock.setblocking(False)
        try:  # room for a burst while the session is busy (capped by net.core.rmem_max)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        except OSError:
            pass
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        view = memoryview(self._buffer)
        batch: dict[Address, list[bytes]] = {}
        for _ in range(READ_BATCH):
            try:
                n, addr = self.sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # ICMP about an earlier datagram to a peer that has gone
                log.debug("udp listener %d: %s", self.local_port, e)
                continue
            if n > MAX_UDP_PAYLOAD:
                # IPv6 carries up to 65,527 bytes, a flow 65,507: the server reset the flow
                # for it, losing the datagrams after it too; dropped here, counted
                self.too_big += 1
                if self.too_big == 1:
                    log.warning("udp listener %d: a datagram of %d bytes from %s is larger "
                                "than the %d a flow carries; dropped (and any more)",
                                self.local_port, n, addr, MAX_UDP_PAYLOAD)
                continue
            batch.setdefault(addr, []).append(bytes(view[:n]))
        for addr, datagrams in batch.items():
            self._to_flow(addr, datagrams)

    def _to_flow(self, addr: Address, datagrams: list[bytes]) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if self.closed:
                return
            failed_at = self._failed_at.get(addr)
            if failed_at is not None:
                if self._loop.time() - failed_at < RETRY_AFTER:
                    self.held_back += len(datagrams)
                    return
                del self._failed_at[addr]
            if self.limit.live >= self.limit.most:
                self.over_limit += len(datagrams)
                if self.over_limit == len(datagrams):
                    log.warning("udp listener %d: %d flows are open (--max-udp-flows): "
                                "datagrams from new peers are dropped until one ends (the "
                                "server ends a flow idle for its udp_flow_idle_timeout)",
                                self.local_port, self.limit.most)
                return
            flow = UdpFlow(self, addr)
            try:
                self.open_flow(self.remote_port, lambda: flow)
            except Exception as e:  # the session is gone or refuses new streams
                self._failed(addr)
                self.on_flow_failed(self, e)
                return
            self.flows[addr] = flow
            self.limit.live += 1
            self.flows_opened += 1
            if self.announce:
                print(f"Handling connection for {self.local_port}/udp", flush=True)
        flow.send(datagrams)

    def sendto(self, datagram: bytes, peer: Address) -> None:
        if self.closed:
            return
        try:
            self.sock.sendto(datagram, peer)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the local peer is not reading: as a full link would
        except OSError as e:
            log.debug("udp listener %d: sending to %s: %s", self.local_port, peer, e)

    def flow_congested(self, flow: UdpFlow) -> None:
        if not self._congested and not self.closed:
            self._loop.remove_reader(self.sock.fileno())
        self._congested.add(flow)

    def flow_drained(self, flow: UdpFlow) -> None:
        if flow in self._congested:
            self._congested.discard(flow)
            if not self._congested and not self.closed:
                self._loop.add_reader(self.sock.fileno(), self._readable)

    def flow_ended(self, flow: UdpFlow, exc: Exception | None) -> None:
        self.flow_drained(flow)
        if self.flows.get(flow.peer) is flow:
            del self.flows[flow.peer]
            self.limit.live -= 1
        if exc is not None and not self.closed:
            self._failed(flow.peer)
            self.on_flow_failed(self, exc)

    def _failed(self, peer: Address) -> None:
        if len(self._failed_at) >= FAILED_PEERS_KEPT:
            self._failed_at.clear()
        self._failed_at[peer] = self._loop.time()

    def close(self) -> None:
        """Stop listening and end every flow."""
        if self.closed:
            return
        self.closed = True
        if not self._congested:
            self._loop.remove_reader(self.sock.fileno())
        self._congested.clear()
        for flow in list(self.flows.values()):
            if flow.stream is not None:
                flow.stream.close()
        self.limit.live -= len(self.flows)  # those whose close did not end them above
        self.flows.clear()
        self.sock.close()
