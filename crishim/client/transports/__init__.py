"""Client sessions over the sans-IO codecs: one upgraded connection to a stream server URL,
carrying any number of forwarded connections (SPDY, SPDY over WebSocket, HTTP/2) or the
ports fixed at connect time (WebSocket channels). One module per transport, as on the
server; this package is their registry and `open_session`, the way in.

Library API (used by `crishim port-forward`, `crishim check` and the tests)::

    session = await open_session(url, "spdy")           # or "spdy-over-websocket",
                                                          # "websocket" (ports=[...]), "h2"
    stream, proto = await session.open_connection(9000, MyProtocol)   # asyncio-style
    reader, writer = await session.open_stream(9000)                 # asyncio streams
    rtt = await session.ping()                           # SPDY/h2 keepalive round trip
    session.close(); await session.wait_closed()

`open_connection` works like `loop.create_connection`: the protocol gets
`connection_made(stream)`, `data_received`, `eof_received` (the server's half-close),
`connection_lost(exc)` and `pause_writing`/`resume_writing` (the session's transport is
congested). `stream` is an asyncio.Transport: `write`, `write_eof` (half-close; on the
channel WebSocket it closes the WebSocket, which the protocol defines as the half-close of
every port), `close` (half-close then reset), `abort` (reset), `pause_reading`,
`resume_reading`. `connection_lost(exc)` gets None for a clean end or a `ForwardError`
whose `fatal` says the server wrote error text that, per client-go, ends the session.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from crishim.client.transports.base import (
    OPEN_AHEAD_AFTER_REPLY,
    ClientSession,
    ForwardError,
    ForwardStream,
    SessionClosed,
    SessionError,
    Target,
    UdpNotSupported,
    UpgradeProtocol,
    UpgradeRefused,
    ca_bundle_problem,
    ssl_context_for,
)
from crishim.client.transports.h2 import open_h2
from crishim.client.transports.spdy import open_spdy
from crishim.client.transports.websocket import open_channels, open_spdy_tunnel
from crishim.ports import shown
from crishim.protocols.negotiation import client_offer

__all__ = [
    "OPEN_AHEAD_AFTER_REPLY",
    "TRANSPORTS", "ClientSession", "ForwardError", "ForwardStream", "SessionClosed",
    "SessionError", "Transport", "UdpNotSupported", "UpgradeRefused", "ca_bundle_problem",
    "open_session", "without_userinfo",
    "ssl_context_for",
    "transport_named",
]

# Upgrades the connected `UpgradeProtocol` to a session: (conn, target, ports, timeout).
Opener = Callable[[UpgradeProtocol, Target, list[int], float], Awaitable[ClientSession]]


def without_userinfo(url: str) -> str:
    """The URL with any USER[:PASSWORD]@ before its host replaced by ***@, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            end = min(end, i)
    at = rest.rfind("@", 0, end)
    return url if at == -1 else f"{scheme}://***@{rest[at + 1:]}"


@dataclass(frozen=True)
class Transport:
    """One way to carry port-forward: its name on the command line, the TLS ALPN protocol
    it needs, and the opener that upgrades a connection to its session."""

    name: str
    alpn: str
    open: Opener


_REGISTRY: dict[str, Transport] = {t.name: t for t in (
    Transport("spdy", "http/1.1", open_spdy),
    Transport("websocket", "http/1.1", open_channels),
    Transport("spdy-over-websocket", "http/1.1", open_spdy_tunnel),
    Transport("h2", "h2", open_h2),
)}
# The names `--transport` accepts, the default first.
TRANSPORTS: tuple[str, ...] = tuple(_REGISTRY)


def transport_named(name: str) -> Transport:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose from "
                         f"{', '.join(TRANSPORTS)}") from None


async def open_session(url: str, transport: str = "spdy", ports: Sequence[int] = (), *,
                       insecure: bool = False, ca_file: str | None = None,
                       ssl_context: ssl.SSLContext | None = None, ping_interval: float = 5.0,
                       timeout: float = 10.0, headers: Sequence[tuple[str, str]] = (),
                       offer_udp: bool = True) -> ClientSession:
    """Connect to a stream server URL and upgrade to `transport`.

    `offer_udp`: offer crishim's stream protocol version (portforward.crishim.dev/v1, UDP
    flows) before portforward.k8s.io; the session's `stream_version` and `supports_udp`
    say what the server picked (HTTP/2: after `await session.negotiate()`).

    `headers` are added to the upgrade request (e.g. Authorization for an API server's
    pods/portforward); not supported by h2.

    `ports` is needed by the channel WebSocket (added as ?port= unless the URL has some);
    the other transports take ports per connection. SPDY and h2 sessions ping every
    `ping_interval` seconds (0: never). `timeout` bounds the connect and the server's
    answer to the upgrade (h2: its SETTINGS), and is the session's negotiate() default.
    Raises SessionError / UpgradeRefused, and ValueError for an unknown transport."""
    kind = transport_named(transport)
    try:  # the runtime's URL: a port over 65535 or not digits, an unclosed [ raise here
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise SessionError(f"cannot use stream URL {shown(without_userinfo(url), 120)}: {e}"
                           ) from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SessionError(f"cannot use stream URL {shown(without_userinfo(url), 120)}: need "
                           "http(s)://HOST:PORT/...")
    if "@" in u.netloc:  # never shown, never sent as Host: the URL's token authorises
        raise SessionError(f"cannot use stream URL {shown(without_userinfo(url), 120)}: it "
                           "carries user information (USER[:PASSWORD]@), which crishim does "
                           "not send")
    if ssl_context is None:
        ssl_context = ssl_context_for(url, insecure, ca_file, [kind.alpn])
    host = u.hostname
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    loop = asyncio.get_running_loop()
    conn = UpgradeProtocol(loop)
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation (Ctrl-C)
        # that comes as the connect completes, and the upgrade would be waited for
        async with asyncio.timeout(timeout):
            tr, _ = await loop.create_connection(
                lambda: conn, host, port, ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None)
    except TimeoutError:
        raise SessionError(f"connecting to {u.netloc} timed out after {timeout:g}s") from None
    except ssl.SSLCertVerificationError as e:
        raise SessionError(f"TLS certificate of {u.netloc} not trusted: {e.verify_message}; "
                           "give --certificate-authority FILE or --insecure-skip-tls-verify"
                           ) from None
    except OSError as e:
        raise SessionError(f"cannot connect to the stream server {u.netloc}: "
                           f"{e.strerror or e}") from None
    except ValueError as e:  # a host name idna cannot encode (a label over 63), a NUL in it
        raise SessionError(f"cannot use stream URL {shown(url, 120)}: bad host name: {e}"
                           ) from None
    if tr.is_closing():  # hung up before the upgrade went out: nothing may be written
        raise SessionError("the server closed the connection before answering")
    try:
        versions = tuple(client_offer(udp=offer_udp))
        session = await kind.open(conn, Target(u.netloc, u.scheme, path, tuple(headers),
                                               versions), list(ports), timeout)
    except BaseException:
        tr.abort()
        raise
    session.answer_timeout = timeout
    session.start_keepalive(ping_interval)
    return session
