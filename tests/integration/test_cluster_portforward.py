"""`crishim port-forward --kubeconfig`: the cluster path, through the API server stand-in
(HTTPS from its own CA, a bearer token required) to a real `crishim serve` and the pod
netns, side by side with real kubectl 1.33 on the same kubeconfig."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from tests.support import SANDBOX, missing
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT, HTTP_BODY, HTTP_PORT, UDP_ECHO_PORT
from tests.support.standin import KubeStandIn, free_port, run_kubectl_port_forward
from tests.support.udp_peers import exchange

KUBECTL_133 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"
KUBECTLS = [f"/usr/lib/google-cloud-sdk/bin/kubectl.1.{minor}" for minor in range(27, 34)]
# the pod's container ports by name, as its spec lists them (dns twice: UDP and TCP)
NAMED_PORTS = [("http", HTTP_PORT), ("dns", UDP_ECHO_PORT, "UDP"), ("echo", ECHO_PORT),
               ("dns", ECHO_PORT, "TCP")]
TOKEN = "standin-token-0123456789"
_FORWARD = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


class CrishimClusterForward:
    """`crishim port-forward --kubeconfig ...` as a subprocess; `local[remote]` once ready."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crishim", "port-forward", *args, "--address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.local: dict[int, int] = {}
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(pipe, into), daemon=True)
                         for pipe, into in ((self.proc.stdout, self.stdout),
                                            (self.proc.stderr, self.stderr))]
        for t in self._readers:
            t.start()

    def _read(self, pipe: IO[str], into: list[str]) -> None:
        for line in pipe:
            with self._cond:
                into.append(line.rstrip("\n"))
                m = _FORWARD.search(line)
                if m:
                    self.local[int(m.group(2))] = int(m.group(1))
                self._cond.notify_all()

    def wait_ready(self, remotes: list[int], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not set(remotes) <= set(self.local):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"not forwarding: exit {self.proc.poll()}\n"
                                         f"{self.output()}")
                self._cond.wait(0.2)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for t in self._readers:
            t.join(5)

    def __enter__(self) -> CrishimClusterForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received


def http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
            if answer.endswith(HTTP_BODY):
                break
    return answer


@pytest.fixture
def kubeconfig_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="crishim-kubeconfig-") as d:
        yield d


def standin_for(crishim: CrishimProcess, pods: dict[str, str] | None = None,
                **kw: Any) -> KubeStandIn:
    return KubeStandIn(pods or {"web": SANDBOX},
                       lambda sb, ports: crishim.port_forward_url(sb, ports),
                       tls=True, token=TOKEN, **kw)


def test_websocket_tunnel_over_tls_with_a_bearer_token(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}",
                                   f":{HTTP_PORT}") as pf:
            pf.wait_ready([ECHO_PORT, HTTP_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"x" * 100_000) == b"x" * 100_000
            assert http_get(pf.local[HTTP_PORT]).endswith(HTTP_BODY)
        gets = [r for r in api.requests if r.method == "GET" and r.status == 200]
        assert any(r.path == "/api/v1/namespaces/default/pods/web" for r in gets)
        assert [u.transport for u in api.upgrades] == ["websocket"]
        upgrade = api.upgrades[0]
        assert "SPDY/3.1+portforward.k8s.io" in (upgrade.header("sec-websocket-protocol")
                                                  or "")
        assert upgrade.header("authorization") == f"Bearer {TOKEN}"
        assert upgrade.backend_status == 101


def test_spdy_fallback_when_the_server_refuses_the_websocket_tunnel(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim, websocket_tunnel=False) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "web", f":{ECHO_PORT}",
                                   f":{HTTP_PORT}") as pf:
            pf.wait_ready([ECHO_PORT, HTTP_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"spdy fallback") == b"spdy fallback"
            assert http_get(pf.local[HTTP_PORT]).endswith(HTTP_BODY)
        refused = [r for r in api.requests if r.path.endswith("/portforward")
                   and r.status == 400]
        assert refused and "websocket" in (refused[0].header("upgrade") or "").lower()
        assert [u.transport for u in api.upgrades] == ["spdy"]
        assert api.upgrades[0].method == "POST"


def test_namespace_flag_selects_the_pod(crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim, {"ns1/web": SANDBOX}) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "-n", "ns1", "pod/web",
                                   f":{ECHO_PORT}") as pf:
            pf.wait_ready([ECHO_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"ns1") == b"ns1"
        assert api.upgrades[0].namespace == "ns1"


def test_wrong_token_is_refused_with_kubectls_error(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"), token="wrong")
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}") as pf:
            assert pf.wait() == 1
        assert "You must be logged in to the server (Unauthorized)" in pf.output()
        assert not pf.local
        assert api.requests and all(r.status == 401 for r in api.requests)
        assert not api.port_forward_calls


def test_missing_pod_is_reported_before_listening(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/nope", f":{ECHO_PORT}") as pf:
            assert pf.wait() == 1
        assert 'Error from server (NotFound): pods "nope" not found' in pf.output()
        assert not pf.local and not api.port_forward_calls


def test_an_upgrade_the_api_server_refuses_shows_the_status_message(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """The pod's sandbox is unknown to the runtime: the API server refuses the upgrade
    with a Status, and its message was shown as raw JSON. Now in kubectl's words: the
    same line as kubectl 1.27 to 1.33 print."""
    with standin_for(crishim, {"web": "nosuch"}) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}") as pf:
            assert pf.wait() == 1
        kubectl_errors = set()
        for path in filter(lambda p: os.access(p, os.X_OK), KUBECTLS):
            with run_kubectl_port_forward(path, "", "pod/web", [f":{ECHO_PORT}"],
                                          wait_ready=False, kubeconfig=config) as kubectl:
                assert kubectl.wait(30) == 1
                kubectl_errors.update(line for line in kubectl.output().splitlines()
                                      if line.startswith("error: "))
    errors = [line for line in pf.stderr if line.startswith("error: ")]
    assert len(errors) == 1, pf.output()
    assert re.fullmatch(r"error: error upgrading connection: .*sandbox "
                        r"'nosuch' not found.*", errors[0]), errors
    assert kubectl_errors == set(errors), (kubectl_errors, errors)
    assert '"kind"' not in pf.output() and "{" not in errors[0], pf.output()
    assert not pf.local


def test_pod_not_running_is_refused_as_kubectl(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim, phases={"web": "Pending"}) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}") as pf:
            assert pf.wait() == 1
        assert ("unable to forward port because pod is not running. Current status=Pending"
                in pf.output())
        assert not api.port_forward_calls


def test_untrusted_server_certificate_is_a_clear_error(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """The kubeconfig's CA is what makes the stand-in trusted: without it, no forwarding."""
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with open(config) as f:
            kubeconfig = json.load(f)
        del kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
        with open(config, "w") as f:
            json.dump(kubeconfig, f)
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}") as pf:
            assert pf.wait() == 1
        assert "unable to connect to the server" in pf.output()
        assert "CERTIFICATE_VERIFY_FAILED" in pf.output() or "certificate" in pf.output()


def test_kubectl_133_side_by_side_on_the_same_kubeconfig(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    if not os.access(KUBECTL_133, os.X_OK):
        missing(KUBECTL_133)
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with run_kubectl_port_forward(KUBECTL_133, "", "pod/web", [f":{ECHO_PORT}"],
                                      ["--address", "127.0.0.1"],
                                      kubeconfig=config) as kubectl, \
                CrishimClusterForward("--kubeconfig", config, "pod/web",
                                      f":{ECHO_PORT}") as ours:
            ours.wait_ready([ECHO_PORT])
            for port, who in ((kubectl.local_ports[ECHO_PORT], b"kubectl"),
                              (ours.local[ECHO_PORT], b"crishim")):
                assert echo_roundtrip(port, who * 1000) == who * 1000
        assert len(api.upgrades) == 2
        kubectl_upgrade, ours_upgrade = sorted(
            api.upgrades, key=lambda u: "crishim" in (u.header("user-agent") or ""))
        # the same subresource, transport and credentials as kubectl
        for upgrade in (kubectl_upgrade, ours_upgrade):
            assert upgrade.path == "/api/v1/namespaces/default/pods/web/portforward"
            assert upgrade.transport == "websocket"
            assert upgrade.header("authorization") == f"Bearer {TOKEN}"


def test_token_from_an_exec_plugin(crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """Credentials come from the `kubernetes` loader: an exec plugin's token is sent."""
    plugin = os.path.join(kubeconfig_dir, "credential-plugin")
    with open(plugin, "w") as f:
        f.write(f"#!{sys.executable}\nimport json\nprint(json.dumps({{"
                '"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
                f'"status": {{"token": "{TOKEN}"}}}}))\n')
    os.chmod(plugin, 0o755)
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"), token="unused")
        with open(config) as f:
            kubeconfig = json.load(f)
        kubeconfig["users"][0]["user"] = {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": plugin,
            "interactiveMode": "Never"}}
        with open(config, "w") as f:
            json.dump(kubeconfig, f)
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{ECHO_PORT}") as pf:
            pf.wait_ready([ECHO_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"exec") == b"exec"
        assert api.upgrades[0].header("authorization") == f"Bearer {TOKEN}"


def _hostile_pod_answers(mode: str, stop: threading.Event) -> tuple[socket.socket, str]:
    """An API server on loopback whose pod GET answer never ends: `endless` sends a
    chunked body as fast as it is read, `trickle` one byte of a 1 MB body every 0.5 s
    (each read well within the client's read timeout); or whose every answer is JSON
    nested 100,000 deep (`deep`: 200, `deep404`: 404)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)

    def answer(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            try:
                if mode.startswith("deep"):
                    body = b"[" * 100_000 + b"]" * 100_000
                    status = b"404 Not Found" if mode == "deep404" else b"200 OK"
                    conn.sendall(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (status, len(body), body))
                elif mode == "endless":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
                    while not stop.is_set():
                        conn.sendall(chunk)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000000\r\n\r\n")
                    while not stop.wait(0.5):
                        conn.sendall(b" ")
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("mode, target, error", [
    ("endless", "pod/web", "error: the server's answer is larger than 4 MiB"),
    ("trickle", "pod/web", "error: the server's answer took longer than 3s"),
    ("deep", "pod/web", "error: the server's answer for pods 'web' is not JSON"),
    ("deep", "svc/web", "error: the server's answer for services 'web' is not JSON"),
    ("deep404", "deploy/web", "Error from server (Not Found): [[[[["),
])
def test_a_pod_answer_that_never_ends_is_a_clear_error(kubeconfig_dir: str, mode: str,
                                                        target: str, error: str) -> None:
    """The pod GET is read whole, as kubectl does, but at most 4 MiB and within --timeout:
    an endless answer grew the client by ~220 MiB/s, a trickled one held it forever.
    JSON nested past the parser's stack was a RecursionError traceback."""
    stop = threading.Event()
    listener, server = _hostile_pod_answers(mode, stop)
    config = os.path.join(kubeconfig_dir, "config")
    with open(config, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "hostile",
                   "clusters": [{"name": "hostile", "cluster": {"server": server}}],
                   "users": [{"name": "hostile", "user": {"token": TOKEN}}],
                   "contexts": [{"name": "hostile", "context": {"cluster": "hostile",
                                                                "user": "hostile"}}]}, f)
    try:
        with CrishimClusterForward("--kubeconfig", config, "--timeout", "3", target,
                                   f":{ECHO_PORT}") as pf:
            assert pf.wait(30) == 1
    finally:
        stop.set()
        listener.close()
    assert error in pf.output(), pf.output()
    assert "Traceback" not in pf.output()
    assert not pf.local


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_pod_get_ends_port_forward_with_0(kubeconfig_dir, sig):
    """The pod GET runs before the event loop's signal handlers: Ctrl-C there was a
    KeyboardInterrupt (130) and SIGTERM killed the process (143), not exit 0."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts (in the kernel) and never answers
    config = os.path.join(kubeconfig_dir, "silent")
    with open(config, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "silent",
                   "clusters": [{"name": "silent", "cluster": {
                       "server": f"http://127.0.0.1:{listener.getsockname()[1]}"}}],
                   "users": [{"name": "silent", "user": {"token": "t"}}],
                   "contexts": [{"name": "silent", "context": {"cluster": "silent",
                                                               "user": "silent"}}]}, f)
    try:
        with CrishimClusterForward("--kubeconfig", config, "--timeout", "60", "pod/web",
                                   f":{ECHO_PORT}") as pf:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the GET is on its way
                out = subprocess.run(["ss", "-Htn", "state", "established", "dport",
                                      f"= :{listener.getsockname()[1]}"],
                                     capture_output=True, text=True, timeout=10).stdout
                if out.strip():
                    break
                time.sleep(0.1)
            time.sleep(0.3)
            pf.proc.send_signal(sig)
            assert pf.wait(20) == 0, pf.output()  # not the 60 s --timeout
    finally:
        listener.close()
    assert "Traceback" not in pf.output()


# ------------------------------------------------------------------ named ports


def test_named_remote_ports_forward_to_their_container_ports(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    fixed = free_port()
    with standin_for(crishim, container_ports=NAMED_PORTS) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", ":echo",
                                   f"{fixed}:http") as pf:
            pf.wait_ready([ECHO_PORT, HTTP_PORT])
            assert pf.local[HTTP_PORT] == fixed
            assert f"Forwarding from 127.0.0.1:{fixed} -> {HTTP_PORT}" in pf.stdout
            assert echo_roundtrip(pf.local[ECHO_PORT], b"named" * 20_000) == b"named" * 20_000
            assert http_get(fixed).endswith(HTTP_BODY)


def test_a_bare_name_listens_on_its_number_as_kubectl_133(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """kubectl's rule: `echo` alone (and `echo:echo`) is the resolved number both sides;
    the same lines as kubectl's, and bytes through each."""
    kubectl_path = _need_kubectl(KUBECTL_133)
    with standin_for(crishim, container_ports=NAMED_PORTS) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        for specs in (["echo"], ["echo:echo"]):
            with run_kubectl_port_forward(kubectl_path, "", "pod/web", specs,
                                          ["--address", "127.0.0.1"],
                                          kubeconfig=config) as kubectl:
                kubectl.wait_ready([ECHO_PORT])  # it waits for numeric specs only
                assert kubectl.local_ports[ECHO_PORT] == ECHO_PORT
                assert echo_roundtrip(ECHO_PORT, b"kubectl") == b"kubectl"
                assert kubectl.wait_for_output(rf"Handling connection for {ECHO_PORT}\n")
                kubectl_lines = kubectl.output().splitlines()
            with CrishimClusterForward("--kubeconfig", config, "pod/web", *specs) as ours:
                ours.wait_ready([ECHO_PORT])
                assert echo_roundtrip(ECHO_PORT, b"crishim") == b"crishim"
            assert ours.stdout == kubectl_lines == [
                f"Forwarding from 127.0.0.1:{ECHO_PORT} -> {ECHO_PORT}",
                f"Handling connection for {ECHO_PORT}"]


def _need_kubectl(path: str) -> str:
    if not os.access(path, os.X_OK):
        missing(path)
    return path


@pytest.mark.parametrize("phase", ["Running", "Pending"])
@pytest.mark.parametrize("spec, error", [
    ("nope", "error: Pod 'web' does not have a named port 'nope'"),
    ("8080:nope", "error: Pod 'web' does not have a named port 'nope'"),
    # kubectl's checkUDPPortInPod: the first port named dns is UDP only
    ("dns", "error: UDP protocol is not supported for dns"),
    (f"0{UDP_ECHO_PORT}", f"error: UDP protocol is not supported for 0{UDP_ECHO_PORT}"),
])
def test_a_name_no_container_port_has_is_kubectls_error(
        crishim: CrishimProcess, kubeconfig_dir: str, spec: str, error: str,
        phase: str) -> None:
    """Byte for byte what kubectl 1.27 to 1.33 print, before the pod's phase is looked at
    (kubectl's order) and before anything listens or is upgraded."""
    with standin_for(crishim, container_ports=NAMED_PORTS, phases={"web": phase}) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", spec) as ours:
            assert ours.wait() == 1
        assert ours.stdout == []
        assert ours.stderr == [error]
        for path in filter(lambda p: os.access(p, os.X_OK), KUBECTLS):
            with run_kubectl_port_forward(path, "", "pod/web", [spec], wait_ready=False,
                                          kubeconfig=config) as kubectl:
                assert kubectl.wait(30) == 1
                assert kubectl.output().splitlines() == ours.stderr, path
        assert not api.upgrades and not api.port_forward_calls


def test_a_named_udp_port_matches_the_container_port_with_protocol_udp(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """crishim's /udp on a name picks the UDP port of that name (dns: UDP 5353, not the
    TCP one); without a suffix the first of that name, as kubectl."""
    with standin_for(crishim, container_ports=NAMED_PORTS) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", ":dns/udp",
                                   ":dns/tcp") as pf:
            pf.wait_ready([UDP_ECHO_PORT, ECHO_PORT])
            assert any(line.endswith(f" -> {UDP_ECHO_PORT}/udp") for line in pf.stdout)
            assert exchange(pf.local[UDP_ECHO_PORT], [b"datagram"]) == [b"datagram"]
            assert echo_roundtrip(pf.local[ECHO_PORT], b"dns over tcp") == b"dns over tcp"


def test_a_named_udp_port_with_only_a_tcp_container_port_is_refused(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    with standin_for(crishim, container_ports=NAMED_PORTS) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", ":echo/udp") as pf:
            assert pf.wait() == 1
        assert pf.stderr == ["error: Pod 'web' does not have a named port 'echo' with "
                             "protocol UDP"]
        assert not api.upgrades


# svc/NAME: the service's selector picks "web" (Running) over "web-new" (Pending, its
# sandbox unknown to the runtime: forwarding there would fail); each service port
# forwards to its targetPort, by number, by the pod's container port name, or unset
SERVICE_PODS = {"web": SANDBOX, "web-new": "sb-not-there", "other": "sb-not-there",
                **{f"many-{i}": "sb-not-there" for i in range(4)}, "many-4": SANDBOX}
SERVICE_LABELS = {"web": {"app": "web", "tier": "front"}, "web-new": {"app": "web"},
                  "other": {"app": "other"}, **{f"many-{i}": {"app": "many"} for i in range(5)}}
SERVICE_PHASES = {"web-new": "Pending", **{f"many-{i}": "Pending" for i in range(4)}}
SERVICES = {
    "web": {"selector": {"app": "web"}, "ports": [
        {"name": "http", "port": 80, "targetPort": "http"},
        {"name": "echo", "port": 7, "targetPort": ECHO_PORT},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
        {"name": "same", "port": ECHO_PORT},
        {"name": "gone", "port": 82, "targetPort": "nope"}]},
    "headless": {"selector": {"app": "web"}, "clusterIP": "None",
                 "ports": [{"port": ECHO_PORT, "targetPort": 1}]},
    "nosel": {"ports": [{"port": 80}]},
    "later": {"selector": {"app": "later"}, "ports": [{"port": 7, "targetPort": ECHO_PORT}]},
    "many": {"selector": {"app": "many"}, "ports": [{"port": 7, "targetPort": ECHO_PORT}]},
}


# workloads: a selector as apps/v1 writes it (matchLabels and matchExpressions), a
# replication controller's map, one that selects nothing, and one kubectl finds invalid
WORKLOADS = {
    "deployments/web": {"selector": {"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["front", "back"]},
        {"key": "canary", "operator": "DoesNotExist"}]}},
    "replicationcontrollers/web": {"selector": {"app": "web"}},
    # a Job's selector as the API server defaults it (batch/v1: the job's own uid label)
    "jobs/web": {"selector": {"matchLabels": {"app": "web"}}},
    "statefulsets/none": {"selector": {"matchLabels": {"app": "none"}}},
    "replicasets/bad": {"selector": {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": []}]}},
}


def _kubectl_forwards(kubectl_path: str, config: str, target: str, specs: list[str],
                      expected: list[str], web: int) -> list[str]:
    """kubectl's output once it printed the `expected` lines and served a page on `web`."""
    with run_kubectl_port_forward(kubectl_path, "", target, specs,
                                  ["--address", "127.0.0.1"], wait_ready=False,
                                  kubeconfig=config) as kubectl:
        for line in expected:
            assert kubectl.wait_for_output(re.escape(line)), kubectl.output()
        assert http_get(web).endswith(HTTP_BODY)
        return kubectl.output().splitlines()


def service_standin(crishim: CrishimProcess, **kw: Any) -> KubeStandIn:
    return standin_for(crishim, SERVICE_PODS, container_ports=NAMED_PORTS,
                       labels=SERVICE_LABELS, phases=SERVICE_PHASES,
                       services=SERVICES, workloads=WORKLOADS, **kw)


def test_a_service_forwards_to_its_pods_target_ports_as_kubectl(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """The same lines as kubectl 1.33 for svc/web, and bytes through each port: a target
    port by container port name (http), by number (echo), unset (the service port)."""
    kubectl_path = _need_kubectl(KUBECTL_133)
    web, echo, same = free_port(), free_port(), free_port()
    specs = [f"{web}:80", f"{echo}:echo", f"{same}:{ECHO_PORT}"]
    expected = [f"Forwarding from 127.0.0.1:{web} -> {HTTP_PORT}",
                f"Forwarding from 127.0.0.1:{echo} -> {ECHO_PORT}",
                f"Forwarding from 127.0.0.1:{same} -> {ECHO_PORT}"]
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        kubectl_lines = _kubectl_forwards(kubectl_path, config, "svc/web", specs, expected,
                                          web)
        with CrishimClusterForward("--kubeconfig", config, "svc/web", *specs) as ours:
            ours.wait_ready([HTTP_PORT, ECHO_PORT])
            assert http_get(web).endswith(HTTP_BODY)
            assert echo_roundtrip(echo, b"svc" * 30_000) == b"svc" * 30_000
            assert echo_roundtrip(same, b"unset target") == b"unset target"
        assert ours.stdout[:3] == expected == kubectl_lines[:3]
        assert {u.pod for u in api.upgrades} == {"web"}  # kubectl's and ours
        lists = [r for r in api.requests if r.path == "/api/v1/namespaces/default/pods"]
        assert lists and all(r.query["labelSelector"] == ["app=web"] for r in lists)


def test_a_headless_service_forwards_to_the_port_as_given(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """clusterIP None: the service port is the pod's port (kubectl ignores targetPort)."""
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "service/headless",
                                   f":{ECHO_PORT}") as pf:
            pf.wait_ready([ECHO_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"headless") == b"headless"


def test_a_services_udp_port_forwards_with_the_udp_suffix(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """crishim's /udp: the service's UDP port (53, by name or number) to its targetPort
    (the pod's UDP port named dns), where kubectl refuses UDP ports outright."""
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "svc/web", ":dns/udp") as pf:
            pf.wait_ready([UDP_ECHO_PORT])
            assert f"-> {UDP_ECHO_PORT}/udp" in pf.output()
            assert exchange(pf.local[UDP_ECHO_PORT], [b"svc datagram"]) == [b"svc datagram"]


def test_a_service_waits_for_a_pod_to_match(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """No pod matches svc/later's selector at first: crishim asks again, as kubectl
    watches, and forwards once one does."""
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "svc/later", ":7") as pf:
            deadline = time.monotonic() + 20
            while not [r for r in api.requests if "app%3Dlater" in r.target
                       or r.query.get("labelSelector") == ["app=later"]]:
                assert time.monotonic() < deadline and pf.proc.poll() is None, pf.output()
                time.sleep(0.05)
            assert not pf.local  # nothing listens before a pod is found
            api.labels[("default", "web")] = {"app": "later"}
            pf.wait_ready([ECHO_PORT])
            assert echo_roundtrip(pf.local[ECHO_PORT], b"found") == b"found"
        lists = [r for r in api.requests if r.query.get("labelSelector") == ["app=later"]]
        assert len(lists) >= 2


@pytest.mark.parametrize("target, spec, error", [
    ("svc/nope", "80", 'Error from server (NotFound): services "nope" not found'),
    ("svc/nosel", "80", "error: cannot attach to *v1.Service: invalid service 'nosel': "
                        "Service is defined without a selector"),
    ("svc/web", "83", "error: Service web does not have a service port 83"),
    ("svc/web", "nope", "error: Service 'web' does not have a named port 'nope'"),
    ("svc/web", "82", "error: Pod 'web' does not have a named port 'nope'"),
    ("svc/web", "53", "error: UDP protocol is not supported for 53"),
    ("svc/web", "dns", "error: UDP protocol is not supported for dns"),
    ("svc/later", "7", "error: timed out waiting for the condition"),
    ("deploy/nope", "80", 'Error from server (NotFound): deployments.apps "nope" not found'),
    ("rc/nope", "80", 'Error from server (NotFound): replicationcontrollers "nope" not found'),
    ("job/nope", "80", 'Error from server (NotFound): jobs.batch "nope" not found'),
    ("rs/bad", "80", "error: cannot attach to *v1.ReplicaSet: invalid label selector: values: "
                     "Invalid value: []string(nil): for 'in', 'notin' operators, values set "
                     "can't be empty"),
    ("sts/none", "80", "error: timed out waiting for the condition"),
    ("deploy/web", "nope", "error: Pod 'web' does not have a named port 'nope'"),
    # a spec crishim refuses, where kubectl reads it: after the GET (NotFound first), in
    # the name translation, or after the Running check in parsePorts' words
    ("svc/nope", "99999", 'Error from server (NotFound): services "nope" not found'),
    ("pod/nope", "0", 'Error from server (NotFound): pods "nope" not found'),
    ("pod/web", "99999", "error: error parsing local port '99999': strconv.ParseUint: "
                         'parsing "99999": value out of range'),
    ("pod/web", "x:80", "error: error parsing local port 'x': strconv.ParseUint: parsing "
                        '"x": invalid syntax'),
    ("deploy/web", "0", "error: remote port must be > 0"),
    ("pod/web", "0:0", "error: remote port must be > 0"),
    ("pod/web", "8080:", "error: Pod 'web' does not have a named port ''"),
    ("pod/web-new", "0", "error: unable to forward port because pod is not running. "
                         "Current status=Pending"),
    ("svc/web", "99999", "error: Service web does not have a service port 99999"),
    ("svc/web", "0", "error: Service web does not have a service port 0"),
    ("svc/web", "70000:80", "error: error parsing local port '70000': strconv.ParseUint: "
                            'parsing "70000": value out of range'),
    ("svc/web", "70000:nope", "error: Service 'web' does not have a named port 'nope'"),
    # kubectl translates every spec's name before it parses any number
    ("pod/web", "99999:9000 nope", "error: Pod 'web' does not have a named port 'nope'"),
])
def test_what_kubectl_refuses_is_refused_with_its_words(
        crishim: CrishimProcess, kubeconfig_dir: str, target: str, spec: str,
        error: str) -> None:
    """Byte for byte what kubectl 1.27 to 1.33 print, before anything listens or is
    upgraded (svc/later: no pod matches within --pod-running-timeout)."""
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        specs = spec.split()  # one spec, or several
        with CrishimClusterForward("--kubeconfig", config, "--pod-running-timeout", "1s",
                                   target, *specs) as ours:
            assert ours.wait() == 1
        assert ours.stdout == []
        assert ours.stderr == [error]
        for path in filter(lambda p: os.access(p, os.X_OK), KUBECTLS):
            with run_kubectl_port_forward(path, "", target, specs, ["--pod-running-timeout",
                                                                     "1s"],
                                          wait_ready=False, kubeconfig=config) as kubectl:
                assert kubectl.wait(30) == 1
                assert kubectl.output().splitlines() == ours.stderr, path
        assert not api.upgrades and not api.port_forward_calls


@pytest.mark.parametrize("target, error", [
    ("pod/nope", 'Error from server (NotFound): pods "nope" not found'),
    ("pod/web", "error: nope is not a valid IP"),
])
def test_a_bad_address_is_reported_where_kubectl_reads_it(
        crishim: CrishimProcess, kubeconfig_dir: str, target: str, error: str) -> None:
    """--address is read after the GET (a missing pod is NotFound first), as kubectl
    reads it; crishim refused it before any request."""
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "--address", "nope", target,
                                   "80") as ours:
            assert ours.wait() == 1
        assert ours.stderr == [error]
        for path in filter(lambda p: os.access(p, os.X_OK), KUBECTLS):
            with run_kubectl_port_forward(path, "", target, ["80"], ["--address", "nope"],
                                          wait_ready=False, kubeconfig=config) as kubectl:
                assert kubectl.wait(30) == 1
                assert kubectl.output().splitlines() == ours.stderr, path
        assert not api.upgrades


@pytest.mark.parametrize("target", ["deploy/web", "deployment.apps/web", "rc/web",
                                    "job/web", "jobs.batch/web"])
def test_a_workload_forwards_to_its_most_active_pod_as_kubectl(
        crishim: CrishimProcess, kubeconfig_dir: str, target: str) -> None:
    """deploy/web selects web (Running) and web-new (Pending) by matchLabels and
    matchExpressions: the same lines as kubectl 1.33, bytes through a number and a
    container port's name, and both upgrade to web."""
    kubectl_path = _need_kubectl(KUBECTL_133)
    web, echo = free_port(), free_port()
    specs = [f"{web}:{HTTP_PORT}", f"{echo}:echo"]
    expected = [f"Forwarding from 127.0.0.1:{web} -> {HTTP_PORT}",
                f"Forwarding from 127.0.0.1:{echo} -> {ECHO_PORT}"]
    with service_standin(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        kubectl_lines = _kubectl_forwards(kubectl_path, config, target, specs, expected, web)
        with CrishimClusterForward("--kubeconfig", config, target, *specs) as ours:
            ours.wait_ready([HTTP_PORT, ECHO_PORT])
            assert http_get(web).endswith(HTTP_BODY)
            assert echo_roundtrip(echo, b"workload" * 9_000) == b"workload" * 9_000
        assert ours.stdout[:2] == expected == kubectl_lines[:2]
        assert {u.pod for u in api.upgrades} == {"web"}
        selectors = {r.query["labelSelector"][0] for r in api.requests
                     if r.path == "/api/v1/namespaces/default/pods"}
        assert selectors == ({"app=web"} if target.startswith(("rc/", "job")) else
                             {"app=web,!canary,tier in (back,front)"})


def test_a_services_pods_are_listed_a_page_at_a_time(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """The API server pages the list (2 pods a page here): the Running pod on the last
    page is the one chosen, as kubectl, which lists all at once, chooses it; only one
    page is held at a time (a 64 MiB answer of empty items took 1.7 GB)."""
    kubectl_path = _need_kubectl(KUBECTL_133)
    with service_standin(crishim, page_size=2) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with run_kubectl_port_forward(kubectl_path, "", "svc/many", [":7"],
                                      ["--address", "127.0.0.1"], wait_ready=False,
                                      kubeconfig=config) as kubectl:
            match = kubectl.wait_for_output(r"Forwarding from 127\.0\.0\.1:(\d+) -> ")
            assert match, kubectl.output()
            assert echo_roundtrip(int(match.group(1)), b"kubectl") == b"kubectl"
        with CrishimClusterForward("--kubeconfig", config, "svc/many", ":7") as ours:
            ours.wait_ready([ECHO_PORT])
            assert echo_roundtrip(ours.local[ECHO_PORT], b"paged") == b"paged"
        assert {u.pod for u in api.upgrades} == {"many-4"}
        pages = [r.query.get("continue", [""])[0] for r in api.requests
                 if r.query.get("labelSelector") == ["app=many"] and "limit" in r.query]
        assert pages == ["", "2", "4"]


def test_a_page_of_large_pods_is_asked_for_again_smaller(
        crishim: CrishimProcess, kubeconfig_dir: str) -> None:
    """450 pods of ~20 KB (managedFields and sidecars make pods that large): the first
    page of 500 is past the 8 MiB an answer may be, so it is asked for again with fewer
    pods a page, and the one Running pod, listed last, is chosen."""
    pods = {f"big-{i:03}": "sb-not-there" for i in range(449)} | {"big-449": SANDBOX}
    with standin_for(crishim, pods, labels={name: {"app": "big"} for name in pods},
                     phases={name: "Pending" for name in pods if name != "big-449"},
                     services={"big": {"selector": {"app": "big"},
                                       "ports": [{"port": 7, "targetPort": ECHO_PORT}]}},
                     pod_padding=20_000) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "svc/big", ":7") as ours:
            ours.wait_ready([ECHO_PORT], timeout=60)
            assert echo_roundtrip(ours.local[ECHO_PORT], b"large") == b"large"
        limits = [r.query["limit"][0] for r in api.requests if "limit" in r.query]
        assert limits[0] == "500" and set(limits[1:]) == {"62"}, limits
        assert len(limits) == 1 + 8  # 450 pods, 62 a page
        assert {u.pod for u in api.upgrades} == {"big-449"}
