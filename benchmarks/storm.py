"""Connection storms: N concurrent new connections on one port-forward session, each a
1 KiB echo, through the same client-go client (kubectl 1.27 behind the API server/kubelet
stand-in) to containerd's own stream server and to crishim in front of that containerd,
measured in one run; then through crishim's own client (`crishim port-forward`, one SPDY
and one HTTP/2 session) to the same crishim.

    python3 -m benchmarks.storm [--counts 200,1000,2000] [--repeat 3]

Prints, per count, the median wall time of a storm and the cost per connection, for each
server, and crishim's time as a ratio of containerd's (target at 2,000: <= 0.7x). Before
the storms, kubectl's first byte through each server (connect, one byte echoed; median, as
a multiple of direct trials taken in turn inside the pod's netns): what client-go's way
of opening a connection costs whichever server answers it. Needs
containerd (deploy/install.sh --test); without it only crishim's own figures are printed
(on a named netns, `crishim serve --runtime netns`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from crishim.cri import api_pb2, api_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.peer import ECHO  # noqa: E402
from tests.support.crishim_proc import CrishimProcess  # noqa: E402
from tests.support.standin import KubeStandIn, run_kubectl_port_forward  # noqa: E402

KUBECTL_127 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"
PAYLOAD = bytes(range(256)) * 4  # 1 KiB


async def _one(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(PAYLOAD)
        got = await reader.readexactly(len(PAYLOAD))
        return got == PAYLOAD
    except (OSError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def _storm(port: int, count: int, timeout: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = await asyncio.wait_for(
        asyncio.gather(*(_one(port) for _ in range(count))), timeout)
    return time.perf_counter() - t0, sum(1 for ok in results if not ok)


def storm(port: int, count: int, timeout: float = 120.0) -> tuple[float, int]:
    """count concurrent connections to port, each a 1 KiB echo: (seconds, errors)."""
    try:
        import uvloop
        return uvloop.run(_storm(port, count, timeout))
    except TimeoutError:
        return timeout, count


FIRST_BYTE_TRIALS = 200


def first_byte(name: str, local_port: int, netns: str) -> tuple[float, float] | None:
    """kubectl's first byte through a server: (median ms, x direct trials in turn), None
    if a trial failed (printed; the storms still run)."""
    from benchmarks.portforward import Direct, Local, latency

    storm(local_port, 20)  # warm up: the session exists and the server has dialled once
    try:
        med, _, paired = latency(Local({ECHO: local_port}), FIRST_BYTE_TRIALS,
                                 Direct(netns))
    except (OSError, RuntimeError) as e:
        print(f"  {name}: first byte failed: {e}", file=sys.stderr, flush=True)
        return None
    print(f"  {name}: first byte {med:.3f} ms, {paired:.1f}x direct", file=sys.stderr,
          flush=True)
    return med, paired


def measure(name: str, local_port: int, counts: list[int], repeat: int) -> dict[int, tuple]:
    """Median storm time per count (and errors summed over the repeats)."""
    out: dict[int, tuple] = {}
    storm(local_port, 20)  # warm up: the session exists and the server has dialled once
    for count in counts:
        times, errors = [], 0
        for _ in range(repeat):
            dt, err = storm(local_port, count)
            times.append(dt)
            errors += err
            time.sleep(0.5)  # let the closed connections' streams finish
        out[count] = (statistics.median(times), errors)
        print(f"  {name}: {count} connections: median {out[count][0]:.3f} s, "
              f"{errors} errors", file=sys.stderr, flush=True)
    return out


@contextmanager
def kubectl_session(sandbox_id: str, port_forward: Callable[[str, list[int]], str]
                    ) -> Iterator[int]:
    """kubectl 1.27 port-forward (client-go SPDY) through the stand-in: its local port."""
    with KubeStandIn({"bench": sandbox_id}, port_forward, relay_process=True) as api, \
            run_kubectl_port_forward(KUBECTL_127, api.server_url, "bench",
                                     [f"0:{ECHO}"]) as kc:
        yield kc.local_ports[ECHO]


def own_client_storms(crishim: CrishimProcess, sandbox_id: str, counts: list[int],
                      repeat: int) -> dict[str, dict[int, tuple]]:
    """The same storms through `crishim port-forward --transport T`: one session each."""
    from benchmarks.portforward import CrishimPortForward

    out: dict[str, dict[int, tuple]] = {}
    for transport in ("spdy", "h2"):
        pf = CrishimPortForward(crishim, transport, sandbox_id)
        try:
            out[f"crishim, own client {transport}"] = measure(
                f"crishim/{transport}", pf.ports[ECHO], counts, repeat)
        finally:
            pf.close()
    return out


def report(results: dict[str, dict[int, tuple]], counts: list[int],
           first: dict[str, tuple[float, float] | None]) -> list[str]:
    lines = ["connection storms (N concurrent 1 KiB echoes on one session: kubectl 1.27 "
             "unless named; median; cost = time / N):"]
    header = f"  {'server':30}" + "".join(f"{n:>8,} conns  per conn  " for n in counts)
    lines.append(header)
    for name, per in results.items():
        cells = "".join(f"{per[n][0]:11.3f} s {per[n][0] / n * 1e6:6.0f} us  " for n in counts)
        errs = sum(per[n][1] for n in counts)
        lines.append(f"  {name:30}{cells} errors {errs}")
    if "containerd" in results and "crishim" in results:
        ratios = ", ".join(f"{n:,}: {results['crishim'][n][0] / results['containerd'][n][0]:.2f}x"
                           for n in counts)
        lines.append(f"  crishim time / containerd time: {ratios} (target at 2,000: <= 0.70x)")
    if first:
        lines.append("  kubectl 1.27's first byte (connect, one byte echoed; median, x direct "
                     "trials in turn in the pod's netns): " + ", ".join(
                         f"{name} {fb[0]:.3f} ms {fb[1]:.1f}x" if fb else f"{name} failed"
                         for name, fb in first.items()))
    for name, per in results.items():
        growth = (per[counts[-1]][0] / counts[-1]) / (per[counts[0]][0] / counts[0])
        lines.append(f"  {name}: cost per connection at {counts[-1]:,} vs {counts[0]:,}: "
                     f"{growth:.2f}x (flat is 1.0)")
    return lines


def run(counts: list[int], repeat: int) -> tuple[list[str], dict[str, dict[int, tuple]]]:
    """Both servers if containerd can run here, else crishim alone on a named netns."""
    from tests.support.containerd_env import ContainerdEnv, ContainerdUnavailable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    results: dict[str, dict[int, tuple]] = {}
    first: dict[str, tuple[float, float] | None] = {}  # kubectl's first byte per server
    try:
        env = ContainerdEnv()
        env.start()
    except ContainerdUnavailable as e:
        print(f"  containerd unavailable ({e.reason}): crishim alone", file=sys.stderr)
        return _crishim_alone(counts, repeat), {}
    try:
        sandbox_id = env.run_pod_sandbox("bench")
        netns = env.netns_path(sandbox_id)
        peer = subprocess.Popen([sys.executable, "-m", "benchmarks.peer", netns], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
            with grpc.insecure_channel(env.endpoint) as channel:
                runtime = api_pb2_grpc.RuntimeServiceStub(channel)

                def containerd_url(sid: str, ports: list[int]) -> str:
                    return runtime.PortForward(api_pb2.PortForwardRequest(
                        pod_sandbox_id=sid, port=ports), timeout=10).url

                with kubectl_session(sandbox_id, containerd_url) as port:
                    first["containerd"] = first_byte("containerd", port, netns)
                    results["containerd"] = measure("containerd", port, counts, repeat)
            with CrishimProcess("--runtime", "containerd", "--upstream-endpoint",
                                str(env.socket), "--log-level", "warning") as cs, \
                    kubectl_session(sandbox_id, cs.port_forward_url) as port:
                first["crishim"] = first_byte("crishim", port, netns)
                results["crishim"] = measure("crishim", port, counts, repeat)
                results.update(own_client_storms(cs, sandbox_id, counts, repeat))
        finally:
            peer.terminate()
            peer.wait(10)
            env.stop_and_remove(sandbox_id)
    finally:
        env.close()
    return report(results, counts, first), results


def _crishim_alone(counts: list[int], repeat: int) -> list[str]:
    from crishim.netns import create_named_netns, delete_named_netns

    name = f"crishim-storm-{os.getpid()}"
    netns = create_named_netns(name)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.peer", netns], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        with CrishimProcess("--sandboxes", f"bench={netns}", "--log-level", "warning") as cs, \
                kubectl_session("bench", cs.port_forward_url) as port:
            first = {"crishim": first_byte("crishim", port, netns)}
            results = {"crishim": measure("crishim", port, counts, repeat)}
            results.update(own_client_storms(cs, "bench", counts, repeat))
            return report(results, counts, first)
    finally:
        peer.terminate()
        peer.wait(10)
        delete_named_netns(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="200,1000,2000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    lines, _ = run(counts, args.repeat)
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
