"""The wire protocol between the helper runtime plugin (the shim) and `crishim helper`.

Protocol, version 1. One request per unix connection; every message is one line of JSON
(UTF-8, at most 4096 bytes, ending in "\\n").

Requests, shim -> helper:
    {"v": 1, "op": "dial", "netns": PATH | "host", "port": N, "mode": "fd" | "socat",
     "pod_ip": "", "timeout": SECONDS}
        timeout (optional, more than 0, at most 3600; a longer one is sent as 3600): how
        long the connect may take; past
        it the helper answers "timeout" (the shim sends what is left of its dial_timeout
        less a margin, so a pod's port that never answers is told apart from a helper
        that never answers). Without it the connect waits until the shim hangs up.
    {"v": 1, "op": "exists", "netns": PATH}

Replies, helper -> shim:
    {"v": 1, "ok": true, "mode": "fd"}      sent with one SCM_RIGHTS fd: the TCP socket,
                                            already connected inside the netns (127.0.0.1,
                                            then ::1, then pod_ip if given). The helper
                                            closes its copy and the unix connection; it
                                            never sees a byte of the forwarded traffic.
    {"v": 1, "ok": true, "mode": "socat"}   the helper ran socat inside the netns (nsenter
                                            --net=/proc/self/fd/FD of the netns it checked)
                                            and from the next byte on the unix connection
                                            itself carries the traffic (relayed by the
                                            helper through socat); shutdown(SHUT_WR) on
                                            either side is the half-close.
    {"v": 1, "ok": true, "exists": BOOL}    answer to "exists": true only for a network
                                            namespace file (nsfs); false for a missing path
                                            and for any other file alike
    {"v": 1, "ok": false, "error": CODE, "message": TEXT}
        CODE: "gone" (no network namespace at the path, "no network namespace at PATH"
              whatever is or is not there: the shim raises SandboxGone),
              "refused" (nothing answered on the port: DialFailed),
              "timeout" (the connect got no answer within the request's timeout:
              DialTimedOut),
              "mode" (the helper runs the other mode), "busy" (helper_max_requests are
              being served; sent without reading the request), "bad-request", "version",
              "internal" (all DialFailed).
    Every reply of a helper that honours a dial's "timeout" also says "bounds_dials": true
    (older helpers ignore the field and say nothing): only then does the shim take a dial
    with no answer for a stuck helper (HelperUnavailable) before its own dial_timeout.

A helper that exits costs only the requests in flight (and, in socat mode, the relayed
connections): the shim opens a new unix connection for every dial. A connection the
shim closes or half-closes before the reply (its dial_timeout passed, or its client went
away) has its dial dropped (in socat mode, socat killed), with no reply; bytes sent after
the request line (socat mode's traffic, sent ahead) are kept for the relay.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crishim.ports import ip_or_empty, netns_path_problem, shown
from crishim.runtime import HOST
from crishim.sysutil import wait_io

PROTOCOL_VERSION = 1
MAX_LINE = 4096
MAX_DIAL_TIMEOUT = 3600  # a dial request's timeout, at most (0 or none: no bound)


class ProtocolError(Exception):
    """A message that does not follow the helper protocol; code is the error code replied."""

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    mode: str = ""
    exists: bool | None = None
    error: str = ""
    message: str = ""
    #: the helper bounds a dial's connect by the request's timeout (and answers "timeout"):
    #: said in every reply of this helper; an older one's replies lack it (False)
    bounds_dials: bool = True

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "ok": self.ok}
        if self.ok:
            if self.mode:
                body["mode"] = self.mode
            if self.exists is not None:
                body["exists"] = self.exists
        else:
            body["error"] = self.error
            body["message"] = self.message
        if self.bounds_dials:
            body["bounds_dials"] = True
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Reply:
        try:
            body = json.loads(line)
        except (ValueError, RecursionError) as e:  # a line of 4096 "[" nests past the limit
            raise ProtocolError(f"reply is not JSON: {e}") from None
        if not isinstance(body, dict) or body.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"reply of an unknown protocol version: {line[:100]!r}")
        return cls(ok=bool(body.get("ok")), mode=str(body.get("mode", "")),
                   exists=body.get("exists"), error=str(body.get("error", "")),
                   message=str(body.get("message", "")),
                   bounds_dials=body.get("bounds_dials") is True)


def encode_request(op: str, netns: str, port: int = 0, mode: str = "", pod_ip: str = "",
                   timeout: float = 0.0) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "netns": netns}
    if op == "dial":
        body.update(port=port, mode=mode, pod_ip=pod_ip)
        if timeout > 0:  # past MAX_DIAL_TIMEOUT: at most that (the helper gives up then)
            body["timeout"] = round(min(max(timeout, 0.001), MAX_DIAL_TIMEOUT), 3)
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    try:
        body = json.loads(line)
    except (ValueError, RecursionError) as e:  # a line of 4096 "[" nests past the limit
        raise ProtocolError(f"request is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("request is not a JSON object")
    if body.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {body.get('v')!r} not supported "
                            f"(this helper speaks {PROTOCOL_VERSION})", code="version")
    op, netns = body.get("op"), body.get("netns")
    if op not in ("dial", "exists"):
        raise ProtocolError(f"unknown op {op!r}")
    if not isinstance(netns, str):
        raise ProtocolError(f"netns must be an absolute path or {HOST!r}, got {shown(netns)}")
    if netns != HOST and netns_path_problem(netns):
        raise ProtocolError(f"netns must be an absolute path or {HOST!r}: "
                            f"{netns_path_problem(netns)}")
    if op == "dial":
        port = body.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ProtocolError(f"port must be in 1..65535, got {port!r}")
        if body.get("mode") not in ("fd", "socat"):
            raise ProtocolError(f"mode must be fd or socat, got {body.get('mode')!r}")
        pod_ip = body.get("pod_ip", "")
        if not isinstance(pod_ip, str) or (pod_ip and not ip_or_empty(pod_ip)):
            raise ProtocolError(f"pod_ip must be an IP address or empty, got "
                                f"{shown(pod_ip, 64)}")
        timeout = body.get("timeout", 0)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) \
                or not 0 <= timeout <= MAX_DIAL_TIMEOUT:
            raise ProtocolError(f"timeout must be a number of seconds from 0 to "
                                f"{MAX_DIAL_TIMEOUT}, got {shown(timeout, 64)}")
    return body


async def read_line(sock: socket.socket, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """One protocol line from a non-blocking unix socket, and the fds sent with it. Reads
    no byte past the newline, so bytes that follow (socat mode) stay in the socket."""
    data = b""
    fds: list[int] = []
    try:
        while len(data) < MAX_LINE:
            try:
                peek = sock.recv(MAX_LINE - len(data), socket.MSG_PEEK)
            except BlockingIOError:
                await wait_io(sock)
                continue
            if not peek:
                raise EOFError("connection closed before a complete line")
            # the bytes up to the newline, or all of them: they are the line's either way
            end = peek.find(b"\n")
            chunk, got, _flags, _addr = socket.recv_fds(
                sock, end + 1 if end >= 0 else len(peek), max_fds or 1)
            fds.extend(got)
            data += chunk
            if data.endswith(b"\n"):
                break
        else:
            raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if not max_fds:
        for fd in fds:  # nobody asked for these
            os.close(fd)
        fds = []
    return data[:-1], fds


async def send_line(sock: socket.socket, line: bytes, fds: Sequence[int] = ()) -> None:
    """Send one line (with fds, in the same message) on a non-blocking unix socket."""
    view = memoryview(line)
    first = True
    while view:
        try:
            n = socket.send_fds(sock, [view], list(fds)) if first and fds else sock.send(view)
        except BlockingIOError:
            await wait_io(sock, writable=True)
            continue
        first = False
        view = view[n:]
