"""`crishim check` against a real `crishim serve`, for every transport."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from crishim.cri import api_pb2
from tests.integration.test_client_portforward import (
    HangingUp,
    SilentListener,
    StalledAfterUpgrade,
    UrlRuntime,
    bad_ca_bundles,
)
from tests.support import SANDBOX
from tests.support.podnet import HTTP_PORT, PodNetwork

TRANSPORTS = ["spdy", "websocket", "spdy-over-websocket", "h2"]
DATA_CHECKS = ["echo-sha256", "upload-sha256", "download-sha256", "half-close", "closed-port",
               "pod-reset", "concurrent", "setup-latency"]


def run_check(crishim, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
         "--runtime-endpoint", f"unix://{crishim.socket}", *args],
        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_check_with_own_servers_in_the_sandbox_passes(crishim, podnet, transport):
    r = run_check(crishim, "--transport", transport, "--netns", podnet.path, "--json",
                  "--size", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["servers"] is True and report["netns"] == podnet.path
    checks = {c["name"]: c for c in report["checks"]}
    others = [t for t in TRANSPORTS if t != transport]
    assert set(checks) == {"cri-url", "token-single-use", *(f"handshake:{t}" for t in
                                                             TRANSPORTS), *DATA_CHECKS,
                           *(f"token-single-use:{t}" for t in others), "udp-echo"}
    # crishim speaks every transport
    for t in TRANSPORTS:
        assert checks[f"handshake:{t}"]["result"] == "pass", checks[f"handshake:{t}"]
        assert checks[f"handshake:{t}"]["required"] is (t == transport)
        # the session transports answer a session-level ping, timed
        has_ping = re.search(r", ping \d+\.\d\d ms$", checks[f"handshake:{t}"]["detail"])
        assert bool(has_ping) is (t != "websocket"), checks[f"handshake:{t}"]["detail"]
    # a used token refused on each transport: on the upgrade, or HTTP/2's first stream
    assert checks["token-single-use"]["detail"] == f"{transport}: second use refused with 404"
    for t in others:
        assert checks[f"token-single-use:{t}"] == {
            "name": f"token-single-use:{t}", "result": "pass", "required": True,
            "detail": f"{t}: second use refused with 404",
            "seconds": checks[f"token-single-use:{t}"]["seconds"]}
    assert "22 chars" in checks["cri-url"]["detail"]
    skipped = set(report["skipped"])
    # the upload goes to a sized sink: no half-close needed, so on every transport (it
    # was skipped on WebSocket channels as needing one, and never verified there)
    assert "sha256 matches" in checks["upload-sha256"]["detail"]
    if transport == "websocket":
        assert skipped == {"half-close", "udp-echo"}
        assert "cannot carry UDP" in checks["udp-echo"]["detail"]
    else:
        assert skipped == set()
        assert checks["udp-echo"]["result"] == "pass", checks["udp-echo"]
        assert "65507" in checks["udp-echo"]["detail"]
        assert checks["half-close"]["result"] == "pass"
    for name in DATA_CHECKS:
        if name not in skipped:
            assert checks[name]["result"] == "pass", checks[name]
    assert "sha256 matches" in checks["download-sha256"]["detail"]
    # crishim's quiet error policy: a failed connection never ends the session
    for name in ("closed-port", "pod-reset"):
        if transport != "websocket":
            assert "the session survived" in checks[name]["detail"]
    assert "16/16" in checks["concurrent"]["detail"]


def test_check_without_netns_skips_and_says_why(crishim):
    """crishim without an upstream has no PodSandboxStatus: the netns is unknown."""
    r = run_check(crishim, "--port", str(HTTP_PORT), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["servers"] is False
    assert "UNIMPLEMENTED" in report["servers_reason"]
    assert "--netns" in report["servers_reason"]
    assert set(report["skipped"]) == {*DATA_CHECKS, "udp-echo"}
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["connect"]["result"] == "pass"


def test_check_table_output(crishim, podnet):
    r = run_check(crishim, "--netns", podnet.path, "--size", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "TIME", "DETAIL"]
    assert any(line.startswith("echo-sha256") and " PASS " in line for line in lines)
    assert lines[-1] == "all required checks passed"


def test_check_unreachable_endpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                        "--runtime-endpoint", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "cannot reach the runtime" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_unknown_sandbox_fails(crishim):
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", "nope",
                        "--runtime-endpoint", crishim.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "sandbox 'nope' not found" in r.stderr


def _session_checks_against(server, tmp_path, *args: str) -> tuple[list[dict], str]:
    """`crishim check --json` with a runtime whose URLs lead to `server` (closed after):
    the checks that open a session, each asserted failed (a warning for a transport not
    chosen), and stderr."""
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{server.port}/portforward/x")
    try:
        r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                            "--runtime-endpoint", str(tmp_path / "cri.sock"), "--port", "80",
                            "--no-servers", "--json", *args],
                           capture_output=True, text=True, timeout=120)
    finally:
        runtime.server.stop(0)
        server.close()
    assert r.returncode == 1, r.stdout + r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    names = ("token-single-use", "connect", *(f"handshake:{t}" for t in TRANSPORTS))
    for name in names:
        # the transports not chosen (spdy is) are optional: a server that fails them is
        # one that does not speak them, a warning
        optional = name.startswith("handshake:") and name != "handshake:spdy"
        assert checks[name]["result"] == ("warn" if optional else "fail"), checks[name]
    for t in TRANSPORTS[1:]:  # single use is not tried where the handshake failed
        assert checks[f"token-single-use:{t}"] == {
            "name": f"token-single-use:{t}", "result": "skip", "required": False,
            "seconds": 0.0,
            "detail": f"the runtime does not speak {t} (see handshake:{t})"}
    return [checks[name] for name in names], r.stderr


def test_check_against_a_stream_server_that_hangs_up_at_once_fails_each_check(tmp_path):
    """Every session check fails with the reason in its detail, no traceback (uvloop's
    transport, closed before the connect returned, raised RuntimeError)."""
    checks, stderr = _session_checks_against(HangingUp(), tmp_path)
    assert stderr == ""
    for check in checks:
        assert "closed the connection" in check["detail"], check


def test_ctrl_c_during_checks_cri_call_ends_it_with_130(tmp_path):
    """Ctrl-C while the runtime does not answer the CRI call (with --timeout 60): the
    call's thread is not waited out."""
    silent = SilentListener(str(tmp_path / "cri.sock"))
    proc = subprocess.Popen([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                             "--runtime-endpoint", str(tmp_path / "cri.sock"), "--port", "80",
                             "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert silent.accepted.wait(20), "check never connected"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # not the 60 s --timeout
        assert proc.returncode == 130, out + err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()


def test_check_timeout_bounds_every_upgrade_wait(tmp_path):
    """--timeout governs token-single-use's upgrades as the handshakes' (it used 10 s)."""
    checks, _ = _session_checks_against(SilentListener(), tmp_path, "--timeout", "0.5")
    for check in checks:
        assert check["detail"].endswith(" in 0.5s"), check


def test_check_timeout_bounds_each_read_of_the_data_checks(tmp_path, podnet):
    """A stream server that goes silent after its 101: each data check waited a fixed 20 s
    whatever --timeout said (a run took minutes); each read now waits --timeout."""
    server = StalledAfterUpgrade()
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         f"http://127.0.0.1:{server.port}/portforward/x")
    try:
        r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                            "--runtime-endpoint", str(tmp_path / "cri.sock"), "--netns",
                            podnet.path, "--timeout", "0.5", "--json"],
                           capture_output=True, text=True, timeout=200)
    finally:
        runtime.server.stop(0)
        server.close()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    for name in ("echo-sha256", "upload-sha256", "download-sha256", "half-close",
                 "concurrent", "setup-latency"):
        assert checks[name]["result"] == "fail", checks[name]
        assert "a read waits up to 0.5 s, a whole check 128 s" in checks[name]["detail"], \
            checks[name]
    for name in ("closed-port", "pod-reset"):
        assert checks[name]["detail"].startswith("no EOF and no error within 0.5 s"), \
            checks[name]


@pytest.mark.parametrize("case", ["missing", "directory", "garbage"])
def test_check_with_an_unusable_certificate_authority_fails_early_with_one_line(tmp_path,
                                                                              case):
    path, why = bad_ca_bundles(tmp_path)[case]
    runtime = UrlRuntime(str(tmp_path / "cri.sock"), "https://127.0.0.1:1/portforward/x")
    try:
        r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                            "--runtime-endpoint", str(tmp_path / "cri.sock"), "--port", "80",
                            "--certificate-authority", path],
                           capture_output=True, text=True, timeout=120)
    finally:
        runtime.server.stop(0)
    assert r.returncode == 1
    assert r.stdout == ""
    assert re.fullmatch(f"error: --certificate-authority {re.escape(path)}: {why}\n",
                        r.stderr), r.stderr


@pytest.mark.parametrize("output", ["--json", "table"])
def test_check_never_shows_the_stream_urls_credentials(tmp_path, output):
    runtime = UrlRuntime(str(tmp_path / "cri.sock"),
                         "http://alice:secret@127.0.0.1:1/portforward/abcdefghijklmnopqrstuv")
    try:
        r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                            "--runtime-endpoint", str(tmp_path / "cri.sock"), "--port", "80",
                            "--no-servers", *([output] if output == "--json" else [])],
                           capture_output=True, text=True, timeout=120)
    finally:
        runtime.server.stop(0)
    assert "secret" not in r.stdout + r.stderr
    assert "alice" not in r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if "cri-url" in line)
    detail = json.loads(r.stdout)["checks"][0]["detail"] if output == "--json" else line
    assert "http://***@127.0.0.1:1/portforward/…, token 22 chars" in detail, detail


@pytest.mark.parametrize("option, message", [
    (["--port", "70000"], "argument --port: invalid port '70000': expected 1 to 65535"),
    (["--port", "٨٠"], "argument --port: invalid port '٨٠': expected 1 to 65535 in "
                        "ASCII digits"),
    (["--size", "-1"], "argument --size: '-1' is not a whole number of MiB from 1 to 1048576"),
    (["--size", "0"], "argument --size: '0' is not a whole number of MiB from 1 to 1048576"),
    # past what the sink and source take (1 TiB), which closed on it mid-check
    (["--size", "1048577"], "argument --size: '1048577' is not a whole number of MiB from 1 "
                            "to 1048576"),
])
def test_check_refuses_a_bad_port_or_size_as_a_usage_error(tmp_path, option, message):
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                        "--runtime-endpoint", str(tmp_path / "none.sock"), *option],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == f"crishim check: error: {message}", r.stderr
    assert r.stdout == ""



def test_check_moves_a_large_size_without_holding_it_in_memory(crishim, podnet):
    """--size 256: the upload and download checks send and hash 256 MiB a chunk at a time.
    They built it whole (os.urandom(256 MiB), and the source's 256 MiB again for its
    digest), so --size 1000 took 2.1 GB."""
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "print(r.returncode); print(r.stdout)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "crishim", "check",
                        "--sandbox", SANDBOX, "--runtime-endpoint", f"unix://{crishim.socket}",
                        "--netns", podnet.path, "--size", "256", "--json"],
                       capture_output=True, text=True, timeout=300)
    peak_kib, status, out = r.stdout.split("\n", 2)
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert status == "0", out
    assert checks["upload-sha256"]["detail"].startswith("256 MiB up, sha256 matches"), checks
    assert checks["download-sha256"]["detail"].startswith("256 MiB down, sha256 matches")
    assert int(peak_kib) < 160 * 1024, f"peak RSS {int(peak_kib) >> 10} MiB"


def test_check_with_its_stdout_closed_ends_quietly_with_its_status(crishim):
    """`crishim check --json | head`: the reader gone before the report, a BrokenPipeError
    traceback; now the report goes nowhere and the exit status is the checks'."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
         "--runtime-endpoint", f"unix://{crishim.socket}", "--port", str(HTTP_PORT),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert proc.returncode == 0, stderr


def test_check_without_a_cooperating_server_does_not_claim_the_data_path_passed(crishim):
    """No netns known: every data check is skipped, and the last line said 'all required
    checks passed', exit 0. The status stays 0; the line says how many were skipped and
    why, in the table and in the JSON."""
    r = run_check(crishim)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.splitlines()[-1]
    assert last != "all required checks passed"
    required = set(DATA_CHECKS) - {"setup-latency"}  # optional, skipped or run
    assert f"{len(required)} of " in last and "were skipped" in last, last
    assert "the data path was not checked" in last and "--netns" in last, last
    r = run_check(crishim, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["summary"] == last
    assert set(report["required_skipped"]) == required
    assert {c["name"]: c["required"] for c in report["checks"]}["setup-latency"] is False


def test_check_with_every_check_run_says_all_required_checks_passed(crishim, podnet):
    r = run_check(crishim, "--netns", podnet.path, "--size", "1", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["summary"] == "all required checks passed"
    assert report["required_skipped"] == []
    assert report["hint"] == ""


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_check_with_the_wrong_netns_hints_at_it(crishim, transport):
    """--netns naming a namespace that is not the sandbox's: every data check failed as
    "RST_STREAM CANCEL" (or connection refused), with nothing pointing at --netns."""
    with PodNetwork(f"crishim-test-{os.getpid()}-other") as other:
        r = run_check(crishim, "--netns", other.path, "--size", "1", "--transport", transport)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^echo-sha256 +FAIL ", r.stdout, re.M), r.stdout
    assert (f"\nhint: no data check's connection reached the check's servers, which run in "
            f"{other.path} (from --netns): if that is not the sandbox's network namespace, "
            "name the right one with --netns PATH\n") in r.stdout, r.stdout


class WebSocketTokenReuse:
    """A stream server that honours single use on every transport but the WebSocket
    channel protocol: a proxy in front of crishim's, with a CRI runtime whose URLs lead to
    it. A channel WebSocket upgrade whose token was seen before has it swapped for a fresh
    one of crishim's, so a used token is taken again there, and only there."""

    def __init__(self, crishim, cri_path: str) -> None:
        self.crishim = crishim
        # crishim's stream server (a URL minted for its address: the token goes unused)
        self.upstream = ("127.0.0.1", int(re.search(
            r":(\d+)/", crishim.port_forward_url(SANDBOX)).group(1)))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.seen: set[str] = set()
        self.reused = 0
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []  # the accept loop and each connection's
        self.cri = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.cri.add_generic_rpc_handlers((self,))
        self.cri.add_insecure_port("unix://" + cri_path)
        self.cri.start()
        self._start(self._accept)

    def service(self, details: grpc.HandlerCallDetails):
        if not details.method.endswith("/PortForward"):
            return None

        def port_forward(request, context):
            url = self.crishim.port_forward_url(request.pod_sandbox_id, list(request.port))
            return api_pb2.PortForwardResponse(
                url=re.sub(r"^http://[^/]+", f"http://127.0.0.1:{self.port}", url))
        return grpc.unary_unary_rpc_method_handler(
            port_forward, request_deserializer=api_pb2.PortForwardRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        m = re.match(rb"GET /portforward/([^/? ]+)", head)
        if m and b"channel.k8s.io" in head:  # the channel protocol, not SPDY over WebSocket
            token = m.group(1).decode()
            if token in self.seen:
                self.reused += 1
                fresh = self.crishim.port_forward_url(SANDBOX, [HTTP_PORT]).rsplit("/", 1)[1]
                head = head.replace(m.group(1), fresh.encode(), 1)
            self.seen.add(token)
        with conn, socket.create_connection(self.upstream, timeout=30) as server:
            server.sendall(head)
            back = threading.Thread(target=self._pipe, args=(server, conn), daemon=True)
            back.start()
            self._pipe(conn, server)
            back.join(30)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        self.stopped.set()
        self.cri.stop(0)
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_check_tests_token_single_use_on_every_transport_the_runtime_speaks(crishim, tmp_path,
                                                                            transport):
    """A stream server that takes a used token on the channel WebSocket alone: check tested
    single use on --transport's upgrade (SPDY for h2) only, and passed it with spdy. Now
    each transport the runtime speaks has its own line, required where it runs."""
    server = WebSocketTokenReuse(crishim, str(tmp_path / "cri.sock"))
    try:
        r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                            "--runtime-endpoint", str(tmp_path / "cri.sock"), "--port",
                            str(HTTP_PORT), "--transport", transport, "--json"],
                           capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    websocket = "token-single-use" if transport == "websocket" else \
        "token-single-use:websocket"
    assert checks[websocket]["result"] == "fail", checks[websocket]
    assert checks[websocket]["required"] is True
    assert checks[websocket]["detail"] == "websocket: the same token was accepted twice"
    for t in TRANSPORTS:
        name = "token-single-use" if t == transport else f"token-single-use:{t}"
        if t != "websocket":
            assert checks[name]["result"] == "pass", checks[name]
            assert checks[name]["detail"] == f"{t}: second use refused with 404", checks[name]
    assert server.reused >= 1


@pytest.mark.parametrize("policy", ["verbose", "quiet"])
def test_check_says_a_helper_that_does_not_answer_is_not_the_netns(tmp_path, podnet, policy):
    """crishim behind the helper-pod backend, its helper taking each request and never
    answering: the error text said "connect to port N: no answer after 2 s", a pod's port
    dropping SYNs (crishim's own dial_timeout ended it before the plugin's), and the hint
    blamed --netns. The error text now names the helper, and the hint says what the check
    can tell: the helper (its text), or a dial with no answer (each failed after seconds,
    where no text is sent)."""
    from tests.integration.test_helper_protocol import FakeHelper
    from tests.support.crishim_proc import CrishimProcess

    path = str(tmp_path / "helper.sock")
    fake = FakeHelper(path, lambda conn: time.sleep(4))
    try:
        with CrishimProcess("--runtime", "helper", "--helper-socket", path, "--sandboxes",
                            f"sb={podnet.path}", "--dial-timeout", "2s", "--error-policy",
                            policy) as proc:
            r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", "sb",
                                "--runtime-endpoint", proc.socket, "--netns", podnet.path,
                                "--timeout", "5", "--size", "1", "--json"],
                               capture_output=True, text=True, timeout=200)
    finally:
        fake.close()
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    echo = next(c for c in report["checks"] if c["name"] == "echo-sha256")
    assert echo["result"] == "fail"
    assert "--netns" not in report["hint"], report["hint"]
    if policy == "verbose":
        assert echo["detail"] == f"ForwardError: helper at {path} did not answer within 1.8s"
        assert report["hint"].startswith(
            "no data check's connection reached the check's servers: the stream server's "
            f"helper did not answer its dials ('helper at {path} did not answer within "
            "1.8s')"), report["hint"]
    else:
        assert echo["detail"] == \
            "ForwardError: the server reset the connection (RST_STREAM CANCEL)"
        assert re.match(r"no data check's connection reached the check's servers: the "
                        r"runtime's dial into the sandbox got no answer \(each failed after "
                        r"[23] s, no reason given\)", report["hint"]), report["hint"]
