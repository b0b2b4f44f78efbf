"""The RFC 6455 opening handshake, both sides: the upgrade request, the ``101`` answer
with its ``Sec-WebSocket-Accept`` and the subprotocol negotiation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from crishim.protocols.headers import header_tokens

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_RESPONSE_HEAD = 64 * 1024


class HandshakeError(Exception):
    """The opening handshake cannot succeed.

    Server side: ``status`` is 400 (malformed upgrade) or 403 (no acceptable
    subprotocol) and ``to_response()`` renders the HTTP rejection. Client side:
    ``status`` is the status the server answered with (or 101 when a 101 response
    was itself unacceptable).
    """

    def __init__(self, status: int, reason: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or []

    def to_response(self) -> bytes:
        """A complete ``HTTP/1.1 4xx`` response with the reason as a text body."""
        phrase = {400: "Bad Request", 403: "Forbidden"}.get(self.status, "Error")
        body = (self.reason + "\n").encode("utf-8", "replace")
        lines = [f"HTTP/1.1 {self.status} {phrase}".encode("ascii")]
        lines += [name + b": " + value for name, value in self.headers]
        lines += [
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: " + str(len(body)).encode("ascii"),
            b"Connection: close",
        ]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def websocket_accept_value(key: str | bytes) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    return base64.b64encode(hashlib.sha1(key.strip() + _ACCEPT_GUID).digest()).decode("ascii")


def is_websocket_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """True if the request asks to upgrade to WebSocket (``Upgrade`` + ``Connection``)."""
    upgrade = {t.lower() for t in header_tokens(headers, b"upgrade")}
    connection = {t.lower() for t in header_tokens(headers, b"connection")}
    return "websocket" in upgrade and "upgrade" in connection


def accept_handshake(
    headers: list[tuple[bytes, bytes]], supported: list[str],
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, str | None]:
    """Validate a client's upgrade request and build the ``101`` response.

    Returns the raw response bytes and the chosen subprotocol: the first one the
    client offered that is in ``supported``, or None when the client offered none
    (the caller decides what that means; for the channel protocol it is binary mode).
    Raises HandshakeError (400 malformed, 403 no acceptable subprotocol).
    """
    if not is_websocket_upgrade(headers):
        raise HandshakeError(400, "not a WebSocket upgrade: need 'Upgrade: websocket' "
                                  "and 'Connection: Upgrade'")
    versions = header_tokens(headers, b"sec-websocket-version")
    if versions != ["13"]:
        raise HandshakeError(
            400,
            f"unsupported Sec-WebSocket-Version {versions or 'missing'}; only 13 is supported",
            [(b"Sec-WebSocket-Version", b"13")],
        )
    keys = _header_values(headers, b"sec-websocket-key")
    if len(keys) != 1:
        raise HandshakeError(400, "need exactly one Sec-WebSocket-Key header")
    key = keys[0].strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not a base64-encoded 16-byte nonce")

    offered = header_tokens(headers, b"sec-websocket-protocol")
    chosen: str | None = None
    if offered:
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise HandshakeError(
                403,
                f"none of the requested subprotocols {offered} is supported; "
                f"supported: {supported}",
            )

    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + websocket_accept_value(key).encode("ascii"),
    ]
    if chosen is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + chosen.encode("latin-1"))
    lines += [name + b": " + value for name, value in extra_headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n", chosen


def client_handshake_request(
    host: str,
    target: str,
    subprotocols: list[str],
    key: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, str]:
    """Raw ``GET`` upgrade request bytes and the ``Sec-WebSocket-Accept`` to expect."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [
        f"GET {target} HTTP/1.1".encode("ascii"),
        b"Host: " + host.encode("idna"),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key.encode("ascii"),
        b"Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode("latin-1"))
    lines += [name + b": " + value for name, value in extra_headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n", websocket_accept_value(key)


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    subprotocol: str | None
    leftover: bytes  # bytes after the response head: WebSocket frames (101) or body


def parse_handshake_response(
    data: bytes,
    expected_accept: str | None = None,
    offered: list[str] | None = None,
) -> HandshakeResponse | None:
    """Parse the server's answer to ``client_handshake_request``.

    Returns None while the response head is incomplete. For a ``101`` response,
    checks the ``Sec-WebSocket-Accept`` (if ``expected_accept`` is given), the
    upgrade headers and that the chosen subprotocol was ``offered``; a failed check
    raises HandshakeError. Non-101 answers are returned as they are for the caller
    to report.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > _MAX_RESPONSE_HEAD:
            raise HandshakeError(0, "handshake response head is larger than 64 KiB")
        return None
    head, leftover = data[:end], bytes(data[end + 4:])
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        raise HandshakeError(0, f"malformed status line {status_line[:100]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HandshakeError(status, f"malformed header line {line[:100]!r}")
        headers.append((name.strip().lower(), value.strip()))
    protocols = header_tokens(headers, b"sec-websocket-protocol")
    subprotocol = protocols[0] if protocols else None
    if status != 101:
        return HandshakeResponse(status, reason, headers, subprotocol, leftover)
    if not is_websocket_upgrade(headers):
        raise HandshakeError(101, "101 response without 'Upgrade: websocket'")
    accepts = _header_values(headers, b"sec-websocket-accept")
    if expected_accept is not None and accepts != [expected_accept.encode("ascii")]:
        raise HandshakeError(101, f"Sec-WebSocket-Accept {accepts} does not match the key sent")
    if len(protocols) > 1 or (subprotocol is not None and subprotocol not in (offered or [])):
        raise HandshakeError(101, f"server chose subprotocol {protocols} that was not offered")
    return HandshakeResponse(status, reason, headers, subprotocol, leftover)

