"""Header lists as the codecs hand them over: (name, value) byte pairs."""

from __future__ import annotations

from collections.abc import Iterable


def header_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes | str) -> list[str]:
    """Comma-separated tokens of every header called `name`, in order, stripped, empty
    ones dropped (RFC 9110 5.6.1 lists)."""
    key = (name.encode("latin-1") if isinstance(name, str) else name).lower()
    tokens: list[str] = []
    for k, v in headers:
        if k.lower() == key:
            tokens += [p for p in (t.strip() for t in v.decode("latin-1").split(",")) if p]
    return tokens
