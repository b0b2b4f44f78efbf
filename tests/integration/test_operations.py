"""Operations: Prometheus metrics, JSON log lines, the gRPC health service, SIGTERM drain."""

import json
import re
import signal
import socket
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crishim import __version__
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import CLOSED_PORT, ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        found = dict(item.split("=", 1) for item in label_text.rstrip("}").split(",") if item)
        if metric == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    raise AssertionError(f"{name}{labels} not in metrics:\n{text}")


def test_prometheus_metrics_count_sessions_bytes_failures_tokens(podnet):
    port = _free_port()
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--metrics-address", f"127.0.0.1:{port}") as proc:
        with SpdyPortForwardClient(proc.port_forward_url("sb")) as client:
            fwd = client.roundtrip(ECHO_PORT, b"x" * 10_000)
            assert fwd.received == b"x" * 10_000
            refused = client.forward(CLOSED_PORT)
            client.wait(refused.finished, timeout=10)
        proc.port_forward_url("sb")  # issued, never redeemed
        time.sleep(0.3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) \
            .read().decode()
    assert _metric(text, "crishim_sessions_total", transport="spdy") == 1
    assert _metric(text, "crishim_forwarded_connections_total", transport="spdy") == 2
    assert _metric(text, "crishim_forwarded_bytes_total", transport="spdy",
                   direction="to_pod") == 10_000
    assert _metric(text, "crishim_forwarded_bytes_total", transport="spdy",
                   direction="from_pod") == 10_000
    assert _metric(text, "crishim_forward_failures_total", reason="dial_refused") == 1
    assert _metric(text, "crishim_tokens_total", event="issued") == 2
    assert _metric(text, "crishim_tokens_total", event="redeemed") == 1
    assert _metric(text, "crishim_netns_dial_seconds_count") == 1  # the refused one failed
    assert _metric(text, "crishim_sessions_active", transport="spdy") == 0
    assert _metric(text, "crishim_build_info", version=__version__) == 1


def test_metrics_are_off_by_default(crishim):
    assert "metrics on" not in crishim.log()


def test_json_log_line_per_forwarded_connection(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--log-format", "json") as proc:
        with SpdyPortForwardClient(proc.port_forward_url("sb")) as client:
            client.roundtrip(ECHO_PORT, b"hello")
            refused = client.forward(CLOSED_PORT)
            client.wait(refused.finished, timeout=10)
        time.sleep(0.3)
        log = proc.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert entries, log
    ends = [e for e in entries if e.get("msg", "").startswith("forward sandbox=")]
    assert len(ends) == 2, ends
    ok = next(e for e in ends if e["port"] == ECHO_PORT)
    assert (ok["sandbox"], ok["bytes_up"], ok["bytes_down"]) == ("sb", 5, 5)
    bad = next(e for e in ends if e["port"] == CLOSED_PORT)
    assert "refused" in bad["reason"].lower() and bad["level"] == "info"


def test_grpc_health_service_on_the_cri_socket(crishim):
    stub = health_pb2_grpc.HealthStub(crishim.channel)
    for service in ("", "runtime.v1.RuntimeService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        raise AssertionError("unknown service must be NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_a_health_watch_does_not_hold_the_stop(podnet):
    """A Watch is told NOT_SERVING, then ended: the CRI calls in progress get what is
    left of drain_timeout (60 s here), and a Watch, which never ends by itself, held the
    stop to that deadline (and, in grpc_health's task, never got its NOT_SERVING; then got it
    twice)."""
    proc = CrishimProcess("--sandboxes", f"sb={podnet.path}", "--drain-timeout", "60s")
    with proc:
        watch = health_pb2_grpc.HealthStub(proc.channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        proc.proc.send_signal(signal.SIGTERM)
        statuses = [reply.status for reply in watch]  # it ends, with grpc's OK
        # once: the stop's own NOT_SERVING (grpc_health's) was followed by crishim's
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert watch.code() == grpc.StatusCode.OK
        assert proc.proc.wait(30) == 0  # not the 60 s deadline


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_live_sessions_then_exits(podnet, sig):
    """SIGHUP too (the terminal closed): it killed crishim, leaving its socket file."""
    proc = CrishimProcess("--sandboxes", f"sb={podnet.path}", "--drain-timeout", "3s").start()
    try:
        spare_url = proc.port_forward_url("sb")
        with SpdyPortForwardClient(proc.port_forward_url("sb")) as client:
            assert client.roundtrip(ECHO_PORT, b"before").received == b"before"
            live = client.forward(ECHO_PORT)
            t0 = time.monotonic()
            proc.proc.send_signal(sig)
            time.sleep(0.5)
            # new upgrades are refused while draining
            host, port = spare_url.split("//")[1].split("/")[0].split(":")
            try:
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(b"POST /" + spare_url.split("/", 3)[3].encode() +
                              b" HTTP/1.1\r\nHost: x\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade"
                              b"\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
                    answer = s.recv(100)
                    assert not answer.startswith(b"HTTP/1.1 101"), answer
            except ConnectionRefusedError:
                pass  # the listener is already closed: refused as well
            # the live forwarded connection still works inside the drain window
            live.send(b"during drain")
            assert client.wait(lambda: live.received == b"during drain", timeout=2), \
                live.received
            assert proc.proc.wait(15) == 0
            elapsed = time.monotonic() - t0
            assert 2.5 <= elapsed <= 12, elapsed
            assert client.wait(live.finished, timeout=5)
            assert f"{sig.name} received" in proc.log()
            assert "signal received: draining" in proc.log()
    finally:
        proc.stop()


def test_idle_spdy_session_gets_goaway_and_is_closed_busy_one_is_not(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--stream-idle-timeout", "600ms") as proc:
        with SpdyPortForwardClient(proc.port_forward_url("sb")) as idle, \
                SpdyPortForwardClient(proc.port_forward_url("sb")) as busy:
            assert idle.roundtrip(ECHO_PORT, b"once").received == b"once"
            live = busy.forward(ECHO_PORT)
            t0 = time.monotonic()
            sent = b""
            while time.monotonic() - t0 < 1.5:  # traffic every 150 ms keeps it alive
                live.send(b"tick")
                sent += b"tick"
                busy.wait(lambda want=sent: live.received == want, timeout=2)
                time.sleep(0.15)
            assert live.received == sent and not busy.closed and not busy.goaway
            assert idle.wait(lambda: idle.closed, timeout=5)
            assert idle.goaway
        assert "idle for" in proc.log()


def _serve_fails(*args: str, cwd: str = "/", env: dict[str, str] | None = None) -> str:
    """crishim serve with args: it must refuse to start with one line on stderr, rc 1."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "crishim", "serve", "--log-level", "warning",
                        *args], capture_output=True, text=True, timeout=30, cwd=cwd, env=env)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "grpc" not in r.stderr.lower(), r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crishim: "), r.stderr
    return lines[0]


def test_what_serve_cannot_use_is_one_line_before_it_listens(tmp_path):
    """A socket path bind() cannot take (gRPC printed its C-core errors and a traceback),
    a metrics port in use (a bare 'Address already in use'), and a reserve that leaves no
    descriptors (it started and refused every session)."""
    long_dir = tmp_path / ("d" * 100)
    line = _serve_fails("--socket", str(long_dir / "crishim.sock"))
    assert "a unix socket path of" in line and "at most 107 fit" in line
    assert not long_dir.exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        line = _serve_fails("--socket", str(tmp_path / "m.sock"), "--metrics-address", address)
    assert line == f"crishim: metrics_address {address}: cannot listen: Address already in use"
    with socket.socket() as busy:  # it printed asyncio's own words, no setting named
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _serve_fails("--socket", str(tmp_path / "s.sock"), "--stream-address",
                            f"127.0.0.1:{port}")
    assert line == (f"crishim: stream_server_address 127.0.0.1:{port}: cannot listen: "
                    "Address already in use")
    for bad in ("::1:8080", "127.0.0.1:65536", "127.0.0.1:x", "8080",
                "1.2.3.4:" + "9" * 5000):  # past int()'s 4,300 digits: a ValueError
        # an unbracketed IPv6 host was taken as far as its last colon; 65536 failed late
        line = _serve_fails("--socket", str(tmp_path / "a.sock"), "--stream-address", bad)
        assert line == (f"crishim: --stream-address: {bad!r} is not HOST:PORT (port "
                        "0..65535; an IPv6 host in brackets)")
    # which one won was silent (--stream-address, whatever the order)
    line = _serve_fails("--socket", str(tmp_path / "b.sock"), "--stream-server-port", "18400",
                        "--stream-address", "127.0.0.1:0")
    assert line == ("crishim: --stream-address and --stream-server-port: give one of them")
    line = _serve_fails("--socket", str(tmp_path / "r.sock"), "--reserved-fds", "100000000")
    assert line.startswith("crishim: reserved_fds: 100000000 reserved of RLIMIT_NOFILE ")
    assert "leaves 0 descriptors" in line
    assert not (tmp_path / "r.sock").exists()


def test_a_plugin_that_does_not_import_is_one_line(tmp_path):
    """An installed entry point whose module is missing or raises on import (a half-removed
    plugin package) stopped serve with an import traceback; now one line names the plugin,
    the object its entry point names and why, and nothing listens."""
    import os

    dist = tmp_path / "crishim_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crishim-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[crishim.runtimes]\nbroken = crishim_no_such_module:make\n"
        "raising = crishim_raising_plugin:make\n")
    (tmp_path / "crishim_raising_plugin.py").write_text("raise ValueError('bad build')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    line = _serve_fails("--socket", str(tmp_path / "b.sock"), "--runtime", "broken", env=env)
    assert line == ("crishim: runtime plugin 'broken' (crishim_no_such_module:make) could not "
                    "be loaded: ModuleNotFoundError: No module named 'crishim_no_such_module'")
    line = _serve_fails("--socket", str(tmp_path / "r.sock"), "--runtime", "raising", env=env)
    assert line == ("crishim: runtime plugin 'raising' (crishim_raising_plugin:make) could not "
                    "be loaded: ValueError: bad build")
    assert not (tmp_path / "b.sock").exists() and not (tmp_path / "r.sock").exists()


@pytest.mark.parametrize("args, expected", [
    # a config file that is not UTF-8: UnicodeDecodeError traceback
    (["--config", "{tmp}/latin1.toml"], "crishim: config file {tmp}/latin1.toml: not UTF-8 "
                                        "(byte 12)"),
    # a non-ASCII host: the TLS certificate raised ValueError
    (["--stream-url-host", "pöd.example", "--enable-tls-streaming"],
     "crishim: stream_url_host: 'pöd.example' is not an IP address or a DNS name"),
    (["--stream-url-host", "a b"], "crishim: stream_url_host: 'a b' is not an IP address"),
    # past HTTP/2's largest window: every HTTP/2 connection failed with a traceback
    (["--session-buffer-size", str(2**34)], "crishim: session_buffer_size: at most "
                                            "2147483647 (HTTP/2's largest window)"),
    # a directory that takes no socket: gRPC's C-core errors, then a RuntimeError
    (["--socket", "/proc/crishim-test.sock"], "crishim: /proc/crishim-test.sock: cannot "
                                              "listen there (No such file or directory)"),
    (["--socket", "/etc/hostname/crishim.sock"], "crishim: /etc/hostname/crishim.sock: "
                                                 "cannot listen there (Not a directory)"),
    # a value that does not parse: exit 2 before, unlike every other start-up failure
    (["--max-tokens", "abc"], "crishim: max_tokens: 'abc' is not a valid int"),
    # relative netns paths: read in the working directory, every dial failed after start
    (["--sandboxes", "sb=var/run/netns/x"], "crishim: sandboxes: 'sb': 'var/run/netns/x' "
                                             "is not an absolute path (or 'host')"),
    (["--netns-dir", "run/netns"], "crishim: netns_dir: 'run/netns' is not an absolute path"),
    # bound at /rel.sock by gRPC, then a traceback from the chmod, and the socket left
    (["--socket", "rel.sock"], "crishim: socket: 'rel.sock' is not an absolute path"),
    # it listened on every address, on two ports, and announced one
    (["--stream-server-address", ""], "crishim: stream_server_address: empty: give the "
                                      "address to listen on"),
    # getaddrinfo's errno went through os.strerror: "Unknown error -2" (its reason here
    # depends on the resolver: "Name or service not known", or a temporary failure)
    (["--stream-server-address", "bogus.invalid"], "crishim: stream_server_address "
                                                   "bogus.invalid:0: cannot listen: "),
    (["--upstream-endpoint", "run/containerd/containerd.sock"],
     "crishim: upstream_endpoint: 'run/containerd/containerd.sock' is not an absolute path"),
])
def test_settings_serve_cannot_use_are_one_line_and_exit_1(tmp_path, args, expected):
    (tmp_path / "latin1.toml").write_bytes(b'socket = "/x\xe9.sock"\n')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--socket" not in args:
        args += ["--socket", str(tmp_path / "c.sock")]
    line = _serve_fails(*args)
    assert line.startswith(expected.replace("{tmp}", str(tmp_path))), line
    assert "Unknown error" not in line
    assert not (tmp_path / "c.sock").exists()


@pytest.mark.parametrize("args, expected", [
    (["--group", "99999999999"], "--group: 99999999999 is not a group id (0..4294967294)"),
    (["--group", "no-such-group-here"], "--group: no group named 'no-such-group-here'"),
])
def test_helper_settings_it_cannot_use_are_one_line_and_leave_no_socket(tmp_path, args,
                                                                        expected):
    """A gid past 32 bits raised OverflowError after the socket was bound, and left it."""
    import subprocess
    import sys

    sock = tmp_path / "h.sock"
    r = subprocess.run([sys.executable, "-m", "crishim", "helper", "--socket", str(sock),
                        *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"crishim helper: {expected}"
    assert not sock.exists()


def test_urls_never_redeemed_expire_without_another_cri_call(podnet):
    """Expired tokens were dropped and counted only at the next PortForward or redeem:
    a minute after the TTL, 1,000 unredeemed URLs were still held and counted outstanding,
    and `expired` stood still."""
    port = _free_port()
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--token-ttl", "1s",
                        "--metrics-address", f"127.0.0.1:{port}") as proc:
        for _ in range(3):
            proc.port_forward_url("sb")  # issued, never redeemed
        deadline = time.monotonic() + 15
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) \
                .read().decode()
            if _metric(text, "crishim_tokens_total", event="expired") == 3 \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert _metric(text, "crishim_tokens_total", event="expired") == 3
    assert _metric(text, "crishim_tokens_outstanding") == 0


@pytest.mark.parametrize("host, in_url", [
    ("fe80::1%lo", "[fe80::1%25lo]"),  # RFC 6874: Go's url.Parse (the kubelet's) refuses %l
    ("[fe80::2%eth0]", "[fe80::2%25eth0]"),
    ("fd00::1", "[fd00::1]"),
    ("node-1.example", "node-1.example"),
])
def test_the_stream_url_host_is_written_as_a_url_needs_it(podnet, host, in_url):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--stream-url-host",
                        host) as proc:
        url = proc.port_forward_url("sb")
    assert re.fullmatch(rf"http://{re.escape(in_url)}:\d+/portforward/[A-Za-z0-9_-]+", url), \
        url
