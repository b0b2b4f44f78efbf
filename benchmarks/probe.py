"""Where a transfer waits: per-MiB counts for each process on a port-forward path, free of
the machine's noise (counts, not times).

    python3 -m benchmarks.probe [--size-mib 64] [--only crishim/spdy,kubectl-1.27]

For each path and direction, one transfer, and per MiB moved: read/write syscalls and
voluntary context switches (a process that sleeps per MiB many times is waiting on
something) and minor page faults (memory given back and faulted in again) from /proc,
for crishim serve, the client (kubectl or crishim port-forward) and
the pod-side peer; and the calls and bytes of crishim's hot callbacks (reads, writes,
pause/resume), counted by benchmarks/probe_hooks/sitecustomize.py in crishim serve and
crishim port-forward.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks.peer import SINK  # noqa: E402
from benchmarks.portforward import (  # noqa: E402
    ECHO,
    KUBECTL,
    NETNS,
    SOURCE,
    CrishimPortForward,
    Direct,
    Local,
    download,
    latency,
    upload,
)
from crishim.netns import create_named_netns, delete_named_netns  # noqa: E402
from tests.support.crishim_proc import CrishimProcess  # noqa: E402
from tests.support.standin import KubeStandIn, run_kubectl_port_forward  # noqa: E402


def proc_counts(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            if k in ("syscr", "syscw", "rchar", "wchar"):
                out[k] = int(v)
    vol = invol = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol += int(line.split()[1])
        except FileNotFoundError:
            pass
    out["sleeps"] = vol
    out["preempted"] = invol
    run = wait = 0
    for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(stat) as f:
                r, w, _ = f.read().split()
            run += int(r)
            wait += int(w)
        except (FileNotFoundError, ValueError):
            pass
    out["run_ns"] = run
    out["wait_ns"] = wait
    try:
        with open(f"/proc/{pid}/stat") as f:  # field 10 (after "pid (comm)"): minflt
            out["faults"] = int(f.read().rsplit(")", 1)[1].split()[7])
    except (FileNotFoundError, IndexError, ValueError):
        out["faults"] = 0
    out["t_ns"] = time.perf_counter_ns()
    return out


def hook_counts(pid: int, outdir: str) -> dict[str, list[int]]:
    path = os.path.join(outdir, f"{pid}.json")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    return {}


def sample_sockets(netns_name: str, stop, samples: list) -> None:
    """Recv-Q/Send-Q of every established TCP socket, in the host and in the pod netns."""
    while not stop.is_set():
        for where, cmd in (("host", ["ss", "-tnH", "state", "established"]),
                           ("pod", ["ip", "netns", "exec", netns_name, "ss", "-tnH",
                                    "state", "established"])):
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            for line in out.splitlines():
                f = line.split()
                if len(f) >= 4:
                    samples.append((where, f[2], f[3], int(f[0]), int(f[1])))
        time.sleep(0.05)


def socket_report(samples: list) -> None:
    by: dict = {}
    for where, local, peer, recvq, sendq in samples:
        e = by.setdefault((where, local, peer), [0, 0, 0])
        e[0] += 1
        e[1] += recvq
        e[2] += sendq
    print("  sockets (mean over samples; Recv-Q = unread by this end, Send-Q = unacked):")
    for (where, local, peer), (n, r, s) in sorted(by.items()):
        if n >= 3 and (r or s):
            print(f"    {where:4} {local:>21} <- {peer:21} recv-q {r / n / 1024:8.0f} KiB"
                  f"  send-q {s / n / 1024:8.0f} KiB  ({n} samples)")


def perf_report(path: str, mib: float) -> None:
    """Syscall exits per MiB by name and outcome (EAGAIN: would block)."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "event,trace"],
                         capture_output=True, text=True).stdout
    counts: dict = {}
    for line in out.splitlines():
        name, _, rest = line.strip().partition(": ")
        name = name.rstrip(":").replace("syscalls:sys_exit_", "")
        ret = rest.rsplit("0x", 1)[-1].strip()
        try:
            value = int(ret, 16)
        except ValueError:
            continue
        if value >= 1 << 63:
            value -= 1 << 64
        kind = "EAGAIN" if value == -11 else ("0" if value == 0 else
                                               ("err" if value < 0 else "ok"))
        e = counts.setdefault((name, kind), [0, 0])
        e[0] += 1
        e[1] += max(value, 0)
    print("  syscalls per MiB (perf):", ", ".join(
        f"{n} {k} {c / mib:.1f}" + (f" avg {b / c / 1024:.0f} KiB" if b and n != "epoll_pwait"
                                    else "")
        for (n, k), (c, b) in sorted(counts.items())))


def snapshot(pids: dict[str, int], hooked: set[str], outdir: str) -> dict:
    return {name: (proc_counts(pid), hook_counts(pid, outdir) if name in hooked else {})
            for name, pid in pids.items()}


def report(name: str, direction: str, before: dict, after: dict, mib: float,
           rate: float) -> None:
    print(f"\n{name} {direction}: {rate:.0f} MB/s; per MiB moved:")
    for proc in before:
        (p0, h0), (p1, h1) = before[proc], after[proc]
        line = ", ".join(f"{k} {(p1[k] - p0[k]) / mib:.1f}" for k in
                         ("syscr", "syscw", "sleeps", "preempted", "faults"))
        wall = max(1, p1["t_ns"] - p0["t_ns"])
        line += (f"; CPU {(p1['run_ns'] - p0['run_ns']) / mib / 1e6:.2f} ms/MiB"
                 f"; of the wall time: running {(p1['run_ns'] - p0['run_ns']) / wall:.0%}, "
                 f"runnable but waiting for a CPU {(p1['wait_ns'] - p0['wait_ns']) / wall:.0%}")
        print(f"  {proc:22} {line}")
        h0, h1 = h0.get("counts", {}), h1.get("counts", {})
        for key in sorted(h1):
            calls = h1[key][0] - h0.get(key, [0, 0])[0]
            size = h1[key][1] - h0.get(key, [0, 0])[1]
            if calls:
                avg = f", avg {size / calls / 1024:.1f} KiB" if size else ""
                print(f"    {key:48} {calls / mib:8.2f}/MiB{avg}")


def first_byte_timeline(name: str, path, pids: dict[str, int], hooked: set[str],
                        outdir: str, trials: int) -> None:
    """Where the time goes between connect and the echoed byte: per trial, the first call
    of each hooked callback in each process, as an offset from the connect (medians)."""
    import socket
    import statistics
    for pid_name in hooked:
        hook_counts(pids[pid_name], outdir)  # clears the timelines
        if os.environ.get("CRISHIM_PROFILE"):
            os.kill(pids[pid_name], signal.SIGUSR2)  # restarts the profile
    cpu0 = {k: proc_counts(p) for k, p in pids.items()}
    windows = []
    for _ in range(trials):
        t0 = time.perf_counter_ns()
        s = path.connect(ECHO)
        t1 = time.perf_counter_ns()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        t2 = time.perf_counter_ns()
        if s.recv(1) != b"x":
            raise RuntimeError("echo failed")
        t3 = time.perf_counter_ns()
        s.close()
        windows.append((t0, t1, t2, t3))
        time.sleep(0.002)
    cpu1 = {k: proc_counts(p) for k, p in pids.items()}
    if os.environ.get("CRISHIM_PROFILE"):
        for k in hooked:
            os.kill(pids[k], signal.SIGUSR2)
        time.sleep(1)
        for k in hooked:
            print(f"  profile of {k}: {os.environ['CRISHIM_PROFILE']}/{pids[k]}.prof")
    cpu_line = ", ".join(
        f"{k} {(cpu1[k]['run_ns'] - cpu0[k]['run_ns']) / trials / 1000:.0f} us CPU "
        f"{(cpu1[k]['sleeps'] - cpu0[k]['sleeps']) / trials:.1f} sleeps" for k in pids)
    events = []
    for pid_name in hooked:
        for key, t in hook_counts(pids[pid_name], outdir).get("timeline", []):
            events.append((t, f"{pid_name}: {key}"))
    events.sort()
    offsets: dict[str, list[float]] = {}
    for t0, t1, t2, t3 in windows:
        seen = {"bench: connected": t1, "bench: sent x": t2, "bench: got x back": t3}
        for t, key in events:
            if t0 <= t <= t3 and key not in seen:
                seen[key] = t
        for key, t in seen.items():
            offsets.setdefault(key, []).append((t - t0) / 1000)
    total = statistics.median((w[3] - w[0]) / 1000 for w in windows)
    print(f"\n{name} first byte: median {total:.0f} us over {trials}; first call of "
          "each step, us after connect() began (median, in how many trials):")
    print(f"  per connection: {cpu_line} (hooks included)")
    for key, values in sorted(offsets.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"  {statistics.median(values):8.0f} us  {key}  ({len(values)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--only", default="kubectl-1.27,crishim/spdy")
    ap.add_argument("--strace", default="", help="process to trace with strace(1) during "
                    "each transfer ('kubectl', 'crishim serve', ...; slows it: for patterns)")
    ap.add_argument("--perf", action="store_true",
                    help="with --strace: count syscall exits with perf(1) instead")
    ap.add_argument("--first-byte", type=int, default=0, metavar="TRIALS",
                    help="instead of transfers: a timeline of the first-byte path")
    ap.add_argument("--sockets", action="store_true",
                    help="sample every socket's queues (ss) during the transfers")
    args = ap.parse_args()
    size = args.size_mib << 20
    outdir = tempfile.mkdtemp(prefix="crishim-probe-")
    hooks = os.path.join(HERE, "probe_hooks")
    os.environ["PYTHONPATH"] = hooks + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ["CRISHIM_PROBE"] = outdir
    wanted = args.only.split(",")
    netns = create_named_netns(NETNS)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.peer", netns], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "ready"
        with CrishimProcess("--sandboxes", f"bench={netns}", "--log-level", "warning") as cs:
            time.sleep(0.5)

            def run(name: str, path, pids: dict[str, int], hooked: set[str]) -> None:
                if args.first_byte:
                    latency(path, 20)
                    first_byte_timeline(name, path, dict(pids, peer=peer.pid), hooked, outdir,
                                        args.first_byte)
                    return
                pids = dict(pids, peer=peer.pid)
                pids["benchmark (transfer client)"] = os.getpid()
                latency(path, 3)
                directions = [("upload", upload), ("download", download)]
                if name == "crishim/websocket":  # no half-close: the sink never answers
                    directions = directions[1:]
                for direction, fn in directions:
                    before = snapshot(pids, hooked, outdir)
                    tracer = None
                    if args.strace in pids:
                        out = os.path.join(outdir, f"strace-{name.replace('/', '_')}-"
                                                   f"{direction}.txt")
                        if args.perf:  # syscall exits only: cheap enough to keep timing
                            cmd = ["perf", "record", "-q", "-o", out + ".perf", "-e",
                                   "syscalls:sys_exit_read,syscalls:sys_exit_write,"
                                   "syscalls:sys_exit_writev,syscalls:sys_exit_readv,"
                                   "syscalls:sys_exit_recvfrom,syscalls:sys_exit_sendmsg,"
                                   "syscalls:sys_exit_epoll_pwait,syscalls:sys_exit_epoll_wait,"
                                   "syscalls:sys_exit_splice",
                                   "-p", str(pids[args.strace])]
                        else:
                            cmd = ["strace", "-f", "-qq", "-e", "trace=!futex,rt_sigprocmask,"
                                   "getpid,nanosleep,sched_yield", "-o", out,
                                   "-p", str(pids[args.strace])]
                        tracer = subprocess.Popen(cmd)
                        time.sleep(1)
                    samples: list = []
                    stop = threading.Event()
                    sampler = threading.Thread(target=sample_sockets,
                                               args=(NETNS, stop, samples))
                    if args.sockets:
                        sampler.start()
                    rate = fn(path, size)
                    stop.set()
                    if args.sockets:
                        sampler.join()
                    if tracer is not None:
                        tracer.send_signal(signal.SIGINT)
                        tracer.wait(20)
                        if args.perf:
                            perf_report(out + ".perf", args.size_mib)
                        else:
                            print(f"strace of {args.strace}: {out}")
                    after = snapshot(pids, hooked, outdir)
                    report(name, direction, before, after, args.size_mib, rate)
                    if args.sockets:
                        socket_report(samples)

            run("direct", Direct(netns), {}, set())
            for w in wanted:  # kubectl-1.27 (SPDY), kubectl-1.33 (SPDY over WebSocket), ...
                if not w.startswith("kubectl-"):
                    continue
                with KubeStandIn({"bench": "bench"},
                                 lambda sid, ports: cs.port_forward_url(sid, ports),
                                 relay_process=True) as api:
                    specs = [f"0:{p}" for p in (SINK, SOURCE, ECHO)]
                    with run_kubectl_port_forward(KUBECTL.format(w.split("-", 1)[1]),
                                                  api.server_url, "bench", specs) as kc:
                        run(w, Local(kc.local_ports),
                            {"crishim serve": cs.proc.pid, "kubectl": kc.proc.pid,
                             "stand-in relay": api.relay_pid},
                            {"crishim serve"})
            for w in wanted:
                if not w.startswith("crishim/"):
                    continue
                pf = CrishimPortForward(cs, w.split("/", 1)[1], "bench")
                try:
                    run(w, Local(pf.ports), {"crishim serve": cs.proc.pid,
                                             "crishim port-forward": pf.proc.pid},
                        {"crishim serve", "crishim port-forward"})
                finally:
                    pf.close()
    finally:
        peer.terminate()
        peer.wait(10)
        delete_named_netns(NETNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
