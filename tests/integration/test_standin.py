"""Tests of the API server + kubelet stand-in, with real kubectl and real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

from tests.support import missing
from tests.support.standin import (
    KubectlPortForwardError,
    KubeStandIn,
    free_port,
    run_kubectl_port_forward,
)

SDK = "/usr/lib/google-cloud-sdk/bin"
KUBECTL_127 = f"{SDK}/kubectl.1.27"
KUBECTL_133 = f"{SDK}/kubectl.1.33"


def _need(path: str) -> str:
    if not os.access(path, os.X_OK):
        missing(path)
    return path


class Backend:
    """A tiny stream server of the test's own, in its own thread.

    Records the raw request head of every connection. ``mode``:
    ``"403"`` refuses every upgrade; ``"spdy"`` answers an SPDY 101 and records
    whatever follows; ``"echo"`` answers 101, echoes until EOF, then sends
    ``b"bye"`` and closes (a half-close test).
    """

    def __init__(self, mode: str = "403") -> None:
        self.mode = mode
        self.heads: list[bytes] = []
        self.after: list[bytearray] = []
        self.eof_seen = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, token: str = "tok12345") -> str:
        return f"http://127.0.0.1:{self.port}/portforward/{token}"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.mode == "403":
                body = b"upgrade refused by test backend"
                w.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                await w.drain()
                return
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
            await w.drain()
            buf = bytearray()
            self.after.append(buf)
            while True:
                data = await r.read(1 << 18)
                if not data:
                    break
                buf += data
                if self.mode == "echo":
                    w.write(data)
                    await w.drain()
            self.eof_seen.set()
            if self.mode == "echo":
                w.write(b"bye")
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    def close(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def backend_403():
    b = Backend("403")
    yield b
    b.close()


def _head_lines(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in lines[1:]:
        if line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


def _raw_request(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data


# ------------------------------------------------------------------ kubectl 1.27


def test_kubectl_127_spdy_upgrade_reaches_backend(backend_403):
    kubectl = _need(KUBECTL_127)
    with KubeStandIn({"web": "sandbox-web-1"}, lambda sb, ports: backend_403.url()) as k:
        with pytest.raises(KubectlPortForwardError) as ei:
            run_kubectl_port_forward(kubectl, k.server_url, "pod/web",
                                     [f"{free_port()}:80"], timeout=30)
        err = ei.value
        # kubectl gave up because the backend refused the upgrade
        assert err.returncode not in (0, None)
        assert "upgrade refused by test backend" in err.output

        # discovery and the pod GET were answered
        answered = [(r.method, r.path, r.status) for r in k.requests]
        assert ("GET", "/api", 200) in answered
        assert ("GET", "/api/v1", 200) in answered
        assert ("GET", "/api/v1/namespaces/default/pods/web", 200) in answered

        # the runtime's PortForward: sandbox id, and (SPDY) no ports
        assert k.port_forward_calls == [("sandbox-web-1", [])]

        # exactly one upgrade, SPDY POST; it reached the backend at the URL's path
        assert len(k.upgrades) == 1
        up = k.upgrades[0]
        assert (up.method, up.path, up.transport) == (
            "POST", "/api/v1/namespaces/default/pods/web/portforward", "spdy")
        assert up.header("x-stream-protocol-version") == "portforward.k8s.io"
        assert up.backend_status == 403
        assert len(backend_403.heads) == 1
        line, hdrs = _head_lines(backend_403.heads[0])
        assert line == "POST /portforward/tok12345 HTTP/1.1"
        assert hdrs["host"] == f"127.0.0.1:{backend_403.port}"
        assert hdrs["upgrade"] == "SPDY/3.1"
        assert hdrs["connection"].lower() == "upgrade"
        assert hdrs["x-stream-protocol-version"] == "portforward.k8s.io"
        assert hdrs["user-agent"].startswith("kubectl")
        assert backend_403.heads[0] == up.forwarded_head


def test_kubectl_127_bare_pod_name(backend_403):
    kubectl = _need(KUBECTL_127)
    with KubeStandIn({"web": "sb"}, lambda sb, ports: backend_403.url()) as k:
        pf = run_kubectl_port_forward(kubectl, k.server_url, "web", ["80"], wait_ready=False,
                                      as_given=True)
        with pf:
            assert pf.wait(30) != 0
        assert "kubectl" in pf.args[0] and pf.args[-2:] == ["web", "80"]
        assert ("GET", "/api/v1/namespaces/default/pods/web", 200) in [
            (r.method, r.path, r.status) for r in k.requests]
        assert k.port_forward_calls == [("sb", [])]


def test_kubectl_127_forwarding_lines_and_bytes_through_relay():
    """A backend that upgrades: kubectl reports its listeners, and SPDY frames
    for a local connection cross the relay."""
    kubectl = _need(KUBECTL_127)
    backend = Backend("spdy")
    try:
        with KubeStandIn({"web": "sb-1"}, lambda sb, ports: backend.url()) as k:
            fixed = free_port()
            with run_kubectl_port_forward(kubectl, k.server_url, "pod/web",
                                          [f"{fixed}:80", ":443"]) as pf:
                assert pf.local_ports[80] == fixed
                assert pf.local_ports[443] not in (0, fixed)
                assert f"Forwarding from 127.0.0.1:{fixed} -> 80" in pf.output()
                assert k.upgrades[0].backend_status == 101
                # a local connection makes kubectl open its error+data streams
                with socket.create_connection(("127.0.0.1", fixed), timeout=5):
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        if backend.after and len(backend.after[0]) >= 8:
                            break
                        time.sleep(0.05)
                frames = bytes(backend.after[0])
                # an SPDY/3 control frame, type SYN_STREAM
                assert frames[:4] == b"\x80\x03\x00\x01"
                assert pf.wait_for_output(rf"Handling connection for {fixed}\b", 10)
            # kubectl terminated: the relay closed the backend side
            assert backend.eof_seen.wait(10)
    finally:
        backend.close()


# ------------------------------------------------------------------ kubectl 1.33


def test_kubectl_133_websocket_first_then_spdy_fallback(backend_403):
    kubectl = _need(KUBECTL_133)
    with KubeStandIn({"web": "sandbox-web-1"}, lambda sb, ports: backend_403.url()) as k:
        with pytest.raises(KubectlPortForwardError) as ei:
            run_kubectl_port_forward(kubectl, k.server_url, "pod/web",
                                     [f"{free_port()}:80"], timeout=30)
        assert ei.value.returncode not in (0, None)
        assert ("GET", "/api/v1/namespaces/default/pods/web", 200) in [
            (r.method, r.path, r.status) for r in k.requests]

        assert [(u.method, u.transport) for u in k.upgrades] == [
            ("GET", "websocket"), ("POST", "spdy")]
        ws, spdy = k.upgrades
        assert ws.header("sec-websocket-protocol") == "SPDY/3.1+portforward.k8s.io"
        assert ws.header("sec-websocket-version") == "13"
        assert ws.backend_status == 403 and spdy.backend_status == 403
        assert spdy.header("upgrade") == "SPDY/3.1"
        assert spdy.header("x-stream-protocol-version") == "portforward.k8s.io"
        # kubectl 1.33 sends no ports in the query of either attempt
        assert ws.query == {} and spdy.query == {}
        assert k.port_forward_calls == [("sandbox-web-1", []), ("sandbox-web-1", [])]

        assert [_head_lines(h)[0] for h in backend_403.heads] == [
            "GET /portforward/tok12345 HTTP/1.1", "POST /portforward/tok12345 HTTP/1.1"]
        _, ws_hdrs = _head_lines(backend_403.heads[0])
        assert ws_hdrs["upgrade"] == "websocket"
        assert ws_hdrs["sec-websocket-protocol"] == "SPDY/3.1+portforward.k8s.io"
        assert ws_hdrs["sec-websocket-key"] == ws.header("sec-websocket-key")


# ------------------------------------------------------------------ unknown pod


@pytest.mark.parametrize("kubectl", [KUBECTL_127, KUBECTL_133])
@pytest.mark.parametrize("form", ["pod/missing", "pods/missing", "missing"])
def test_unknown_pod_not_found(kubectl, form):
    kubectl = _need(kubectl)
    called = []
    with KubeStandIn({"web": "sb"}, lambda sb, ports: called.append(sb) or "http://x/") as k:
        pf = run_kubectl_port_forward(kubectl, k.server_url, form, ["80"], wait_ready=False,
                                      as_given=True)
        with pf:
            code = pf.wait(30)
        assert code != 0
        assert 'pods "missing" not found' in pf.output()
        assert called == [] and k.upgrades == []


def test_unknown_pod_status_json():
    with KubeStandIn({"web": "sb"}, lambda sb, ports: "http://x/") as k:
        port = int(k.server_url.rsplit(":", 1)[1])
        resp = _raw_request(port, b"GET /api/v1/namespaces/default/pods/nope HTTP/1.1\r\n"
                                  b"Host: x\r\nConnection: close\r\n\r\n")
        head, body = resp.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 404")
        status = json.loads(body)
        assert status["kind"] == "Status" and status["reason"] == "NotFound"
        assert status["message"] == 'pods "nope" not found'
        assert status["details"] == {"name": "nope", "kind": "pods"}


# ------------------------------------------------------------------ raw-socket checks


def _upgrade_request(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n"
            f"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: portforward.k8s.io\r\n{extra}\r\n").encode()


def test_relay_is_transparent_with_half_close():
    backend = Backend("echo")
    try:
        with KubeStandIn({"ns1/web": "sb-ns1"}, lambda sb, ports: backend.url("t0k")) as k:
            port = int(k.server_url.rsplit(":", 1)[1])
            payload = os.urandom(8 * 1024 * 1024)
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(_upgrade_request("/api/v1/namespaces/ns1/pods/web/portforward?x=1"))
                got = bytearray()

                def reader():
                    while True:
                        data = s.recv(1 << 20)
                        if not data:
                            return
                        got.extend(data)

                t = threading.Thread(target=reader)
                t.start()
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)  # half-close: the backend must see EOF
                t.join(30)
                assert not t.is_alive()
            resp = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
            assert bytes(got) == resp + payload + b"bye"
            assert backend.eof_seen.is_set()
            line, hdrs = _head_lines(backend.heads[0])
            # target is the URL's path; the client's own query is not passed on
            assert line == "POST /portforward/t0k HTTP/1.1"
            assert hdrs["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"
            assert k.port_forward_calls == [("sb-ns1", [])]
    finally:
        backend.close()


def test_websocket_ports_from_query(backend_403):
    calls = []

    async def pf(sb, ports):  # an async runtime call works too
        calls.append((sb, ports))
        return backend_403.url()

    with KubeStandIn({"web": "sb"}, pf) as k:
        port = int(k.server_url.rsplit(":", 1)[1])
        ws = ("GET /api/v1/namespaces/default/pods/web/portforward{q} HTTP/1.1\r\nHost: api\r\n"
              "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n")
        # channel protocol without ports: refused before the runtime is asked
        resp = _raw_request(port, ws.format(q="").encode())
        assert resp.startswith(b"HTTP/1.1 400")
        assert b'query parameter \\"port\\" is required' in resp
        assert calls == []
        # ports= (API server name) and port= (kubelet name), comma lists allowed
        resp = _raw_request(port, ws.format(q="?ports=80&ports=443,8080&port=9090").encode())
        assert resp.startswith(b"HTTP/1.1 403")
        assert calls == [("sb", [80, 443, 8080, 9090])]
        assert k.upgrades[-1].ports == [80, 443, 8080, 9090]
        assert _head_lines(backend_403.heads[-1])[0] == "GET /portforward/tok12345 HTTP/1.1"


class _FakeRpcError(Exception):
    def __init__(self, name: str, details: str) -> None:
        super().__init__(details)
        self._name, self._details = name, details

    def code(self):
        return type("Code", (), {"name": self._name})()

    def details(self):
        return self._details


@pytest.mark.parametrize("exc,status,reason,message", [
    (RuntimeError("runtime exploded"), 500, "InternalError", "runtime exploded"),
    (_FakeRpcError("NOT_FOUND", "sandbox sb not found"), 404, "NotFound",
     "rpc error: code = NotFound desc = sandbox sb not found"),
    (_FakeRpcError("RESOURCE_EXHAUSTED", "too many"), 429, "TooManyRequests",
     "rpc error: code = ResourceExhausted desc = too many"),
])
def test_port_forward_error_relayed(exc, status, reason, message):
    def pf(sb, ports):
        raise exc

    with KubeStandIn({"web": "sb"}, pf) as k:
        port = int(k.server_url.rsplit(":", 1)[1])
        resp = _raw_request(
            port, _upgrade_request("/api/v1/namespaces/default/pods/web/portforward"))
        head, body = resp.split(b"\r\n\r\n", 1)
        assert head.startswith(f"HTTP/1.1 {status}".encode())
        st = json.loads(body)
        assert (st["kind"], st["code"], st["reason"], st["message"]) == (
            "Status", status, reason, message)
        assert k.upgrades == []


def test_port_forward_error_shown_by_kubectl():
    kubectl = _need(KUBECTL_127)

    def pf(sb, ports):
        raise RuntimeError("no such sandbox on this node")

    with KubeStandIn({"web": "sb"}, pf) as k:
        pf_ = run_kubectl_port_forward(kubectl, k.server_url, "pod/web", ["80"], wait_ready=False)
        with pf_:
            assert pf_.wait(30) != 0
        assert "no such sandbox on this node" in pf_.output()


def test_discovery_shapes():
    with KubeStandIn({"web": "sb"}, lambda sb, ports: "http://x/") as k:
        port = int(k.server_url.rsplit(":", 1)[1])

        def get(path):
            resp = _raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                      f"Connection: close\r\n\r\n".encode())
            head, body = resp.split(b"\r\n\r\n", 1)
            return int(head.split()[1]), body

        code, body = get("/api/v1")
        assert code == 200
        names = {r["name"] for r in json.loads(body)["resources"]}
        assert {"pods", "pods/portforward"} <= names
        code, body = get("/api/v1/namespaces/default/pods/web")
        pod = json.loads(body)
        assert (pod["apiVersion"], pod["kind"], pod["status"]["phase"]) == ("v1", "Pod", "Running")
        assert pod["metadata"]["uid"] and pod["metadata"]["namespace"] == "default"
        assert pod["spec"]["containers"][0]["ports"] == [{"containerPort": 80, "protocol": "TCP"}]
        assert get("/openapi/v2")[0] == 404
        assert get("/version")[0] == 200


@pytest.mark.parametrize("kubectl", [KUBECTL_127, KUBECTL_133])
def test_named_container_ports_as_the_api_server_returns_them(kubectl):
    """Pods carry named ports with their protocol, in the API server's shape, and kubectl
    resolves names against them, refuses a name none has, and a port that is UDP only."""
    kubectl = _need(kubectl)
    backend = Backend("spdy")
    try:
        with KubeStandIn({"web": "sb"}, lambda sb, ports: backend.url(),
                         container_ports=[80, ("http", 8080), ("dns", 53, "UDP")]) as k:
            port = int(k.server_url.rsplit(":", 1)[1])
            resp = _raw_request(port, b"GET /api/v1/namespaces/default/pods/web HTTP/1.1\r\n"
                                      b"Host: x\r\nConnection: close\r\n\r\n")
            pod = json.loads(resp.split(b"\r\n\r\n", 1)[1])
            assert pod["spec"]["containers"][0]["ports"] == [
                {"containerPort": 80, "protocol": "TCP"},
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]
            with run_kubectl_port_forward(kubectl, k.server_url, "pod/web",
                                          [":http"]) as pf:
                pf.wait_ready([8080])
            for spec, error in ((":nope", "Pod 'web' does not have a named port 'nope'"),
                                (":dns", "UDP protocol is not supported for dns")):
                with run_kubectl_port_forward(kubectl, k.server_url, "pod/web", [spec],
                                              wait_ready=False) as pf:
                    assert pf.wait(30) == 1
                    assert pf.output() == f"error: {error}\n"
    finally:
        backend.close()
