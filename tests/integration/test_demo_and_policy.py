"""The README's demo reached as a user would (kubectl through the stand-in, and
`crishim port-forward`), and the error_policy setting as kubectl sees it."""

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest

from crishim.cri import api_pb2, api_pb2_grpc
from tests.support import peers
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import CLOSED_PORT, HTTP_BODY, HTTP_PORT
from tests.support.standin import KubeStandIn, run_kubectl_port_forward
from tests.support.udp_peers import exchange

KUBECTL_127 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"
KUBECTL_133 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"


@pytest.fixture
def demo(tmp_path):
    sock = str(tmp_path / "demo.sock")
    proc = subprocess.Popen([sys.executable, "-m", "crishim", "serve", "--demo", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "Ctrl-C" in out, out
        yield sock, out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not os.path.exists("/var/run/netns/crishim-demo")  # the demo cleaned up


def _demo_url(sock: str, sandbox: str, ports: list[int]) -> str:
    with grpc.insecure_channel("unix://" + sock) as channel:
        return api_pb2_grpc.RuntimeServiceStub(channel).PortForward(
            api_pb2.PortForwardRequest(pod_sandbox_id=sandbox, port=ports), timeout=10).url


@pytest.mark.parametrize("kubectl", [KUBECTL_127, KUBECTL_133])
def test_demo_reached_with_kubectl_through_the_standin(demo, kubectl):
    sock, _ = demo
    with KubeStandIn({"demo": "demo"}, lambda sid, ports: _demo_url(sock, sid, ports)) as api, \
            run_kubectl_port_forward(kubectl, api.server_url, "demo", ["0:8080"]) as pf:
        with peers.connect(pf.local_ports[8080]) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
            page = s.recv(65536)
    assert b"hello from the crishim demo sandbox" in page


def test_demo_reached_with_the_readme_command(demo):
    sock, out = demo
    command = re.search(r"try:\s+(crishim port-forward .*?)\s{3}", out).group(1).split()
    command[command.index("8080:8080")] = "0:8080"  # a free local port in tests
    pf = subprocess.Popen([sys.executable, "-m", "crishim", *command[1:]],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = pf.stdout.readline()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, line
        with peers.connect(int(m.group(1))) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
            assert b"hello from the crishim demo sandbox" in s.recv(65536)
    finally:
        pf.send_signal(signal.SIGINT)
        assert pf.wait(20) == 0


def test_demo_udp_echo_with_the_printed_command(demo):
    sock, out = demo
    command = re.search(r"UDP:\s+(crishim port-forward .*?)\s{3}", out).group(1).split()
    command[command.index("15353:5353/udp")] = "0:5353/udp"  # a free local port in tests
    pf = subprocess.Popen([sys.executable, "-m", "crishim", *command[1:]],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = pf.stdout.readline()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 5353/udp", line)
        assert m, line
        assert exchange(int(m.group(1)), [b"hi", b"x" * 9000]) == [b"hi", b"x" * 9000]
    finally:
        pf.send_signal(signal.SIGINT)
        assert pf.wait(20) == 0


@pytest.mark.parametrize("policy", ["quiet", "verbose"])
def test_error_policy_as_kubectl_sees_a_refused_port(podnet, policy):
    """quiet (default): the refused connection ends alone, kubectl says nothing and carries
    on. verbose (containerd's way): the reason is written on the error stream and kubectl
    reports it."""
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--error-policy", policy) as proc, \
            KubeStandIn({"web": "sb"}, lambda sid, ports: proc.port_forward_url(sid, ports)) \
            as api, \
            run_kubectl_port_forward(KUBECTL_127, api.server_url, "web",
                                     [f"0:{CLOSED_PORT}", f"0:{HTTP_PORT}"]) as pf:
        with peers.connect(pf.local_ports[CLOSED_PORT], timeout=20) as s:
            try:
                peers.recv_all(s)
            except ConnectionResetError:
                pass
        time.sleep(1.0)
        out = pf.output()
        if policy == "quiet":
            assert "refused" not in out.lower(), out
            assert pf.proc.poll() is None
            assert peers.http_get(pf.local_ports[HTTP_PORT]).endswith(HTTP_BODY)
        else:
            assert "Connection refused" in out, out
        assert f"port={CLOSED_PORT}" in proc.log() and "refused" in proc.log()


def test_demo_server_takes_a_burst_of_connects(demo):
    """The demo's HTTP server asks for the full accept queue, not asyncio's 100 (a burst
    of connections through a port-forward would otherwise lose SYNs for a second)."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    out = subprocess.run(["ip", "netns", "exec", "crishim-demo", "ss", "-ltnH",
                          "sport = :8080"], capture_output=True, text=True, check=True).stdout
    backlogs = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert backlogs == {min(4096, somaxconn)}, out
