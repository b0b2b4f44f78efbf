"""Which port-forward stream protocol a session speaks, and what a stream may ask for.

Kubernetes negotiates one name, ``portforward.k8s.io``, in ``X-Stream-Protocol-Version``
(SPDY: a request header answered in the 101; SPDY over WebSocket: the subprotocol
``SPDY/3.1+<name>``). crishim adds its own version beside it, ``portforward.crishim.dev/v1``:
the same stream pairs, plus a ``protocol`` header on both streams of a pair (``tcp``, the
default, or ``udp``: datagrams length-prefixed on the data stream, see datagram.py).

Only crishim's own client offers the crishim version, and always before the upstream name,
so kubectl, crictl, client-go and the ``kubernetes`` client negotiate exactly what they
did. A server that does not know the crishim version (containerd, CRI-O, an older crishim)
picks ``portforward.k8s.io``, and the client then knows, before it opens any stream, that
UDP cannot be forwarded: it never sends a ``protocol: udp`` stream such a server would
take for TCP.

HTTP/2 (crishim's own transport) has no upgrade response to answer in: each request stream
carries the offer in an ``x-stream-protocol-version`` request header, and the server's
``:status 200`` (and every refusal) answers with the version the session picked at its
first stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from crishim.protocols.constants import (
    DIAL_ON_DATA,
    HEADER_DIAL,
    HEADER_PROTOCOL,
    PORTFORWARD_CRISHIM_V1,
    PORTFORWARD_PROTOCOL,
)

VERSION_HEADER = "x-stream-protocol-version"
TCP = "tcp"
UDP = "udp"
SPDY_WEBSOCKET_PREFIX = "SPDY/3.1+"

# the server's order of preference; a server without UDP support offers only the last
SERVER_VERSIONS = (PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL)


class StreamProtocolRefused(ValueError):
    """A stream asks for a protocol this session cannot carry; only that stream is refused."""


def server_versions(udp: bool) -> tuple[str, ...]:
    """What a server supports, best first: the crishim version only where UDP can be dialled."""
    return SERVER_VERSIONS if udp else (PORTFORWARD_PROTOCOL,)


def choose_version(offered: Iterable[str], supported: Sequence[str] = SERVER_VERSIONS
                   ) -> str | None:
    """The server's pick: its most preferred supported version among those offered (the
    client's order does not matter), or None if none is supported."""
    offered_set = {v.strip() for v in offered}
    for version in supported:
        if version in offered_set:
            return version
    return None


def client_offer(udp: bool = True) -> list[str]:
    """What crishim's client offers, best first."""
    return [PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL] if udp else [PORTFORWARD_PROTOCOL]


def websocket_subprotocol(version: str) -> str:
    """The WebSocket subprotocol that carries SPDY speaking version."""
    return SPDY_WEBSOCKET_PREFIX + version


def version_of_subprotocol(subprotocol: str) -> str | None:
    """The stream protocol version a SPDY-over-WebSocket subprotocol names, else None."""
    if subprotocol.startswith(SPDY_WEBSOCKET_PREFIX):
        return subprotocol[len(SPDY_WEBSOCKET_PREFIX):]
    return None


def carries_udp(version: str | None) -> bool:
    """Whether a session that negotiated version may open UDP flows."""
    return version == PORTFORWARD_CRISHIM_V1


def stream_protocol(headers: Mapping[str, str], version: str | None) -> str:
    """The transport protocol (tcp or udp) a stream's headers ask for, or
    StreamProtocolRefused: unknown values, and udp on a session that did not negotiate it."""
    value = headers.get(HEADER_PROTOCOL)
    if value is None or value == TCP:
        return TCP
    if value == UDP:
        if not carries_udp(version):
            raise StreamProtocolRefused(
                f"protocol udp needs stream protocol {PORTFORWARD_CRISHIM_V1}; this session "
                f"negotiated {version or PORTFORWARD_PROTOCOL}")
        return UDP
    raise StreamProtocolRefused(f"unknown protocol {value!r}: expected tcp or udp")


def dials_on_data(headers: Mapping[str, str], version: str | None) -> bool:
    """Whether a stream asks to be dialled on its first data (``dial: on-data``), which
    only portforward.crishim.dev/v1 carries: under portforward.k8s.io the header means
    nothing and is ignored, as any unknown header is. StreamProtocolRefused for another
    value."""
    value = headers.get(HEADER_DIAL)
    if value is None or version != PORTFORWARD_CRISHIM_V1:
        return False
    if value != DIAL_ON_DATA:
        raise StreamProtocolRefused(f"unknown dial {value!r}: expected {DIAL_ON_DATA}")
    return True
