"""Every installed kubectl, 1.27 to 1.33 and the system's, unmodified, through the API
server + kubelet stand-in, with each transport it can speak: SPDY/3.1 (every version;
from 1.31 with KUBECTL_PORT_FORWARD_WEBSOCKETS=false) and SPDY over WebSocket (1.30 with
the gate on, on by default from 1.31). Per version: a listener per port, an HTTP GET, 4
MiB echoed with the client's half-close, a refused port that ends only its connection."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time

import pytest

from tests.integration.test_hostile_endpoints import _sockets
from tests.support import SANDBOX, peers
from tests.support.podnet import CLOSED_PORT, ECHO_PORT, HTTP_BODY, HTTP_PORT
from tests.support.standin import KubeStandIn, run_kubectl_port_forward

SDK = "/usr/lib/google-cloud-sdk/bin"
GATE = "KUBECTL_PORT_FORWARD_WEBSOCKETS"


def _minor(path: str) -> int:
    out = subprocess.run([path, "version", "--client"], capture_output=True, text=True,
                         timeout=30).stdout
    found = re.search(r'(?:Minor:"|v1\.)(\d+)', out)
    assert found, out
    return int(found.group(1))


KUBECTLS = sorted(glob.glob(f"{SDK}/kubectl.1.*")) + [
    p for p in ("/usr/bin/kubectl",) if os.path.exists(p)]
# (path, the gate's value or None for kubectl's default, the transport the server sees)
CASES = []
for _path in KUBECTLS:
    _m = _minor(_path)
    if _m >= 31:  # SPDY over WebSocket by default; the gate off: SPDY
        CASES += [(_path, None, "websocket"), (_path, "false", "spdy")]
    elif _m == 30:  # alpha: off by default
        CASES += [(_path, None, "spdy"), (_path, "true", "websocket")]
    else:
        CASES += [(_path, None, "spdy")]


@pytest.fixture(scope="module")
def standin(crishim):
    with KubeStandIn({"web": SANDBOX}, lambda sid, ports: crishim.port_forward_url(sid, ports)) \
            as api:
        yield api


def test_every_kubectl_version_is_installed():
    """The matrix below is what this machine has: 1.27 through 1.33 and the system's."""
    minors = sorted(_minor(p) for p in KUBECTLS)
    assert set(range(27, 34)) <= set(minors), minors


@pytest.mark.parametrize(("path", "gate", "transport"), CASES,
                         ids=[f"{os.path.basename(p)}-{g or 'default'}" for p, g, _ in CASES])
def test_kubectl_version_forwards(standin, path: str, gate: str | None, transport: str):
    env = dict(os.environ)
    env.pop(GATE, None)
    if gate is not None:
        env[GATE] = gate
    seen = len(standin.upgrades)
    with run_kubectl_port_forward(path, standin.server_url, "web",
                                  [f"0:{p}" for p in (HTTP_PORT, ECHO_PORT, CLOSED_PORT)],
                                  env=env) as kc:
        assert peers.http_get(kc.local_ports[HTTP_PORT]).endswith(HTTP_BODY)
        payload = os.urandom(4 * peers.MiB)
        assert peers.echo_half_close(kc.local_ports[ECHO_PORT], payload) == payload
        assert peers.reset_by_pod(kc.local_ports[CLOSED_PORT], b"anyone?") == b""
        time.sleep(0.2)
        assert kc.proc.poll() is None, kc.output()
        assert peers.echo_half_close(kc.local_ports[ECHO_PORT], b"still") == b"still"
        upgrades = [u.transport for u in standin.upgrades[seen:]]
    # the transport the session settled on: the last upgrade (1.31+ tries WebSocket first)
    assert upgrades and upgrades[-1] == transport, upgrades


def test_the_stand_ins_relay_process(crishim):
    """relay_process=True (the benchmarks' stand-in): the upgraded connection is relayed by
    a process of its own, which holds both of its sockets while the session lives, lets
    them go when kubectl ends, and exits 0 when the stand-in stops."""
    api = KubeStandIn({"web": SANDBOX}, lambda sid, ports: crishim.port_forward_url(sid, ports),
                      relay_process=True).start()
    try:
        relay = api.relay_pid
        assert relay is not None
        idle = _sockets(relay)  # its control socket
        kubectl = f"{SDK}/kubectl.1.27"
        with run_kubectl_port_forward(kubectl, api.server_url, "web",
                                      [f"0:{ECHO_PORT}"]) as kc:
            payload = os.urandom(4 * peers.MiB)
            assert peers.echo_half_close(kc.local_ports[ECHO_PORT], payload) == payload
            assert _sockets(relay) == idle + 2  # kubectl's side and crishim's
        deadline = time.monotonic() + 10
        while _sockets(relay) > idle and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sockets(relay) == idle
        proc = api._relay_proc
    finally:
        api.stop()
    assert proc is not None and proc.returncode == 0
