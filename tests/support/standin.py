"""A stand-in for the Kubernetes API server + kubelet pair, for driving real kubectl.

``KubeStandIn`` answers the few plain HTTP requests ``kubectl port-forward`` makes
before it upgrades (discovery, the pod GET), and handles the upgrade to
``/api/v1/namespaces/{ns}/pods/{name}/portforward`` the way the API server and the
kubelet do between them: the "kubelet" half calls the runtime's CRI
``PortForward(pod_sandbox_id, ports)`` (here: the ``port_forward`` callable), dials the
returned stream URL, sends the client's upgrade request there and then copies bytes
both ways, the 101 (or the refusal) included.

Behaviour taken from the real components:

* Ports for ``PortForwardRequest.port`` come from the query only for WebSocket
  upgrades (the kubelet's V4Options); a WebSocket upgrade without any port is a
  ``400``. SPDY upgrades carry an empty list: their ports arrive per stream.
  (kubectl's ``ports=`` query is the API server's name; the kubelet sees ``port=``.
  Both are accepted.)
* The request sent to the stream URL targets the URL's path and query only: the
  client's query is not passed on (the upgrade path of the apimachinery proxy dials
  its location as is), ``Host`` becomes the URL's host, and each of the two hops adds
  its client to ``X-Forwarded-For``. Every other header line is sent unchanged.
* A runtime error is answered as the kubelet maps gRPC codes (NotFound 404,
  ResourceExhausted 429 with Retry-After, anything else 500), with a metav1 Status.
* Discovery is the legacy (non-aggregated) shape, which every kubectl accepts.
* With ``tls=True`` it serves HTTPS with a certificate from its own self-signed CA
  (``ca_pem``); with ``token`` set every request, upgrades included, needs
  ``Authorization: Bearer <token>`` and is otherwise answered ``401`` with an
  ``Unauthorized`` Status, as the API server does. ``write_kubeconfig`` writes a
  kubeconfig for both (kubectl and crishim read the same file).
* ``websocket_tunnel=False`` refuses the WebSocket tunnel (subprotocol
  ``SPDY/3.1+portforward.k8s.io``) with ``400``, as an API server before 1.30 fails that
  upgrade; clients then fall back to SPDY.

The stand-in runs its own uvloop event loop in a background thread so that
synchronous test code can use it. Established upgrades are relayed in the kernel
(``tests.support.splice_relay``), in threads of this process or, with
``relay_process=True`` (the benchmarks), in a process of their own, as the kubelet is.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import inspect
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import h11

from tests.support.splice_relay import SpliceRelay

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of crishim
    uvloop = None

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = [
    "KubeStandIn",
    "KubectlPortForward",
    "KubectlPortForwardError",
    "RequestRecord",
    "UpgradeRecord",
    "run_kubectl_port_forward",
]

PortForwardFn = Callable[[str, list[int]], "str | Awaitable[str]"]

_WRITE_HIGH_WATER = 4 * 1024 * 1024
_WRITE_LOW_WATER = 1024 * 1024
_SERVER_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_PORTFORWARD_RE = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward/?$")
_POD_RE = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/?$")
_PODS_RE = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/?$")
_SERVICE_RE = re.compile(r"^/api/v1/namespaces/([^/]+)/services/([^/]+)/?$")
# a workload: (group prefix, namespace, resource, name)
_WORKLOAD_RE = re.compile(r"^/(api/v1|apis/apps/v1|apis/batch/v1)/namespaces/([^/]+)/"
                          r"(deployments|replicasets|statefulsets|daemonsets|"
                          r"replicationcontrollers|jobs)/([^/]+)/?$")
# resource -> (kind, group, short names)
_WORKLOADS = {"deployments": ("Deployment", "apps", ["deploy"]),
              "replicasets": ("ReplicaSet", "apps", ["rs"]),
              "statefulsets": ("StatefulSet", "apps", ["sts"]),
              "daemonsets": ("DaemonSet", "apps", ["ds"]),
              "replicationcontrollers": ("ReplicationController", "", ["rc"]),
              "jobs": ("Job", "batch", [])}
_GROUPS = ("apps", "batch")
# a watch answered with a head and no events, held open until the client goes (as the API
# server's watch of a selector nothing matches)
WATCH = object()
_GRPC_HTTP = {"NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429}
_UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


# --------------------------------------------------------------------------- records


@dataclass
class RequestRecord:
    """One HTTP request the stand-in received (before any upgrade)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    status: int | None = None

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def header(self, name: str, default: str | None = None) -> str | None:
        """All values of ``name`` joined with ", " (case-insensitive), or ``default``."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else default


@dataclass
class UpgradeRecord(RequestRecord):
    """An upgrade request to pods/portforward that was proxied to a stream URL."""

    namespace: str = ""
    pod: str = ""
    sandbox_id: str = ""
    ports: list[int] = field(default_factory=list)
    url: str = ""
    forwarded_head: bytes = b""  # the request head as sent to the stream URL
    backend_status: int | None = None  # status code of the stream server's answer
    backend_head: bytes = b""  # the stream server's response head, relayed as it came

    @property
    def transport(self) -> str:
        """'websocket' or 'spdy', from the Upgrade header."""
        up = (self.header("upgrade") or "").lower()
        return "websocket" if "websocket" in up else "spdy"


# --------------------------------------------------------------------------- helpers


def _status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def _grpc_code_name(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except Exception:  # noqa: BLE001 - not a gRPC error after all
        return None
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else None


def _go_style_error(exc: BaseException) -> str:
    """Render a gRPC error the way Go's status errors print (the kubelet's text)."""
    name = _grpc_code_name(exc)
    if name is None:
        return str(exc) or type(exc).__name__
    camel = "".join(part.capitalize() for part in name.split("_"))
    details = getattr(exc, "details", None)
    desc = details() if callable(details) else str(exc)
    return f"rpc error: code = {camel} desc = {desc}"


def _is_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    conn_tokens: list[str] = []
    has_upgrade = False
    for k, v in headers:
        lk = k.lower()
        if lk == "connection":
            conn_tokens.extend(t.strip().lower() for t in v.split(","))
        elif lk == "upgrade" and v.strip():
            has_upgrade = True
    return has_upgrade and "upgrade" in conn_tokens


def _is_websocket(headers: Iterable[tuple[str, str]]) -> bool:
    return any(k.lower() == "upgrade" and "websocket" in v.lower() for k, v in headers) and (
        _is_upgrade(headers)
    )


def _is_spdy_tunnel(headers: Iterable[tuple[str, str]]) -> bool:
    """A WebSocket upgrade offering SPDY over WebSocket (KEP-4006): ports come per stream."""
    for k, v in headers:
        if k.lower() == "sec-websocket-protocol" and any(
                p.strip().lower().startswith("spdy/3.1+") for p in v.split(",")):
            return True
    return False


def _parse_ports(values: list[str]) -> list[int]:
    ports: list[int] = []
    for value in values:
        if value == "":
            raise ValueError('query parameter "port" cannot be empty')
        for part in value.split(","):
            try:
                port = int(part)
            except ValueError:
                raise ValueError(f'unable to parse "{value}" as a port') from None
            if not 1 <= port <= 65535:
                raise ValueError(f'port "{value}" must be > 0')
            ports.append(port)
    return ports


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """The API server's labelSelector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
    `k notin (a,b)`, comma-joined (commas inside parentheses belong to the set)."""
    terms = re.findall(r"(?:[^,(]|\([^)]*\))+", selector)
    for term in (t.strip() for t in terms):
        if not term:
            continue
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", term)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            inside = m.group(1) in labels and labels[m.group(1)] in values
            if inside != (m.group(2) == "in"):
                return False
        elif "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


# --------------------------------------------------------------------------- relay


class _RelayEnd:
    """One end of a byte relay: data read here is written to the peer's transport.

    EOF is propagated as a half-close (``write_eof``); the pair is closed once both
    directions have ended. Backpressure: when the peer's write buffer is full the
    peer pauses *our* reading and resumes it when drained.
    """

    transport: asyncio.Transport | None
    peer: _RelayEnd | None

    def _relay_init(self) -> None:
        self.transport = None
        self.peer = None
        self.got_eof = False
        self.closed = False
        self._pending: list[bytes] = []
        self._pending_eof = False

    # called when a peer (re)attaches: flush what arrived before it existed
    def attach(self, peer: _RelayEnd) -> None:
        self.peer = peer
        pending, self._pending = self._pending, []
        if pending and peer.transport is not None:
            peer.transport.write(b"".join(pending))
        if self._pending_eof:
            self._forward_eof()

    def relay_data(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._pending.append(data)
            return
        if not peer.closed:
            peer.transport.write(data)

    def relay_eof(self) -> bool:
        self.got_eof = True
        if self.peer is None:
            self._pending_eof = True
            return True
        self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        peer = self.peer
        assert peer is not None
        if peer.transport is not None and not peer.closed:
            if peer.got_eof:
                # both directions done
                peer.transport.close()
                if self.transport is not None:
                    self.transport.close()
                return
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()

    def relay_pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def relay_resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def relay_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()


class _BackendProtocol(asyncio.Protocol, _RelayEnd):
    """The connection to the stream URL (the kubelet's dial to the runtime)."""

    def __init__(self, record: UpgradeRecord,
                 splice: Callable[[_BackendProtocol], None] | None = None) -> None:
        self._relay_init()
        self.record = record
        self._status_buf = b""
        self.standin_splice = splice
        self._head = b""
        self._head_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if self.record.backend_status is None and len(self._status_buf) < 64:
            self._status_buf += data[:64]
            m = re.match(rb"HTTP/1\.[01] (\d{3})", self._status_buf)
            if m:
                self.record.backend_status = self.record.status = int(m.group(1))
        self.relay_data(data)
        if not self._head_done:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end >= 0:
                self._head_done = True
                self.record.backend_head = self._head[:end + 4]
                if self.standin_splice is not None and self.record.backend_status == 101:
                    self.standin_splice(self)

    def eof_received(self) -> bool:
        return self.relay_eof()

    def pause_writing(self) -> None:
        self.relay_pause_writing()

    def resume_writing(self) -> None:
        self.relay_resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay_lost(exc)


class _ApiProtocol(asyncio.Protocol, _RelayEnd):
    """A client connection to the "API server": plain HTTP until an upgrade."""

    def __init__(self, standin: KubeStandIn) -> None:
        self._relay_init()
        self.standin = standin
        self.h11 = h11.Connection(h11.SERVER)
        self.mode = "http"  # http -> upgrading -> relay | closing; http -> watching
        self.current: h11.Request | None = None
        self.peer_ip = "127.0.0.1"

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
        self.standin._transports.add(transport)

    def data_received(self, data: bytes) -> None:
        if self.mode == "relay" or self.mode == "upgrading":
            self.relay_data(data)
            return
        if self.mode in ("closing", "watching"):
            return
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self.mode in ("relay", "upgrading"):
            return self.relay_eof()
        if self.mode == "watching":
            return False  # the transport closes
        self.h11.receive_data(b"")
        self._process()
        return False

    def pause_writing(self) -> None:
        self.relay_pause_writing()

    def resume_writing(self) -> None:
        self.relay_resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.standin._transports.discard(self.transport)
        self.relay_lost(exc)

    # -- HTTP handling
    def _process(self) -> None:
        while self.mode == "http":
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self._send_plain(400, b"bad request")
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                self.current = event
                if _is_upgrade(self._headers(event)) and self._portforward_match(event):
                    # wait for EndOfMessage / PAUSED, then take over the connection
                    continue
            elif isinstance(event, h11.EndOfMessage):
                req = self.current
                assert req is not None
                if _is_upgrade(self._headers(req)) and self._portforward_match(req):
                    continue
                self._answer(req)
            elif event is h11.PAUSED:
                req = self.current
                assert req is not None
                early = self.h11.trailing_data[0]
                self._start_upgrade(req, early)
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return
            # Data events (request bodies) are ignored

    @staticmethod
    def _headers(req: h11.Request) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers.raw_items()]

    @staticmethod
    def _portforward_match(req: h11.Request) -> re.Match[str] | None:
        path = urlsplit(req.target.decode("latin-1")).path
        if req.method not in (b"GET", b"POST"):
            return None
        return _PORTFORWARD_RE.match(path)

    def _record(self, req: h11.Request) -> RequestRecord:
        rec = RequestRecord(
            method=req.method.decode("latin-1"),
            target=req.target.decode("latin-1"),
            headers=self._headers(req),
        )
        self.standin.requests.append(rec)
        return rec

    def _send(self, status: int, body: bytes, content_type: str,
              extra: Sequence[tuple[str, str]] = (), close: bool = False) -> None:
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
            *extra,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            out = self.h11.send(h11.Response(status_code=status, headers=headers))
            out += self.h11.send(h11.Data(data=body))
            out += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.transport.close()
            self.mode = "closing"
            return
        self.transport.write(out)
        if close or self.h11.our_state is h11.MUST_CLOSE:
            self.mode = "closing"
            self.transport.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.mode = "closing"
            self.transport.close()

    def _send_json(self, status: int, obj: Any, extra: Sequence[tuple[str, str]] = (),
                   close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra, close)

    def _send_plain(self, status: int, body: bytes) -> None:
        try:
            self._send(status, body, "text/plain; charset=utf-8", close=True)
        except Exception:  # noqa: BLE001
            self.transport.close()

    def _answer(self, req: h11.Request) -> None:
        rec = self._record(req)
        if not self.standin._authorized(rec.headers):
            rec.status = 401
            self._send_json(401, _UNAUTHORIZED)
            return
        status, body, extra = self.standin._route(rec)
        rec.status = status
        if body is WATCH:
            self.mode = "watching"  # what the client sends from now on is not read
            self.transport.write(self.h11.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])))
            return
        if isinstance(body, bytes):
            self._send(status, body, "text/plain; charset=utf-8", extra)
        else:
            self._send_json(status, body, extra)

    # -- the upgrade
    def _start_upgrade(self, req: h11.Request, early: bytes) -> None:
        self.mode = "upgrading"
        self.transport.pause_reading()
        if early:
            self._pending.append(early)
        task = asyncio.get_running_loop().create_task(self._upgrade(req))
        self.standin._tasks.add(task)
        task.add_done_callback(self.standin._tasks.discard)

    def _refuse(self, rec: RequestRecord, status: int, body: dict,
                extra: Sequence[tuple[str, str]] = ()) -> None:
        rec.status = status
        self._pending.clear()
        self.mode = "http"
        self._send_json(status, body, extra, close=True)

    async def _upgrade(self, req: h11.Request) -> None:
        standin = self.standin
        headers = self._headers(req)
        m = self._portforward_match(req)
        assert m is not None
        namespace, name = m.group(1), m.group(2)
        sandbox = standin._sandbox(namespace, name)
        rec = UpgradeRecord(
            method=req.method.decode("latin-1"), target=req.target.decode("latin-1"),
            headers=headers, namespace=namespace, pod=name, sandbox_id=sandbox or "")
        standin.requests.append(rec)
        if not standin._authorized(headers):
            self._refuse(rec, 401, _UNAUTHORIZED)
            return
        if not standin.websocket_tunnel and _is_spdy_tunnel(headers):
            self._refuse(rec, 400, _status_body(
                400, "BadRequest", "unable to upgrade: the WebSocket tunnel "
                "(SPDY/3.1+portforward.k8s.io) is not supported by this server"))
            return
        if sandbox is None:
            self._refuse(rec, 404, _status_body(
                404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}))
            return
        ports: list[int] = []
        if _is_websocket(headers):
            q = rec.query
            try:
                ports = _parse_ports(q.get("ports", []) + q.get("port", []))
            except ValueError as e:
                self._refuse(rec, 400, _status_body(400, "BadRequest", str(e)))
                return
            if not ports and not _is_spdy_tunnel(headers):
                self._refuse(rec, 400, _status_body(
                    400, "BadRequest", 'query parameter "port" is required'))
                return
        standin.port_forward_calls.append((sandbox, list(ports)))
        try:
            url = await standin._call_port_forward(sandbox, list(ports))
        except Exception as exc:  # noqa: BLE001 - relayed to the client like the kubelet
            code = _GRPC_HTTP.get(_grpc_code_name(exc) or "", 500)
            extra = [("Retry-After", "60")] if code == 429 else []
            reason = {404: "NotFound", 429: "TooManyRequests"}.get(code, "InternalError")
            self._refuse(rec, code, _status_body(code, reason, _go_style_error(exc)), extra)
            return
        if self.closed:
            return
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "") or not parsed.hostname:
            self._refuse(rec, 500, _status_body(
                500, "InternalError", f"unsupported stream URL {url!r}"))
            return
        port = parsed.port or 80
        host_header = parsed.netloc.rsplit("@", 1)[-1]
        target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        record = rec
        record.ports = list(ports)
        record.url = url
        record.forwarded_head = self._forward_head(req, target, host_header)
        standin.upgrades.append(record)
        loop = asyncio.get_running_loop()
        try:
            _, backend = await loop.create_connection(
                lambda: _BackendProtocol(record, self._splice if standin.splice else None),
                parsed.hostname, port)
        except OSError as exc:
            self._refuse(rec, 500, _status_body(
                500, "InternalError", f"error dialing backend: {exc}"))
            return
        if self.closed:
            backend.transport.close()
            return
        standin._transports.add(backend.transport)
        backend.transport.write(record.forwarded_head)
        self.mode = "relay"
        backend.attach(self)
        self.attach(backend)
        if not self.closed:
            self.transport.resume_reading()

    def _splice(self, backend: _BackendProtocol) -> None:
        """After the 101: move the established connection into a kernel relay, if nothing
        is still buffered in user space (otherwise keep relaying here)."""
        call_soon = asyncio.get_running_loop().call_soon
        call_soon(self._try_splice, backend, 20)

    def _try_splice(self, backend: _BackendProtocol, tries: int) -> None:
        mine, theirs = self.transport, backend.transport
        if self.closed or backend.closed or mine is None or theirs is None:
            return
        if self._pending or backend._pending or self.got_eof or backend.got_eof \
                or mine.get_write_buffer_size() or theirs.get_write_buffer_size():
            if tries:
                asyncio.get_running_loop().call_later(0.001, self._try_splice, backend,
                                                      tries - 1)
            return
        fds = [os.dup(t.get_extra_info("socket").fileno()) for t in (mine, theirs)]
        # the dups keep both connections open while asyncio lets go of its descriptors
        self.closed = backend.closed = True
        for t in (mine, theirs):
            self.standin._transports.discard(t)
            t.abort()
        self.standin._relay(fds)

    def _forward_head(self, req: h11.Request, target: str, host: str) -> bytes:
        lines = [req.method + b" " + target.encode("latin-1") + b" HTTP/1.1"]
        xff_done = False
        hop = f"{self.peer_ip}, 127.0.0.1".encode()
        for k, v in req.headers.raw_items():
            lk = k.lower()
            if lk == b"host":
                v = host.encode("latin-1")
            elif lk == b"x-forwarded-for" and not xff_done:
                v = v + b", " + hop
                xff_done = True
            lines.append(k + b": " + v)
        if not xff_done:
            lines.append(b"X-Forwarded-For: " + hop)
        return b"\r\n".join(lines) + b"\r\n\r\n"


# --------------------------------------------------------------------------- TLS


def _serving_tls(host: str, directory: str) -> tuple[bytes, ssl.SSLContext]:
    """A self-signed CA and a serving certificate for ``host`` it signed: (CA PEM, server
    context). Clients must trust the CA, as they trust a cluster's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin-ca")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "standin")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    cert_path = os.path.join(directory, "server.crt")
    key_path = os.path.join(directory, "server.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ca_cert.public_bytes(pem), ctx


# --------------------------------------------------------------------------- server


class KubeStandIn:
    """The API server + kubelet pair, as far as ``kubectl port-forward`` can tell.

    ``pods`` maps ``"name"`` (namespace ``default``) or ``"namespace/name"`` to the CRI
    pod sandbox id. ``port_forward(sandbox_id, ports)`` stands for the runtime's CRI
    ``PortForward``; it may be synchronous (run in an executor) or async, and returns
    the stream URL. ``container_ports`` are the ports listed in each pod's spec
    (numbers, or ``(name, number)`` pairs for named ports, or ``(name, number,
    protocol)`` with protocol ``"TCP"``, ``"UDP"`` or ``"SCTP"``).

    Attributes for tests: ``requests`` (every HTTP request, upgrades included, as
    ``RequestRecord``), ``upgrades`` (each proxied upgrade, ``UpgradeRecord``),
    ``port_forward_calls`` (``(sandbox_id, ports)`` per call).
    """

    def __init__(
        self,
        pods: Mapping[str, str],
        port_forward: PortForwardFn,
        *,
        container_ports: Sequence[int | tuple[str, int] | tuple[str, int, str]] = (80,),
        host: str = "127.0.0.1",
        port: int = 0,
        splice: bool = True,
        tls: bool = False,
        token: str | None = None,
        websocket_tunnel: bool = True,
        phases: Mapping[str, str] | None = None,
        relay_process: bool = False,
        labels: Mapping[str, Mapping[str, str]] | None = None,
        services: Mapping[str, Mapping[str, Any]] | None = None,
        workloads: Mapping[str, Mapping[str, Any]] | None = None,
        page_size: int | None = None,
        pod_padding: int = 0,
    ) -> None:
        # relay established upgrades in the kernel, as the kubelet (not through TLS)
        self.splice = splice and not tls
        self.token = token
        self.websocket_tunnel = websocket_tunnel
        # pod "name" or "namespace/name" -> status.phase (default Running)
        self.phases = {(k.rpartition("/")[0] or "default", k.rpartition("/")[2]): v
                       for k, v in (phases or {}).items()}
        # pod "name" or "namespace/name" -> its metadata.labels
        self.labels = {(k.rpartition("/")[0] or "default", k.rpartition("/")[2]): dict(v)
                       for k, v in (labels or {}).items()}
        # service "name" or "namespace/name" -> its spec (selector, ports, clusterIP)
        self.services = {(k.rpartition("/")[0] or "default", k.rpartition("/")[2]): dict(v)
                         for k, v in (services or {}).items()}
        # "resource/name" or "namespace/resource/name" -> its spec (selector: a
        # LabelSelector, or a map for replicationcontrollers)
        self.workloads: dict[tuple[str, str, str], dict] = {}
        for key, spec in (workloads or {}).items():
            parts = key.split("/")
            ns, resource, name = parts if len(parts) == 3 else ["default", *parts]
            self.workloads[(ns, resource, name)] = dict(spec)
        # a LIST with `limit` gets at most this many items a page, and a `continue` token
        # for the rest (the API server may return fewer items than the limit)
        self.page_size = page_size
        self.pod_padding = pod_padding  # bytes of annotation per pod: pods of a real size
        self.ca_pem = b""
        self._ssl: ssl.SSLContext | None = None
        self._tls_dir: str | None = None
        if tls:
            self._tls_dir = tempfile.mkdtemp(prefix="kube-standin-tls-")
            self.ca_pem, self._ssl = _serving_tls(host, self._tls_dir)
        self.pods: dict[tuple[str, str], str] = {}
        for key, sandbox in pods.items():
            ns, _, name = key.rpartition("/")
            self.pods[(ns or "default", name)] = sandbox
        self.port_forward = port_forward
        self.container_ports = list(container_ports)
        self.requests: list[RequestRecord] = []
        self.upgrades: list[UpgradeRecord] = []
        self.port_forward_calls: list[tuple[str, list[int]]] = []
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._relays: list[SpliceRelay] = []
        self.relay_process = relay_process
        self._relay_control: socket.socket | None = None
        self._relay_proc: subprocess.Popen | None = None
        self._tasks: set[asyncio.Task] = set()
        self._uids: dict[tuple[str, str], str] = {}
        self._is_async = inspect.iscoroutinefunction(port_forward) or (
            not inspect.isroutine(port_forward)
            and inspect.iscoroutinefunction(type(port_forward).__call__)
        )

    # -- lifecycle
    @property
    def server_url(self) -> str:
        if self._server is None:
            raise RuntimeError("KubeStandIn is not running")
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def write_kubeconfig(self, path: str, token: str | None = None,
                         namespace: str | None = None) -> str:
        """A kubeconfig for this stand-in: its server URL, its CA (when TLS) and a bearer
        token (default: the one it requires). JSON, which is YAML to every reader."""
        cluster: dict[str, Any] = {"server": self.server_url}
        if self.ca_pem:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        user: dict[str, Any] = {}
        if token or self.token:
            user["token"] = token or self.token
        context: dict[str, Any] = {"cluster": "standin", "user": "standin"}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": cluster}],
            "users": [{"name": "standin", "user": user}],
            "contexts": [{"name": "standin", "context": context}],
        }
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def _authorized(self, headers: Iterable[tuple[str, str]]) -> bool:
        if self.token is None:
            return True
        return any(k.lower() == "authorization" and v == f"Bearer {self.token}"
                   for k, v in headers)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def start(self) -> KubeStandIn:
        if self._thread is not None:
            return self
        if self.relay_process and self.splice:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                self._relay_proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.support.splice_relay", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], cwd=_REPO_ROOT)
            self._relay_control = ours
        self._loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="kube-standin", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        fut.result(timeout=10)
        return self

    def _run(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        started.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ApiProtocol(self), self._host, self._port, reuse_address=True,
            ssl=self._ssl)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for transport in list(self._transports):
            transport.abort()
        await asyncio.sleep(0)

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._thread = None
            self._server = None
            # the loop, which starts relays, has stopped: every relay is known now
            for relay in self._relays:
                relay.shutdown()
            if self._relay_control is not None:
                self._relay_control.close()  # the relay process shuts its relays down, ends
                self._relay_control = None
            if self._relay_proc is not None:
                try:
                    self._relay_proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._relay_proc.kill()
                    self._relay_proc.wait()
                self._relay_proc = None
            if self._tls_dir is not None:
                shutil.rmtree(self._tls_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def relay_pid(self) -> int | None:
        """The relay process's pid (``relay_process=True``), for CPU accounting."""
        return self._relay_proc.pid if self._relay_proc is not None else None

    def _relay(self, fds: list[int]) -> None:
        """Relay an established pair (two descriptors the caller gives up) in the kernel:
        in the relay process if there is one, else in threads of this process."""
        if self._relay_control is None:
            self._relays.append(SpliceRelay(*fds))
            return
        try:
            socket.send_fds(self._relay_control, [b"r"], fds)
        finally:  # the relay process holds its own copies now
            for fd in fds:
                os.close(fd)

    # -- runtime call
    async def _call_port_forward(self, sandbox: str, ports: list[int]) -> str:
        if self._is_async:
            result = await self.port_forward(sandbox, ports)  # type: ignore[misc]
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self.port_forward, sandbox, ports)
            if inspect.isawaitable(result):
                result = await result
        return str(result)

    # -- plain API requests
    def _sandbox(self, namespace: str, name: str) -> str | None:
        return self.pods.get((namespace, name))

    def _route(self, rec: RequestRecord) -> tuple[int, Any, list[tuple[str, str]]]:
        path = rec.path.rstrip("/") or "/"
        if rec.method not in ("GET", "HEAD"):
            m = _PORTFORWARD_RE.match(rec.path)
            if m and rec.method == "POST":
                return 400, _status_body(400, "BadRequest", "Upgrade request required"), []
            return 405, _status_body(405, "MethodNotAllowed",
                                     "the server does not allow this method on the requested "
                                     "resource"), []
        if path == "/api":
            return 200, {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                ],
            }, []
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}}
                for g in _GROUPS]}, []
        if path.startswith("/apis/") and path[len("/apis/"):] in _GROUPS:
            g = path[len("/apis/"):]
            version = {"groupVersion": f"{g}/v1", "version": "v1"}
            return 200, {"kind": "APIGroup", "apiVersion": "v1", "name": g,
                         "versions": [version], "preferredVersion": version}, []
        if path.startswith("/apis/") and path[len("/apis/"):-len("/v1")] in _GROUPS \
                and path.endswith("/v1"):
            g = path[len("/apis/"):-len("/v1")]
            return 200, {"kind": "APIResourceList", "apiVersion": "v1",
                         "groupVersion": f"{g}/v1", "resources": [
                             {"name": resource, "singularName": kind.lower(),
                              "namespaced": True, "kind": kind,
                              **({"shortNames": short} if short else {}),
                              "categories": ["all"],
                              "verbs": ["create", "delete", "deletecollection", "get",
                                        "list", "patch", "update", "watch"]}
                             for resource, (kind, group, short) in _WORKLOADS.items()
                             if group == g]}, []
        if path == "/api/v1":
            return 200, self._core_resources(), []
        if path == "/version":
            return 200, _SERVER_VERSION, []
        m = _PORTFORWARD_RE.match(rec.path)
        if m:
            if self._sandbox(m.group(1), m.group(2)) is None:
                return 404, _status_body(404, "NotFound", f'pods "{m.group(2)}" not found',
                                         {"name": m.group(2), "kind": "pods"}), []
            return 400, _status_body(400, "BadRequest", "Upgrade request required"), []
        m = _POD_RE.match(rec.path)
        if m:
            ns, name = m.group(1), m.group(2)
            if self._sandbox(ns, name) is None:
                return 404, _status_body(404, "NotFound", f'pods "{name}" not found',
                                         {"name": name, "kind": "pods"}), []
            return 200, self._pod(ns, name), []
        m = _PODS_RE.match(rec.path)
        if m:
            if rec.query.get("watch", [""])[0] in ("true", "1"):
                return 200, WATCH, []
            selector = rec.query.get("labelSelector", [""])[0]
            items = [self._pod(ns, name) for ns, name in self.pods
                     if ns == m.group(1)
                     and _selector_matches(selector, self.labels.get((ns, name), {}))]
            metadata: dict[str, Any] = {"resourceVersion": "1"}
            limit = rec.query.get("limit", [""])[0]
            if limit.isdigit() and int(limit) > 0:
                start = int(rec.query.get("continue", ["0"])[0] or 0)
                size = min(int(limit), self.page_size or int(limit))
                if start + size < len(items):
                    metadata["continue"] = str(start + size)
                items = items[start:start + size]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": metadata,
                         "items": items}, []
        m = _SERVICE_RE.match(rec.path)
        if m:
            ns, name = m.group(1), m.group(2)
            if (ns, name) not in self.services:
                return 404, _status_body(404, "NotFound", f'services "{name}" not found',
                                         {"name": name, "kind": "services"}), []
            return 200, self._service(ns, name), []
        m = _WORKLOAD_RE.match(rec.path)
        if m and m.group(1) == ("apis/" + _WORKLOADS[m.group(3)][1] + "/v1"
                                if _WORKLOADS[m.group(3)][1] else "api/v1"):
            ns, resource, name = m.group(2), m.group(3), m.group(4)
            kind, group, _ = _WORKLOADS[resource]
            if (ns, resource, name) not in self.workloads:
                qualified = f"{resource}.{group}" if group else resource
                return 404, _status_body(404, "NotFound", f'{qualified} "{name}" not found',
                                         {"name": name, "group": group,
                                          "kind": resource}), []
            return 200, {"kind": kind, "apiVersion": f"{group}/v1" if group else "v1",
                         "metadata": {"name": name, "namespace": ns, "resourceVersion": "1",
                                      "uid": str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                            f"standin/{resource}/{ns}/{name}"))},
                         "spec": self.workloads[(ns, resource, name)]}, []
        return 404, b"404 page not found\n", []

    def _core_resources(self) -> dict:
        def res(name: str, kind: str, verbs: list[str], namespaced: bool = True,
                short: list[str] | None = None, group_kind: str | None = None) -> dict:
            r: dict[str, Any] = {
                "name": name,
                "singularName": "" if "/" in name else kind.lower(),
                "namespaced": namespaced,
                "kind": group_kind or kind,
                "verbs": verbs,
            }
            if short:
                r["shortNames"] = short
            return r

        rw = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                res("namespaces", "Namespace", ["create", "delete", "get", "list", "patch",
                                                "update", "watch"], False, ["ns"]),
                res("pods", "Pod", rw, short=["po"]) | {"categories": ["all"]},
                res("pods/attach", "PodAttachOptions", ["create", "get"]),
                res("pods/exec", "PodExecOptions", ["create", "get"]),
                res("pods/log", "Pod", ["get"]),
                res("pods/portforward", "PodPortForwardOptions", ["create", "get"]),
                res("pods/proxy", "PodProxyOptions",
                    ["create", "delete", "get", "patch", "update"]),
                res("pods/status", "Pod", ["get", "patch", "update"]),
                res("services", "Service", rw, short=["svc"]) | {"categories": ["all"]},
                res("services/proxy", "ServiceProxyOptions",
                    ["create", "delete", "get", "patch", "update"]),
                res("services/status", "Service", ["get", "patch", "update"]),
                res("replicationcontrollers", "ReplicationController", rw, short=["rc"]),
            ],
        }

    def _pod(self, namespace: str, name: str) -> dict:
        uid = self._uids.setdefault(
            (namespace, name), str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin/{namespace}/{name}")))
        ports = []
        for p in self.container_ports:
            # as the API server answers: fields in the Go struct's order, protocol
            # defaulted to TCP, no name key for an unnamed port
            if isinstance(p, tuple):
                ports.append({"name": p[0], "containerPort": p[1],
                              "protocol": p[2] if len(p) > 2 else "TCP"})
            else:
                ports.append({"containerPort": p, "protocol": "TCP"})
        now = "2025-01-01T00:00:00Z"
        phase = self.phases.get((namespace, name), "Running")
        running = phase == "Running"
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid,
                "resourceVersion": "1",
                "creationTimestamp": now,
                **({"labels": self.labels[(namespace, name)]}
                   if (namespace, name) in self.labels else {}),
                **({"annotations": {"standin/padding": "x" * self.pod_padding}}
                   if self.pod_padding else {}),
            },
            "spec": {
                "containers": [{
                    "name": "main",
                    "image": "registry.k8s.io/pause:3.10",
                    "ports": ports,
                }],
                "restartPolicy": "Always",
                "nodeName": "standin-node",
            },
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "True" if running else "False",
                                "lastTransitionTime": now}],
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": now,
                "containerStatuses": [{
                    "name": "main",
                    "ready": True,
                    "restartCount": 0,
                    "image": "registry.k8s.io/pause:3.10",
                    "imageID": "",
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }],
            },
        }

    def _service(self, namespace: str, name: str) -> dict:
        spec = dict(self.services[(namespace, name)])
        spec.setdefault("clusterIP", "10.96.0.10")
        spec.setdefault("type", "ClusterIP")
        # as the API server defaults them: protocol TCP, targetPort the port
        spec["ports"] = [{"protocol": "TCP", "targetPort": p.get("port")} | dict(p)
                         for p in spec.get("ports", [])]
        return {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"standin/svc/{namespace}/{name}")),
                "resourceVersion": "1",
                "creationTimestamp": "2025-01-01T00:00:00Z",
            },
            "spec": spec,
            "status": {"loadBalancer": {}},
        }


# --------------------------------------------------------------------------- kubectl


_FORWARD_RE = re.compile(r"Forwarding from (\[[^\]]+\]|[^\s:]+):(\d+) -> (\d+)")


class KubectlPortForwardError(RuntimeError):
    """kubectl ended (or timed out) before it printed its ``Forwarding from`` lines."""

    def __init__(self, message: str, returncode: int | None, output: str) -> None:
        super().__init__(f"{message}; exit code {returncode}; output:\n{output}")
        self.returncode = returncode
        self.output = output


class KubectlPortForward:
    """A running ``kubectl port-forward`` (started by ``run_kubectl_port_forward``).

    ``local_ports`` maps each remote port to the local port on 127.0.0.1 (``forwards``
    lists every ``(address, local, remote)`` line, [::1] included). ``output()`` is
    stdout and stderr so far, interleaved in arrival order. Leaving the ``with`` block
    (or ``close()``) terminates the process this object started.
    """

    def __init__(self, kubectl_path: str, server_url: str, pod: str, specs: Sequence[str],
                 extra_args: Sequence[str] = (), *, namespace: str | None = None,
                 env: Mapping[str, str] | None = None, kubeconfig: str | None = None) -> None:
        self._tmp = tempfile.mkdtemp(prefix="kubectl-standin-")
        if kubeconfig is None:  # an empty one: everything from --server
            kubeconfig = os.path.join(self._tmp, "config")
            with open(kubeconfig, "w"):
                pass
        cmd = [kubectl_path, *(["--server", server_url] if server_url else []),
               "--cache-dir", os.path.join(self._tmp, "cache")]
        if namespace:
            cmd += ["--namespace", namespace]
        cmd += ["port-forward", pod, *specs, *extra_args]
        self.args = cmd
        run_env = {k: v for k, v in os.environ.items()
                   if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
                   and not k.startswith("KUBERNETES_")}
        run_env["KUBECONFIG"] = kubeconfig
        run_env["HOME"] = self._tmp
        if env:
            run_env.update(env)
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.forwards: list[tuple[str, int, int]] = []
        self.local_ports: dict[int, int] = {}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=run_env, text=True, bufsize=1)
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self._lines.append(line)
                m = _FORWARD_RE.search(line)
                if m:
                    addr, local, remote = m.group(1), int(m.group(2)), int(m.group(3))
                    self.forwards.append((addr, local, remote))
                    if addr == "127.0.0.1" or remote not in self.local_ports:
                        self.local_ports[remote] = local
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for_output(self, pattern: str, timeout: float = 30.0) -> re.Match[str] | None:
        """Wait until the output matches the regex ``pattern`` (None on timeout/exit)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._lines))
                if m:
                    return m
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.2))

    def wait_ready(self, remote_ports: Iterable[int], timeout: float = 30.0) -> None:
        """Wait for a ``Forwarding from 127.0.0.1:…`` line for each remote port."""
        wanted = set(remote_ports)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                have = {r for a, _, r in self.forwards if a == "127.0.0.1"}
                if wanted <= have:
                    return
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                    raise KubectlPortForwardError("kubectl exited before forwarding",
                                                  self.proc.returncode, "".join(self._lines))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KubectlPortForwardError("timed out waiting for kubectl",
                                                  self.proc.poll(), "".join(self._lines))
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for kubectl to exit by itself; returns its exit code."""
        code = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_port(spec: str) -> int | None:
    remote = spec.rsplit(":", 1)[-1]
    return int(remote) if remote.isdigit() else None


def run_kubectl_port_forward(kubectl_path: str, server_url: str, pod: str, specs: Sequence[str],
                             extra_args: Sequence[str] = (), *, namespace: str | None = None,
                             wait_ready: bool = True, timeout: float = 30.0,
                             env: Mapping[str, str] | None = None,
                             as_given: bool = False,
                             kubeconfig: str | None = None) -> KubectlPortForward:
    """Start ``kubectl --server URL port-forward POD SPEC...``.

    With ``kubeconfig`` kubectl reads that file (pass ``server_url=""`` to take the
    server from it too). A bare ``pod`` name is passed as ``pod/NAME``; ``TYPE/NAME`` as
    is, and with
    ``as_given=True`` a bare name is passed unchanged (kubectl's ``NAME`` form).
    With ``wait_ready`` (the default) this returns once kubectl printed a
    ``Forwarding from 127.0.0.1:…`` line for every numeric remote port, and raises
    ``KubectlPortForwardError`` (with the output) if kubectl exits first; the process
    is then already reaped. Use the result as a context manager.
    """
    if "/" not in pod and not as_given:
        pod = f"pod/{pod}"
    pf = KubectlPortForward(kubectl_path, server_url, pod, specs, extra_args,
                            namespace=namespace, env=env, kubeconfig=kubeconfig)
    if wait_ready:
        remotes = [p for p in (_remote_port(s) for s in specs) if p is not None]
        try:
            pf.wait_ready(remotes, timeout=timeout)
        except BaseException:
            pf.close()
            raise
    return pf


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (racy by nature; for local specs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
