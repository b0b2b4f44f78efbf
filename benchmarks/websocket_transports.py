"""Throughput of the WebSocket transports, with kubectl's plain SPDY as the baseline in the
same run: a real `crishim serve`, the API server + kubelet stand-in, a real pod netns.

    sudo python3 benchmarks/websocket_transports.py [MiB]

Prints MB/s per client and direction (best of 3). Needs root (network namespaces).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.crishim_proc import CrishimProcess  # noqa: E402
from tests.podnet import SINK_PORT, SOURCE_PORT, PodNetwork, source_bytes  # noqa: E402
from tests.standin import KubeStandIn, run_kubectl_port_forward  # noqa: E402

SDK = "/usr/lib/google-cloud-sdk/bin"


def _down(sock: socket.socket, size: int) -> float:
    t0 = time.perf_counter()
    sock.sendall(b"%d\n" % size)
    n = 0
    while n < size:
        data = sock.recv(1 << 20)
        if not data:
            break
        n += len(data)
    elapsed = time.perf_counter() - t0
    assert n == size, (n, size)
    return elapsed


def _up(sock: socket.socket, payload: bytes) -> float:
    t0 = time.perf_counter()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while not answer.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    elapsed = time.perf_counter() - t0
    assert answer.split()[1].decode() == hashlib.sha256(payload).hexdigest()
    return elapsed


def _rate(size: int, seconds: list[float]) -> str:
    return f"{size / min(seconds) / 1e6:7.0f} MB/s"


def bench_kubectl(standin: KubeStandIn, kubectl: str, size: int, payload: bytes) -> None:
    name = os.path.basename(kubectl)
    with run_kubectl_port_forward(kubectl, standin.server_url, "pod",
                                  [f"0:{SOURCE_PORT}", f"0:{SINK_PORT}"]) as pf:
        transport = standin.upgrades[-1].transport
        down, up = [], []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", pf.local_ports[SOURCE_PORT])) as s:
                down.append(_down(s, size))
            with socket.create_connection(("127.0.0.1", pf.local_ports[SINK_PORT])) as s:
                up.append(_up(s, payload))
    print(f"{name:16} via {transport:9}  down {_rate(size, down)}   up {_rate(size, up)}")


def bench_kubernetes_client(standin: KubeStandIn, size: int) -> None:
    import kubernetes
    from kubernetes.stream import portforward

    cfg = kubernetes.client.Configuration(host=standin.server_url)
    with kubernetes.client.ApiClient(cfg) as api:
        core = kubernetes.client.CoreV1Api(api)
        down = []
        for _ in range(3):
            pf = portforward(core.connect_get_namespaced_pod_portforward, "pod", "default",
                             ports=str(SOURCE_PORT))
            s = pf.socket(SOURCE_PORT)
            down.append(_down(s, size))
            s.close()
    print(f"{'kubernetes ' + kubernetes.__version__:16} via v4.channel  down {_rate(size, down)}"
          "   up (no half-close in this client)")


def main() -> None:
    size = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 256 << 20
    payload = source_bytes(size)
    with PodNetwork("crishim-bench-ws") as net, \
            CrishimProcess("--sandboxes", f"sb={net.path}", "--log-level", "info") as crishim, \
            KubeStandIn({"pod": "sb"}, crishim.port_forward_url) as standin:
        print(f"{size >> 20} MiB per transfer, best of 3")
        for kubectl in (f"{SDK}/kubectl.1.27", f"{SDK}/kubectl.1.33"):
            if os.access(kubectl, os.X_OK):
                bench_kubectl(standin, kubectl, size, payload)
        bench_kubernetes_client(standin, size)


if __name__ == "__main__":
    main()
