"""Dial latency into a sandbox netns: in-process netns entry vs `crishim helper` fd passing
vs `crishim helper` nsenter+socat. Needs root (creates a netns and runs the helpers).

    python3 -m benchmarks.helper_dial [--dials 300] [--socat-dials 200]

Prints the median and 90th percentile per way and the ratios to in-process entry. Each
dial is a complete connect to a listener inside the netns; the socket is closed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from crishim.config import load
from crishim.netns import create_named_netns, delete_named_netns, dial_localhost, listen_in_netns

PORT = 7070


def _accept_forever(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


async def _time_dials(dial, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock = await dial()
        samples.append(time.perf_counter() - t0)
        sock.close()
    return samples


def _start_helper(path: str, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "crishim", "helper", "--socket", path,
                             "--mode", mode, "--log-level", "warning"])
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"helper ({mode}) did not start")
        time.sleep(0.05)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dials", type=int, default=300, help="dials per way (in-process, fd)")
    ap.add_argument("--socat-dials", type=int, default=200, help="dials through socat")
    args = ap.parse_args()
    import crishim_helperpod

    name = f"crishim-bench-{os.getpid()}"
    delete_named_netns(name)
    netns = create_named_netns(name)
    listener = listen_in_netns(netns, "127.0.0.1", PORT)
    listener.setblocking(True)
    threading.Thread(target=_accept_forever, args=(listener,), daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="crishim-bench-")
    helpers = []
    results: dict[str, list[float]] = {}
    try:
        async def in_process() -> list[float]:
            return await _time_dials(lambda: dial_localhost(netns, PORT), args.dials)

        results["in-process netns entry"] = asyncio.run(in_process())
        for mode, count in (("fd", args.dials), ("socat", args.socat_dials)):
            path = os.path.join(tmp, f"helper-{mode}.sock")
            helpers.append(_start_helper(path, mode))
            cfg = load(None, env={}, overrides={"helper_socket": path, "helper_mode": mode,
                                                "sandboxes": {"bench": netns}})
            plugin = crishim_helperpod.factory(cfg)

            async def through_helper(plugin=plugin, count=count) -> list[float]:
                sandbox = await plugin.resolve("bench")
                await _time_dials(lambda: plugin.dial(sandbox, PORT), 5)  # warm-up
                return await _time_dials(lambda: plugin.dial(sandbox, PORT), count)

            label = "helper, fd passing" if mode == "fd" else "helper, nsenter+socat"
            results[label] = asyncio.run(through_helper())
    finally:
        for proc in helpers:
            proc.terminate()
            proc.wait(20)
        listener.close()
        delete_named_netns(name)
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)

    base = statistics.median(results["in-process netns entry"])
    print(f"{'dial into a netns':28} {'dials':>6} {'median':>10} {'p90':>10} {'x in-process':>13}")
    for label, samples in results.items():
        med = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"{label:28} {len(samples):6d} {med * 1e6:8.0f}us {p90 * 1e6:8.0f}us "
              f"{med / base:12.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
