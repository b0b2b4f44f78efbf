"""Port-forward over SPDY/3.1 with unmodified kubectl through the API server + kubelet
stand-in, into a real sandbox netns."""

import os
import time

import pytest

from crishim.netns import create_named_netns, delete_named_netns, listen_in_netns
from tests.support import SANDBOX, peers
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import (
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_BODY,
    HTTP_PORT,
    RESET_PORT,
    SINK_PORT,
    SOURCE_PORT,
)
from tests.support.standin import KubeStandIn, run_kubectl_port_forward

KUBECTL = {v: f"/usr/lib/google-cloud-sdk/bin/kubectl.{v}" for v in ("1.27", "1.33")}
PORTS = [HTTP_PORT, ECHO_PORT, SINK_PORT, SOURCE_PORT, RESET_PORT, CLOSED_PORT]


@pytest.fixture(scope="module")
def standin(crishim):
    with KubeStandIn({"web": SANDBOX}, lambda sid, ports: crishim.port_forward_url(sid, ports)) \
            as api:
        yield api


@pytest.fixture(scope="module", params=sorted(KUBECTL))
def kubectl(request, standin):
    """One kubectl session forwarding every pod port, shared by the tests of a version."""
    specs = [f"0:{p}" for p in PORTS]  # several ports in one kubectl command
    with run_kubectl_port_forward(KUBECTL[request.param], standin.server_url, "web", specs) \
            as pf:
        pf.version = request.param
        yield pf


def test_kubectl_prints_a_listener_per_port(kubectl):
    out = kubectl.output()
    for port in PORTS:
        assert f"-> {port}" in out
        assert kubectl.local_ports[port] > 0


def test_http_get(kubectl):
    assert peers.http_get(kubectl.local_ports[HTTP_PORT]).endswith(HTTP_BODY)


def test_64mib_up_and_down_sha256(kubectl):
    got, sent = peers.upload_sha(kubectl.local_ports[SINK_PORT], 64 * peers.MiB)
    assert got == sent
    got, expected = peers.download_sha(kubectl.local_ports[SOURCE_PORT], 64 * peers.MiB)
    assert got == expected


def test_100_concurrent_connections_through_one_session(kubectl):
    results = peers.concurrent_echoes(kubectl.local_ports[ECHO_PORT], 100)
    assert all(results), f"{results.count(False)} of 100 failed"


def test_client_half_close_still_gets_the_answer(kubectl):
    payload = os.urandom(300_000)
    assert peers.echo_half_close(kubectl.local_ports[ECHO_PORT], payload) == payload


def test_reset_from_pod_leaves_session_usable(kubectl):
    assert peers.reset_by_pod(kubectl.local_ports[RESET_PORT]) == b""
    time.sleep(0.2)
    assert kubectl.proc.poll() is None, kubectl.output()
    assert peers.http_get(kubectl.local_ports[HTTP_PORT]).endswith(HTTP_BODY)
    assert peers.echo_half_close(kubectl.local_ports[ECHO_PORT], b"again") == b"again"


def test_closed_port_ends_that_connection_only(kubectl):
    assert peers.reset_by_pod(kubectl.local_ports[CLOSED_PORT], b"anyone?") == b""
    time.sleep(0.2)
    assert kubectl.proc.poll() is None, kubectl.output()
    assert peers.http_get(kubectl.local_ports[HTTP_PORT]).endswith(HTTP_BODY)


def test_transport_used_is_recorded(kubectl, standin):
    """1.27 speaks SPDY; 1.33 tries SPDY over WebSocket first (kept if the server takes it,
    otherwise it falls back to SPDY cleanly). Either way the forward above worked."""
    kinds = [u.transport for u in standin.upgrades]
    assert "spdy" in kinds or "websocket" in kinds
    if kubectl.version == "1.27":
        assert "spdy" in kinds



@pytest.mark.parametrize("version", sorted(KUBECTL))
def test_sandbox_netns_deleted_mid_session_ends_session_readably(version, podnet):
    name = f"crishim-doomed-{os.getpid()}"
    delete_named_netns(name)
    path = create_named_netns(name)
    listener = listen_in_netns(path, "127.0.0.1", 7000)
    listener.setblocking(True)
    import threading

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"alive\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with CrishimProcess("--sandboxes", f"doomed={path}") as proc, \
                KubeStandIn({"doomed": "doomed"},
                            lambda sid, ports: proc.port_forward_url(sid, ports)) as api, \
                run_kubectl_port_forward(KUBECTL[version], api.server_url, "doomed",
                                         ["0:7000"]) as pf:
            local = pf.local_ports[7000]
            with peers.connect(local) as s:
                s.sendall(b"hi")
                assert peers.recv_all(s) == b"alive\n"
            delete_named_netns(name)
            with peers.connect(local, timeout=20) as s:
                s.sendall(b"hi")
                try:
                    peers.recv_all(s)
                except ConnectionResetError:
                    pass
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "no longer exists" not in pf.output():
                time.sleep(0.1)
            assert "no longer exists" in pf.output(), pf.output()
            assert "sandbox" in proc.log()
    finally:
        listener.close()
        delete_named_netns(name)


