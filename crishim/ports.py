"""Checks of what peers send: the one port parser (every port in SPDY and HTTP/2 stream
headers, the WebSocket query, CRI PortForwardRequest goes through here), and the pod IPs
and network namespace paths a runtime or a helper request names."""

from __future__ import annotations

import ipaddress

_ASCII_DIGITS = frozenset("0123456789")


class InvalidPort(ValueError):
    """A port that is not 1 to 5 ASCII digits in 1..65535; the message shows it, truncated."""


def shown(text: object, limit: int = 32) -> str:
    """repr() of peer input cut to limit characters: messages must stay short."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def parse_port(text: str) -> int:
    """A TCP port from its decimal text; InvalidPort otherwise. Only ASCII digits count:
    str.isdigit() also accepts '²' and Arabic-Indic or fullwidth digits."""
    if not 1 <= len(text) <= 5 or not _ASCII_DIGITS.issuperset(text):
        raise InvalidPort(f"invalid port {shown(text)}: expected 1 to 65535 in ASCII digits")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidPort(f"invalid port {shown(text)}: expected 1 to 65535")
    return port


def check_port(port: int) -> int:
    """A port that arrived as a number (CRI PortForwardRequest): 1..65535 or InvalidPort."""
    if not 1 <= port <= 65535:
        raise InvalidPort(f"invalid port {shown(port)}: expected 1 to 65535")
    return port


def ip_or_empty(text: str) -> str:
    """text if it is an IP address, else "" (a pod IP from a runtime or a helper request,
    dialled only by the pod-IP fallback: a NUL or a host name in it made connect() raise
    TypeError, a traceback per forwarded connection)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return ""
    return text


def netns_path_problem(path: str) -> str:
    """Why path cannot be a network namespace to open, or "": it must be absolute (a
    relative one would be resolved in crishim's working directory) and free of NUL (which
    made open() raise ValueError past every handler)."""
    if "\0" in path:
        return f"{shown(path, 64)} contains a NUL byte"
    if not path.startswith("/"):
        return f"{shown(path, 64)} is not an absolute path"
    return ""
