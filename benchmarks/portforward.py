"""Port-forward benchmark: throughput and connection latency through crishim, beside direct
TCP inside the same netns, measured in one run and printed as ratios.

    python3 -m benchmarks.portforward [--size-mib 256] [--trials 200] [--conns 1000]

Paths measured (each that works on this machine):
  direct             a socket created inside the sandbox netns, straight to the server
  plain-relays       two plain copying relays in the client's and crishim's places
                     (benchmarks/relay.py): the three TCP hops of every port-forward with
                     no framing and no Python per byte, the reference for what the hops
                     alone allow on this machine
  kubectl-1.27/spdy  kubectl 1.27 -> API server/kubelet stand-in -> crishim (SPDY/3.1)
  kubectl-1.33/...   kubectl 1.33 (SPDY over WebSocket, or SPDY if that is refused)
  crishim/<t>        `crishim port-forward --transport <t>` (spdy, h2, websocket,
                     spdy-over-websocket)
Each transfer figure is the median of --repeat transfers, and its ratio the median of each
transfer's ratio to a direct transfer made just before it (the machine's speed drifts over a
run; a pair shares it); first bytes alternate with direct ones the same way. Beside them,
the CPU share of each process, how busy the whole machine was (a path where no process
reaches 90 % of a core and the machine is under 90 % busy is stalled somewhere) and crishim
serve's CPU-seconds per GiB.
Then 1,000 concurrent idle connections on one session (server memory per connection), the
netns entry cost, token issue+redeem cost at 0 to 100,000 outstanding, connection storms
(benchmarks/storm.py: containerd beside crishim on the same kubectl) and a chart
(benchmarks/last-run.png).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

from crishim.netns import create_named_netns, delete_named_netns, open_netns, socket_in_netns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks import relay, storm  # noqa: E402
from benchmarks.peer import ECHO, SINK, SOURCE  # noqa: E402
from tests.support.crishim_proc import CrishimProcess  # noqa: E402
from tests.support.peers import recv_line  # noqa: E402
from tests.support.standin import KubeStandIn, run_kubectl_port_forward  # noqa: E402

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.{}"
NETNS = f"crishim-bench-{os.getpid()}"
CHUNK = 1 << 20


class Direct:
    """Connections made from inside the netns: the baseline."""

    def __init__(self, path: str) -> None:
        self.path = path

    def connect(self, port: int) -> socket.socket:
        return relay.dial(port, self.path)


class Local:
    """Connections to a forward's local listener."""

    def __init__(self, ports: dict[int, int]) -> None:
        self.ports = ports

    def connect(self, port: int) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.ports[port]))


def _nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(120)
    return s


def upload(path, size: int) -> float:
    block = memoryview(bytes(CHUNK))
    s = _nodelay(path.connect(SINK))
    t0 = time.perf_counter()
    left = size
    while left:
        n = min(left, CHUNK)
        s.sendall(block[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    answer = recv_line(s)
    dt = time.perf_counter() - t0
    s.close()
    if int(answer or 0) != size:
        raise RuntimeError(f"sink counted {answer!r}, sent {size}")
    return size / dt / 1e6


def download(path, size: int) -> float:
    buf = bytearray(CHUNK)
    s = _nodelay(path.connect(SOURCE))
    t0 = time.perf_counter()
    s.sendall(b"%d\n" % size)
    got = 0
    while True:
        n = s.recv_into(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    s.close()
    if got != size:
        raise RuntimeError(f"received {got} of {size}")
    return size / dt / 1e6


# Between paired trials: what a trial left running (a connection's teardown, the channel
# client's CRI call for its next URL) ends before the next trial starts, so neither the
# path's trials nor the baseline's pay for the other's.
SETTLE = 0.005


def latency(path, trials: int, baseline=None) -> tuple[float, float, float]:
    """Connect, send one byte, get it echoed: median and p99 in ms, and the median as a
    multiple of the baseline's, whose trials alternate with these (one each, in turn: a
    machine that slows down or speeds up meanwhile moves both; each after SETTLE)."""
    samples, base = [], []
    for _ in range(trials):
        if baseline is not None:
            time.sleep(SETTLE)
            base.append(_echo_ms(baseline))
            time.sleep(SETTLE)
        samples.append(_echo_ms(path))
    samples.sort()
    med = statistics.median(samples)
    return (med, samples[min(len(samples) - 1, int(len(samples) * 0.99))],
            med / statistics.median(base) if base else 1.0)


def _echo_ms(path) -> float:
    t0 = time.perf_counter()
    s = path.connect(ECHO)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise RuntimeError("echo failed")
    ms = (time.perf_counter() - t0) * 1000
    s.close()
    return ms


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU-seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Row:
    """One path's figures. A throughput ratio is the median of each transfer's ratio to a
    direct transfer made just before it; the first-byte ratio is the path's median over
    the median of direct trials taken in turn with its own."""

    def __init__(self, name: str, note: str = "") -> None:
        self.name = name
        self.note = note
        self.up: float | None = None
        self.down = 0.0
        self.up_ratio: float | None = None
        self.down_ratio = 0.0
        self.first_byte = 0.0
        self.first_byte_p99 = 0.0
        self.first_byte_ratio = 0.0


def measure(name: str, path, args, rows: list, half_close: bool = True,
            pids: dict[str, int] | None = None, cpu: list | None = None,
            serve_pid: int | None = None, baseline=None) -> None:
    """half_close=False: the transport cannot half-close (WebSocket channels), so the sink
    can never answer an upload; upload is not measured (shown as n/a). pids: processes
    whose CPU use during the path's transfers is reported (where the time goes: the
    pod-side server, this process, which runs the transfer client, and for kubectl the
    stand-in's relay process count too); serve_pid: the crishim serve whose
    CPU-seconds per GiB forwarded are reported per direction. baseline: the direct path,
    whose transfers and first bytes alternate with this path's (each ratio pairs a
    transfer with the direct one made just before it)."""
    row = Row(name)
    try:
        latency(path, 5)  # warm up
        pids = pids or {}
        cpu_used = {k: 0.0 for k in pids}
        kernel_used = {k: 0.0 for k in pids}
        busy = total = 0
        wall = 0.0
        per_gib: dict[str, float] = {}

        def timed(fn):
            """One transfer of this path, its CPU and the machine's counted."""
            nonlocal busy, total, wall
            before = {k: cpu_split(p) for k, p in pids.items()}
            busy0, total0 = machine_busy()
            t0 = time.perf_counter()
            rate = fn(path, args.size)
            wall += time.perf_counter() - t0
            busy1, total1 = machine_busy()
            busy, total = busy + busy1 - busy0, total + total1 - total0
            for k, p in pids.items():
                user, kernel = cpu_split(p)
                cpu_used[k] += user + kernel - sum(before[k])
                kernel_used[k] += kernel - before[k][1]
            return rate

        def transfers(direction: str, fn) -> tuple[float, float]:
            serve0 = cpu_seconds(serve_pid) if serve_pid else 0.0
            rates, ratios = [], []
            for _ in range(args.repeat):
                base = fn(baseline, args.size) if baseline is not None else None
                rates.append(timed(fn))
                ratios.append(rates[-1] / base if base else 1.0)
            if serve_pid:  # serve does nothing during the direct transfers
                per_gib[direction] = ((cpu_seconds(serve_pid) - serve0)
                                      / (args.size * args.repeat / (1 << 30)))
            return statistics.median(rates), statistics.median(ratios)

        if half_close:
            row.up, row.up_ratio = transfers("up", upload)
        row.down, row.down_ratio = transfers("down", download)
        if pids and cpu is not None:
            shares = {k: v / wall for k, v in cpu_used.items()}
            machine = busy / max(1, total)
            healthy = max(shares.values()) >= 0.9 or machine >= 0.9
            cpu.append(f"{name}: CPU during the transfers: " + ", ".join(
                f"{k} {v:.0%} ({kernel_used[k] / max(cpu_used[k], 1e-9):.0%} in the kernel)"
                for k, v in shares.items()) + f" of one core (together "
                f"{sum(shares.values()):.2f} of {os.cpu_count()} cores); machine "
                f"{machine:.0%} busy: " + ("bound by a process or the machine" if healthy
                                           else "STALL (no process >= 90 %, machine < 90 %)"))
            if per_gib:
                cpu.append(f"{name}: crishim serve CPU-seconds per GiB forwarded: " + ", ".join(
                    f"{d} {v:.2f}" for d, v in per_gib.items()))
        row.first_byte, row.first_byte_p99, row.first_byte_ratio = latency(
            path, args.trials, baseline)
    except Exception as e:  # one broken path is reported, the others still run
        row.note = f"failed: {e}"
    rows.append(row)
    print(f"  measured {name}", file=sys.stderr, flush=True)


class CrishimPortForward:
    def __init__(self, crishim: CrishimProcess, transport: str, sandbox: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crishim", "port-forward", sandbox,
             f"0:{SINK}", f"0:{SOURCE}", f"0:{ECHO}", "--transport", transport,
             "--runtime-endpoint", "unix://" + crishim.socket, "--address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ports: dict[int, int] = {}
        self.lines: list[str] = []
        deadline = time.monotonic() + 20
        while len(self.ports) < 3 and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("Forwarding from 127.0.0.1:"):
                local, remote = line.split("127.0.0.1:", 1)[1].split(" -> ")
                self.ports[int(remote)] = int(local)
        if len(self.ports) < 3:
            self.close()
            raise RuntimeError("crishim port-forward did not start: " + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class RelayChain:
    """benchmarks/relay.py twice: one in the server's place, dialling into the netns, one in
    the client's place in front of it."""

    def __init__(self, netns: str, splice: bool = False) -> None:
        self.procs: list[subprocess.Popen] = []
        mode = ["--splice"] if splice else []
        server = self._start(*mode, "--netns", netns, f"{SINK},{SOURCE},{ECHO}")
        client = self._start(*mode, ",".join(str(p) for p in server))
        self.ports = dict(zip((SINK, SOURCE, ECHO), client))

    def _start(self, *args: str) -> list[int]:
        *flags, ports = args
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.relay", *flags,
                                 "--to-ports", ports], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().split()
        if len(line) != 3:
            self.close()
            raise RuntimeError("benchmarks.relay did not start")
        return [int(p) for p in line]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def concurrency(crishim: CrishimProcess, sandbox: str, conns: int) -> str:
    """conns connections open at once through one crishim port-forward session; all echo;
    the server's memory growth per idle connection."""
    pf = CrishimPortForward(crishim, "spdy", sandbox)
    socks = []
    try:
        warm = [socket.create_connection(("127.0.0.1", pf.ports[ECHO])) for _ in range(10)]
        for s in warm:
            s.sendall(b"w")
            s.recv(1)
            s.close()
        time.sleep(0.5)
        before = rss_kib(crishim.proc.pid)
        errors = 0
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", pf.ports[ECHO]), timeout=30)
            socks.append(s)
        for i, s in enumerate(socks):
            msg = b"%d\n" % i
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                data = s.recv(64)
                if not data:
                    break
                got += data
            errors += got != msg
        time.sleep(0.5)
        after = rss_kib(crishim.proc.pid)
        per = (after - before) / conns
        verdict = "OK" if errors == 0 and per < 64 else "MISSED"
        return (f"{conns} concurrent connections on one SPDY session: {errors} errors; server "
                f"RSS {before} -> {after} KiB = {per:.1f} KiB per idle connection "
                f"(target < 64 KiB) {verdict}")
    finally:
        for s in socks:
            s.close()
        pf.close()


def netns_entry_cost(path: str) -> str:
    """What entering the sandbox netns adds to a dial: a socket made inside the netns
    (setns in, socket(), setns back) against a plain socket(), medians of 2000."""
    fd = open_netns(path)
    try:
        def median(make) -> float:
            samples = []
            for _ in range(2000):
                t0 = time.perf_counter()
                make().close()
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples) * 1e6

        inside = median(lambda: socket_in_netns(fd, socket.AF_INET))
        plain = median(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        # each dial opens the netns path too, checked to be a network namespace
        opened = median(lambda: _Closing(open_netns(path)))
    finally:
        os.close(fd)
    return (f"netns entry: socket inside the sandbox netns {inside:.1f} us, plain socket "
            f"{plain:.1f} us: entry costs {inside - plain:.1f} us per dial, and opening the "
            f"netns path (checked to be one) {opened:.1f} us")


class _Closing:
    """An fd with close(), for netns_entry_cost's timing loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def tokens_cost() -> str:
    from crishim.tokens import StreamRequest, TokenStore

    def cost(outstanding: int) -> float:
        store = TokenStore(max_outstanding=outstanding + 10)
        for _ in range(outstanding):
            store.issue(StreamRequest("sb"))
        req = StreamRequest("sb")
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            store.redeem(store.issue(req))
        return (time.perf_counter() - t0) / n * 1e6

    costs = {n: min(cost(n) for _ in range(3)) for n in (0, 1_000, 10_000, 100_000)}
    shown = ", ".join(f"{c:.2f} us at {n:,}" for n, c in costs.items())
    return (f"token issue+redeem: {shown} outstanding; 10,000 vs 0: ratio "
            f"{costs[10_000] / costs[0]:.2f}, 100,000 vs 10,000: "
            f"{costs[100_000] / costs[10_000]:.2f} (O(1): flat apart from cache effects)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5,
                    help="median of N transfers per direction")
    ap.add_argument("--trials", type=int, default=200, help="latency samples per path")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma list of path name prefixes "
                    "(paths, 'concurrency', 'storm')")
    ap.add_argument("--storm-counts", default="200,1000,2000",
                    help="concurrent connections per storm (kubectl 1.27, containerd beside)")
    ap.add_argument("--relay-splice", action="store_true",
                    help="the plain relays move bytes with splice(2) instead of copying them")
    ap.add_argument("--chart", default=os.path.join(HERE, "last-run.png"),
                    help="where to draw the run's chart ('' for none; needs the bench extra)")
    args = ap.parse_args()
    args.size = args.size_mib << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    netns = create_named_netns(NETNS)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.peer", netns], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    rows: list = []
    extra: list[str] = []
    try:
        assert peer.stdout.readline().strip() == "ready"
        with CrishimProcess("--sandboxes", f"bench={netns}", "--log-level", "warning") as cs:
            wanted = lambda name: not args.only or any(  # noqa: E731
                name.startswith(p) for p in args.only.split(","))
            direct = Direct(netns)
            measure("direct", direct, args, rows)
            if wanted("plain-relays"):
                try:
                    chain = RelayChain(netns, args.relay_splice)
                    if args.relay_splice:
                        extra.append("plain-relays: splice(2) through a pipe, not copies")
                except RuntimeError as e:
                    rows.append(Row("plain-relays", f"failed: {e}"))
                else:
                    try:
                        measure("plain-relays", Local(chain.ports), args, rows,
                                pids={"relay (client's place)": chain.procs[1].pid,
                                      "relay (server's place)": chain.procs[0].pid,
                                      "pod server": peer.pid, "benchmark client": os.getpid()},
                                cpu=extra, baseline=direct)
                    finally:
                        chain.close()
            with KubeStandIn({"bench": "bench"},
                             lambda sid, ports: cs.port_forward_url(sid, ports),
                             relay_process=True) as api:
                for version in ("1.27", "1.33"):
                    name = f"kubectl-{version}"
                    if not wanted(name):
                        continue
                    specs = [f"0:{p}" for p in (SINK, SOURCE, ECHO)]
                    with run_kubectl_port_forward(KUBECTL.format(version), api.server_url,
                                                  "bench", specs) as kc:
                        kinds = sorted({u.transport for u in api.upgrades})
                        api.upgrades.clear()
                        measure(f"{name}/{'+'.join(kinds)}", Local(kc.local_ports), args, rows,
                                pids={"crishim serve": cs.proc.pid, "kubectl": kc.proc.pid,
                                      "pod server": peer.pid,
                                      "stand-in relay": api.relay_pid,
                                      "benchmark client": os.getpid()},
                                cpu=extra, serve_pid=cs.proc.pid, baseline=direct)
            for transport in ("spdy", "h2", "spdy-over-websocket", "websocket"):
                name = f"crishim/{transport}"
                if not wanted(name):
                    continue
                if transport == "websocket":
                    extra.append("crishim/websocket: one WebSocket session per connection "
                                 "(the channel protocol fixes ports per session); no upload "
                                 "figure: the channel protocol has no half-close")
                try:
                    pf = CrishimPortForward(cs, transport, "bench")
                except RuntimeError as e:
                    rows.append(Row(name, f"failed: {e}"))
                    continue
                try:
                    measure(name, Local(pf.ports), args, rows,
                            pids={"crishim serve": cs.proc.pid,
                                  "crishim port-forward": pf.proc.pid,
                                  "pod server": peer.pid, "benchmark client": os.getpid()},
                            cpu=extra,
                            half_close=transport != "websocket", serve_pid=cs.proc.pid,
                            baseline=direct)
                finally:
                    pf.close()
            if wanted("concurrency"):
                extra.append(concurrency(cs, "bench", args.conns))
            extra.append(netns_entry_cost(netns))
            extra.append(tokens_cost())
    finally:
        peer.terminate()
        peer.wait(10)
        delete_named_netns(NETNS)

    storm_results: dict = {}
    if wanted("storm"):
        counts = [int(c) for c in args.storm_counts.split(",")]
        storm_lines, storm_results = storm.run(counts, 3)
        extra.extend(storm_lines)

    print(f"\nport-forward benchmark: {args.size_mib} MiB per transfer (median of {args.repeat}), "
          f"{args.trials} latency samples; a throughput ratio is the median of the path's "
          f"transfers each divided by a direct one in the same netns made just before it\n")
    print(f"{'path':34} {'up MB/s':>9} {'ratio':>6} {'down MB/s':>10} {'ratio':>6} "
          f"{'1st byte ms':>12} {'p99 ms':>7} {'x direct':>8} {'x paired':>8}")
    direct = rows[0]
    for row in rows:
        if row.note:
            print(f"{row.name:34} {row.note}")
            continue
        up_text = (f"{row.up:9.0f} {row.up_ratio:6.1%}" if row.up is not None
                   else f"{'n/a':>9} {'':6}")
        print(f"{row.name:34} {up_text} {row.down:10.0f} {row.down_ratio:6.1%} "
              f"{row.first_byte:12.3f} {row.first_byte_p99:7.3f} "
              f"{row.first_byte / direct.first_byte:8.1f} {row.first_byte_ratio:8.1f}")
    relays = next((r for r in rows if r.name == "plain-relays" and not r.note), None)
    if relays is not None:
        print("\nagainst plain-relays (a path's ratio over theirs, up / down):")
        for row in rows:
            if row.note or row.name in ("direct", "plain-relays"):
                continue
            up = (f"{row.up_ratio / relays.up_ratio:.0%}" if row.up_ratio is not None
                  else "n/a")
            print(f"  {row.name:32} {up:>5} / {row.down_ratio / relays.down_ratio:.0%}")
    print("\n(x direct: the first byte over the direct row's, whose trials ran back to back "
          "with nothing else woken between them; x paired: over direct trials taken in turn "
          "with the path's, so both meet the same idle, halted vCPUs)")
    print()
    for line in extra:
        print(line)
    if args.chart:
        print(draw_chart(args.chart, rows, storm_results))
    return 0


def draw_chart(path: str, rows: list, storms: dict) -> str:
    """Throughput per path as a share of direct TCP, and the storm cost per connection."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: not drawn (pip install -e '.[bench]' for matplotlib)"
    paths = [r for r in rows[1:] if not r.note]
    fig, axes = plt.subplots(1, 2 if storms else 1, figsize=(13 if storms else 8, 4.8))
    ax = axes[0] if storms else axes
    xs = range(len(paths))
    ax.bar([x - 0.2 for x in xs], [100 * (r.up_ratio or 0) for r in paths], 0.4,
           label="upload")
    ax.bar([x + 0.2 for x in xs], [100 * r.down_ratio for r in paths], 0.4, label="download")
    ax.set_xticks(list(xs), [r.name for r in paths], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of direct TCP in the same netns")
    ax.set_title("Throughput per path (median)")
    ax.axhline(20, color="grey", linestyle=":", linewidth=1)
    ax.axhline(40, color="grey", linestyle="--", linewidth=1)
    ax.legend()
    if storms:
        ax2 = axes[1]
        for name, per in storms.items():
            counts = sorted(per)
            ax2.plot(counts, [per[n][0] / n * 1e6 for n in counts], marker="o", label=name)
        ax2.set_xlabel("concurrent connections on one session (kubectl 1.27 unless named)")
        ax2.set_ylabel("storm time per connection (us)")
        ax2.set_title("Connection storms: cost per connection")
        ax2.set_ylim(bottom=0)
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return f"chart: {path}"


if __name__ == "__main__":
    sys.exit(main())
