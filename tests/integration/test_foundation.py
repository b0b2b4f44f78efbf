"""The spine, driven from outside: a real `crishim serve`, a real gRPC client over its unix
socket, a real stream server, real network namespaces."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from urllib.parse import urlsplit

import grpc
import pytest

from crishim.cri import api_pb2, api_pb2_grpc
from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess


def http(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str, str]:
    """One raw HTTP/1.1 request; returns (status, head, body)."""
    u = urlsplit(url)
    lines = [f"{method} {u.path} HTTP/1.1", f"Host: {u.netloc}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 101:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
    return status, head.decode(), body.decode()


SPDY_UPGRADE = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                "X-Stream-Protocol-Version": "portforward.k8s.io"}


def test_version(crishim):
    r = crishim.runtime.Version(api_pb2.VersionRequest(version="0.1.0"))
    assert r.version == "0.1.0"
    assert r.runtime_name == "crishim"
    assert re.fullmatch(r"\d+\.\d+\.\d+", r.runtime_version)
    assert r.runtime_api_version == "v1"


def test_port_forward_url_is_absolute_and_tokenised(crishim):
    url = crishim.port_forward_url(SANDBOX)
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/portforward/([A-Za-z0-9_-]{22})", url)
    assert m, url
    assert int(m.group(1)) > 0
    assert crishim.port_forward_url(SANDBOX) != url


def test_empty_sandbox_id_is_invalid_argument(crishim):
    with pytest.raises(grpc.RpcError) as e:
        crishim.port_forward_url("")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_port_is_invalid_argument(crishim):
    with pytest.raises(grpc.RpcError) as e:
        crishim.port_forward_url(SANDBOX, [70000])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "70000" in e.value.details()


def test_unknown_sandbox_is_not_found_at_issue_time(crishim):
    with pytest.raises(grpc.RpcError) as e:
        crishim.port_forward_url("no-such-sandbox")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-sandbox" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        crishim.port_forward_url("gone")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_other_cri_methods_unimplemented_without_upstream(crishim):
    with pytest.raises(grpc.RpcError) as e:
        crishim.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "upstream_endpoint" in e.value.details()


def test_token_single_use_on_the_stream_server(crishim):
    url = crishim.port_forward_url(SANDBOX)
    status, head, _ = http(url, "POST", SPDY_UPGRADE)
    assert status == 101, head
    status, _, body = http(url, "POST", SPDY_UPGRADE)
    assert status == 404
    assert "already used" in body


def test_unknown_token_and_path_are_404(crishim):
    base = crishim.port_forward_url(SANDBOX).rsplit("/", 2)[0]
    assert http(base + "/portforward/AAAAAAAAAAAAAAAAAAAAAA", "POST", SPDY_UPGRADE)[0] == 404
    assert http(base + "/exec/abc")[0] == 404


def test_malformed_request_is_400(crishim):
    u = urlsplit(crishim.port_forward_url(SANDBOX))
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"GARBAGE\x00\x01 nonsense\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_missing_and_unsupported_stream_protocol(crishim):
    url = crishim.port_forward_url(SANDBOX)
    status, _, body = http(url, "POST", {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"})
    assert status == 400 and "X-Stream-Protocol-Version" in body
    url = crishim.port_forward_url(SANDBOX)
    status, head, body = http(url, "POST", {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                                            "X-Stream-Protocol-Version": "v9.example"})
    assert status == 403
    assert "X-Accepted-Stream-Protocol-Versions: portforward.k8s.io" in head


def test_expired_token_is_404(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--token-ttl", "200ms") as proc:
        url = proc.port_forward_url("sb")
        time.sleep(0.4)
        status, _, body = http(url, "POST", SPDY_UPGRADE)
        assert status == 404 and "expired" in body


def test_token_bound_is_resource_exhausted(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--max-tokens", "3") as proc:
        for _ in range(3):
            proc.port_forward_url("sb")
        with pytest.raises(grpc.RpcError) as e:
            proc.port_forward_url("sb")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_session_bound_is_429_with_retry_after(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--max-sessions", "1") as proc:
        u1, u2 = proc.port_forward_url("sb"), proc.port_forward_url("sb")
        held = socket.create_connection((urlsplit(u1).hostname, urlsplit(u1).port))
        p = urlsplit(u1).path
        held.sendall(f"POST {p} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: "
                     "SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
                     .encode())
        assert held.recv(100).startswith(b"HTTP/1.1 101")
        status, head, _ = http(u2, "POST", SPDY_UPGRADE)
        assert status == 429 and "Retry-After: 1" in head
        held.close()
        time.sleep(0.3)
        assert http(u2, "POST", SPDY_UPGRADE)[0] == 101  # the token was not spent by the 429


def test_socket_is_created_with_mode_0660_and_parent_dir(tmp_path, podnet):
    sock = str(tmp_path / "deep" / "dir" / "crishim.sock")
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", socket_path=sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert not os.path.exists(sock)


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path, podnet):
    path = str(tmp_path / "c.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", socket_path=path) as first:
        assert first.port_forward_url("sb").startswith("http://")
        second = CrishimProcess("--sandboxes", f"sb={podnet.path}", socket_path=path)
        second.start(wait=False)
        assert second.proc.wait(20) == 1
        assert "another server is already listening on " + path in second.log()
        assert "Traceback" not in second.log()
        assert first.port_forward_url("sb")  # the first one is unharmed


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def test_demo_mode_end_to_end(tmp_path):
    sock = str(tmp_path / "demo.sock")
    proc = subprocess.Popen([sys.executable, "-m", "crishim", "serve", "--demo", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C" in line or not line:
                break
        out = "".join(lines)
        assert f"CRI socket {sock}" in out
        assert "sandbox id 'demo'" in out
        assert f"crishim port-forward demo 8080:8080 --runtime-endpoint unix://{sock}" in out
        assert _netns_exists("crishim-demo")
        page = subprocess.run(["ip", "netns", "exec", "crishim-demo", "curl", "-s",
                               "http://127.0.0.1:8080/"], capture_output=True, text=True,
                              timeout=20).stdout
        assert "hello from the crishim demo sandbox" in page
        again = subprocess.run([sys.executable, "-m", "crishim", "serve", "--demo", "--socket",
                                str(tmp_path / "other.sock")], capture_output=True, text=True,
                               timeout=30)
        assert again.returncode == 1
        assert "a crishim demo is already running" in again.stderr
        assert "Traceback" not in again.stderr
        assert _netns_exists("crishim-demo")  # the second one did not touch it
        with grpc.insecure_channel("unix://" + sock) as channel:
            stub = api_pb2_grpc.RuntimeServiceStub(channel)
            url = stub.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="demo")).url
        assert url.startswith("http://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not _netns_exists("crishim-demo")
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_request_head_timeout_is_408_and_server_lives_on(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}",
                        "--stream-request-timeout", "300ms") as proc:
        u = urlsplit(proc.port_forward_url("sb"))
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(b"POST /portforward/x HTTP/1.1\r\nHost: x\r\n")  # never finished
            t0 = time.monotonic()
            answer = s.recv(200)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - t0 < 5
        assert http(proc.port_forward_url("sb"), "POST", SPDY_UPGRADE)[0] == 101


def test_request_head_in_pieces_around_the_accept_is_one_request(crishim):
    """The server reads what a client sent before the accept at once (sysutil.read_now);
    the rest of the head, sent later, completes the same request, and a head that is
    whole at the accept (as clients send it) is answered the same."""
    def upgrade_request() -> tuple[str, int, bytes]:
        u = urlsplit(crishim.port_forward_url(SANDBOX))
        head = f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in SPDY_UPGRADE.items()) + "\r\n"
        return u.hostname, u.port, head.encode()

    host, port, head = upgrade_request()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head[:20])  # most likely before the accept
        time.sleep(0.2)
        s.sendall(head[20:])
        assert s.recv(200).startswith(b"HTTP/1.1 101")
    host, port, head = upgrade_request()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head)
        assert s.recv(200).startswith(b"HTTP/1.1 101")


def test_stream_address_in_use_is_one_clear_line(tmp_path, podnet):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = CrishimProcess("--sandboxes", f"sb={podnet.path}", "--stream-address",
                              f"127.0.0.1:{port}")
        proc.start(wait=False)
        assert proc.proc.wait(20) == 1
        log = proc.log()
        proc.stop()
    assert "Traceback" not in log
    assert "address already in use" in log.lower(), log


@pytest.mark.parametrize("address, url_host", [("[::]:0", "[::1]"), ("0.0.0.0:0", "127.0.0.1")])
def test_a_wildcard_stream_address_gives_urls_that_connect(podnet, address, url_host):
    """`--stream-address [::]:0` listens on IPv6 only, yet its URLs named 127.0.0.1:
    every port-forward was refused. A wildcard's URLs name the loopback of its family."""
    from tests.support.podnet import ECHO_PORT
    from tests.support.spdy_pf_client import SpdyPortForwardClient

    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}",
                        "--stream-address", address) as proc:
        url = proc.port_forward_url(SANDBOX)
        assert urlsplit(url).netloc.rsplit(":", 1)[0] == url_host
        with SpdyPortForwardClient(url) as client:
            assert bytes(client.roundtrip(ECHO_PORT, b"wild").received) == b"wild"
