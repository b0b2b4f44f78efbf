"""The one port parser: every port a peer sends (SPDY and HTTP/2 stream headers, the
WebSocket query, CRI PortForwardRequest) goes through here."""

from __future__ import annotations

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
