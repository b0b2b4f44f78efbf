"""The one admission path of the stream server: a request's method and target in, the
redeemed token and its sandbox out, or `Refused` with the HTTP status the client gets.

HTTP/1.1 upgrades (SPDY, WebSocket, h2c) and HTTP/2's first stream go through the same
`Admission`; a refusal is rendered once for HTTP/1.1 (`http1_refusal`) and once for
HTTP/2 (`h2_refusal`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from crishim.forward import ForwardContext
from crishim.protocols.headers import header_tokens
from crishim.runtime import RuntimeError_, Sandbox, SandboxGone, SandboxNotFound
from crishim.tokens import StreamRequest, TokenStore

# An HTTP/1.1 request head, or HTTP/2 frames before the first stream's headers end
MAX_REQUEST_HEAD = 16 * 1024

_REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 410: "Gone",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class Refused(Exception):
    """Refuse a request (or one stream) with `status`; `reason` is the body the client
    reads, `headers` go with the response."""

    def __init__(self, status: int, reason: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers)


def http1_refusal(refused: Refused) -> bytes:
    """A complete HTTP/1.1 response for a refusal, closing the connection."""
    body = (refused.reason + "\n").encode("utf-8", "replace") if refused.reason else b""
    lines = [f"HTTP/1.1 {refused.status} {_REASONS.get(refused.status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in refused.headers]
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}",
              "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1", "replace") + body


def h2_refusal(refused: Refused) -> tuple[list[tuple[str, str]], bytes]:
    """HTTP/2 response headers and body for a refused stream."""
    body = (refused.reason + "\n").encode("utf-8", "replace")
    headers = [(":status", str(refused.status)),
               ("content-type", "text/plain; charset=utf-8"),
               ("content-length", str(len(body)))]
    headers += [(k.lower(), v) for k, v in refused.headers]
    return headers, body


# a path segment longer than this could be a token (22 characters) and is cut
_PLAIN_SEGMENT = 12
_KEPT = 4  # characters of a token a log line shows (docs/protocol.md 1.2)
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_%-]{" + str(_PLAIN_SEGMENT + 1) + ",}")


def redact(path: str) -> str:
    """A request target fit for a log line (tokens are credentials, never logged whole):
    every segment after a `portforward` one and every segment longer than 12 characters
    is cut to its first 4, whatever the path's shape; the query is left out."""
    parts = path.split("?", 1)[0].split("#", 1)[0].split("/")
    after_portforward = False
    for i, part in enumerate(parts):
        if len(part) > _KEPT and (after_portforward or len(part) > _PLAIN_SEGMENT):
            parts[i] = part[:_KEPT] + "…"
        after_portforward = after_portforward or part.lower() == "portforward"
    return "/".join(parts)


def redact_text(text: str) -> str:
    """Free text that may quote a request (a parser's error message): every run of
    characters a token is made of longer than 12 cut to its first 4."""
    return _TOKEN_LIKE.sub(lambda m: m.group(0)[:_KEPT] + "…", text)


class Request:
    """An HTTP/1.1 request head (the upgrade request)."""

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.raw_headers = headers

    def header_values(self, name: str) -> list[str]:
        """All values of a header, comma-separated lists split."""
        return header_tokens(self.raw_headers, name)

    def header(self, name: str) -> str:
        values = self.header_values(name)
        return values[0] if values else ""


@dataclass(frozen=True)
class Admitted:
    """A redeemed request: what the token was issued for, and where it leads."""

    stream_request: StreamRequest
    sandbox: Sandbox
    query: dict[str, list[str]]


class Admission:
    """Redeems a request's token, checking in this order: malformed target -> 400, bad
    path -> 404, wrong method -> 405, draining -> 503, too many sessions -> 429, out of
    descriptors -> 503, bad token -> 404, no such sandbox -> 404, sandbox gone -> 410,
    runtime unavailable -> 503."""

    def __init__(self, tokens: TokenStore, ctx: ForwardContext, max_sessions: int,
                 live_sessions: Callable[[], int], draining: Callable[[], bool]) -> None:
        self.tokens = tokens
        self.ctx = ctx
        self.plugin = ctx.plugin
        self.max_sessions = max_sessions
        self._live_sessions = live_sessions
        self._draining = draining

    async def __call__(self, method: str, target: str,
                       methods: Sequence[str] = ("GET", "POST")) -> Admitted:
        try:
            url = urlsplit(target)
        except ValueError:  # e.g. "//[/portforward/x": an unbalanced IPv6 bracket
            raise Refused(400, "malformed request target") from None
        parts = url.path.split("/")
        if len(parts) != 3 or parts[0] != "" or parts[1] != "portforward" or not parts[2]:
            raise Refused(404, f"no such path {redact(url.path)!r}")
        if method not in methods:
            allowed = ", ".join(methods)
            raise Refused(405, f"method {method} not allowed; port-forward takes {allowed}",
                          [("Allow", allowed)])
        if self._draining():
            raise Refused(503, "crishim is shutting down")
        if self._live_sessions() >= self.max_sessions:
            raise Refused(429, f"too many streaming sessions ({self.max_sessions})",
                          [("Retry-After", "1")])
        if self.ctx.out_of_descriptors:
            raise Refused(503, f"out of file descriptors ({self.ctx.fd_budget} in use: "
                               "RLIMIT_NOFILE less reserved_fds)", [("Retry-After", "1")])
        stream_request = self.tokens.redeem(parts[2])
        if stream_request is None:
            raise Refused(404, "unknown, expired or already used stream token")
        try:
            sandbox = await self.plugin.resolve(stream_request.sandbox_id)
        except SandboxNotFound as e:
            raise Refused(404, str(e)) from None
        except SandboxGone as e:
            raise Refused(410, str(e)) from None
        except RuntimeError_ as e:  # e.g. the upstream runtime did not answer: try later
            raise Refused(503, f"runtime unavailable: {e}", [("Retry-After", "1")]) from None
        return Admitted(stream_request, sandbox, parse_qs(url.query))


# what a transport is handed to admit its own request (HTTP/2's first stream)
Admit = Callable[[str, str, Sequence[str]], Awaitable[Admitted]]
