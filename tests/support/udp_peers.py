"""UDP on both ends of a forward: a DNS-style responder for the pod netns, and the
client-side exchanges the UDP end-to-end tests make through a forwarded local port."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from dataclasses import dataclass

ANSWER_ADDRESS = "192.0.2.53"  # TEST-NET-1: what the responder answers for every A query


def dns_query(query_id: int, name: str) -> bytes:
    """A standard query for name, type A, class IN (RFC 1035 4.1)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x01\x00\x01"


def parse_dns_answer(message: bytes) -> tuple[int, str]:
    """(id, address) of a response to dns_query; ValueError if it is not one."""
    query_id, flags, qd, an = struct.unpack_from(">HHHH", message)
    if not flags & 0x8000 or qd != 1 or an != 1:
        raise ValueError(f"not an answer: flags {flags:#x} qd {qd} an {an}")
    return query_id, socket.inet_ntoa(message[-4:])


class DnsResponder(asyncio.DatagramProtocol):
    """Answers every well-formed query with one A record, ANSWER_ADDRESS."""

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        if len(data) < 17:
            return
        question = data[12:]
        answer = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4)
                  + socket.inet_aton(ANSWER_ADDRESS))
        header = struct.pack(">HHHHHH", struct.unpack_from(">H", data)[0], 0x8180, 1, 1, 0, 0)
        self.t.sendto(header + question + answer, addr)

    def error_received(self, exc):
        pass


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return s


def exchange(port: int, payloads: list[bytes], host: str = "127.0.0.1",
             timeout: float = 10.0, sock: socket.socket | None = None) -> list[bytes]:
    """Send each payload and wait for its answer before the next (a request/response
    protocol); answers as received. A lost datagram is resent after 1s, up to timeout."""
    own = sock is None
    s = sock or udp_socket(host)
    try:
        answers = []
        for payload in payloads:
            deadline = time.monotonic() + timeout
            while True:
                s.sendto(payload, (host, port))
                ready, _, _ = select.select([s], [], [], min(1.0, deadline - time.monotonic()))
                if ready:
                    answers.append(s.recv(70000))
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no answer from {host}:{port} in {timeout:g}s")
        return answers
    finally:
        if own:
            s.close()


@dataclass
class BurstFigures:
    sent: int
    received: int
    duplicates: int
    reordered: int  # datagrams that arrived after one with a higher sequence number
    corrupt: int  # wrong length or content for their sequence number
    seconds: float

    @property
    def lost(self) -> int:
        return self.sent - (self.received - self.duplicates)

    def line(self, label: str) -> str:
        return (f"{label}: sent={self.sent} received={self.received} lost={self.lost} "
                f"({100 * self.lost / self.sent:.2f}%) reordered={self.reordered} "
                f"duplicates={self.duplicates} corrupt={self.corrupt} in {self.seconds:.2f}s")


def _payload(seq: int, size: int) -> bytes:
    head = struct.pack(">I", seq)
    return head + bytes([seq % 251]) * (size - len(head))


def burst(port: int, count: int = 10000, size: int = 512, host: str = "127.0.0.1",
          window: int = 0, quiet: float = 2.0, limit: float = 60.0) -> BurstFigures:
    """count datagrams of sizes around size (size + seq % 7, so lengths vary), each
    numbered, to an echo through port; counts what comes back. window N: paced by the
    echo, at most N datagrams unanswered at a time (0: unpaced, as fast as the socket
    takes them). Ends when nothing arrived for `quiet` seconds."""
    s = udp_socket(host)
    s.connect((host, port))
    s.setblocking(False)
    seen: set[int] = set()
    received = duplicates = reordered = corrupt = 0
    highest = -1
    t0 = time.monotonic()
    deadline = t0 + limit
    sent = 0
    last_arrival = time.monotonic()

    def drain() -> None:
        nonlocal received, duplicates, reordered, corrupt, highest, last_arrival
        while True:
            try:
                data = s.recv(70000)
            except (BlockingIOError, InterruptedError):
                return
            last_arrival = time.monotonic()
            received += 1
            if len(data) < 4:
                corrupt += 1
                continue
            seq = struct.unpack_from(">I", data)[0]
            if data != _payload(seq, size + seq % 7):
                corrupt += 1
            if seq in seen:
                duplicates += 1
            seen.add(seq)
            if seq < highest:
                reordered += 1
            highest = max(highest, seq)

    try:
        while sent < count and time.monotonic() < deadline:
            if window and sent - len(seen) >= window:
                if time.monotonic() - last_arrival > quiet:
                    break  # the window stalled: a datagram of it was lost
                select.select([s], [], [], 0.1)
                drain()
                continue
            try:
                s.send(_payload(sent, size + sent % 7))
            except BlockingIOError:
                select.select([], [s], [], 0.01)
                continue
            sent += 1
            if sent % 64 == 0 or window:
                drain()
        while time.monotonic() < deadline and time.monotonic() - last_arrival < quiet \
                and len(seen) < sent:
            select.select([s], [], [], 0.1)
            drain()
        drain()
    finally:
        s.close()
    return BurstFigures(sent, received, duplicates, reordered, corrupt, time.monotonic() - t0)
