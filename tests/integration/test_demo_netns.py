"""The demo's netns next to `ip netns add/delete`: the first `ip netns add` on a host turns
/var/run/netns into a shared bind mount of itself; a netns crishim mounted there before
must still be deleted cleanly, and the next demo must start.

Everything runs in a private mount namespace with a fresh tmpfs on /run, so that
/var/run/netns starts as a plain directory whatever earlier runs did to the host's."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support import peers


@pytest.fixture
def mount_ns() -> Iterator[str]:
    """The path of a private mount namespace whose /run is an empty tmpfs."""
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs crishim-test-run /run && echo ready && exec sleep 600"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        yield f"/proc/{holder.pid}/ns/mnt"
    finally:
        holder.kill()
        holder.wait()


def _in_ns(ns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--mount={ns}", "--", *argv]


def _ip_netns(ns: str, op: str, name: str) -> None:
    r = subprocess.run(_in_ns(ns, "ip", "netns", op, name), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr


def _start_demo(ns: str, sock: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(_in_ns(ns, sys.executable, "-m", "crishim", "serve", "--demo",
                                   "--socket", sock),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + 30
    while "Ctrl-C" not in out and time.monotonic() < deadline and proc.poll() is None:
        out += proc.stdout.readline()
    if "Ctrl-C" not in out:
        proc.kill()
        proc.wait()
        pytest.fail(f"the demo did not start: {out}")
    return proc, out


def _stop_demo(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return proc.returncode, rest


def _complaints(out: str) -> list[str]:
    """Warnings, errors and start-up failures in a demo's output."""
    return re.findall(r"^.*(?: WARNING | ERROR |^crishim: ).*$", out, re.M)


def _netns_file_exists(ns: str, name: str) -> bool:
    return subprocess.run(_in_ns(ns, "test", "-e", f"/var/run/netns/{name}"),
                          timeout=30).returncode == 0


def _page_through_port_forward(sock: str) -> bytes:
    pf = subprocess.Popen([sys.executable, "-m", "crishim", "port-forward", "demo", "0:8080",
                           "--runtime-endpoint", f"unix://{sock}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert pf.stdout is not None
        line = pf.stdout.readline()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, line
        with peers.connect(int(m.group(1))) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
            return s.recv(65536)
    finally:
        pf.send_signal(signal.SIGINT)
        pf.wait(20)


def test_demo_netns_outlives_ip_netns_add_and_delete(mount_ns: str, tmp_path) -> None:
    sock = str(tmp_path / "demo.sock")
    names = [f"crishim-x-{os.getpid()}-{i}" for i in range(2)]
    first, _ = _start_demo(mount_ns, sock)
    try:
        # the first `ip netns add` here bind-mounts /var/run/netns onto itself, shared
        _ip_netns(mount_ns, "add", names[0])
        _ip_netns(mount_ns, "add", names[1])
        _ip_netns(mount_ns, "delete", names[0])
        assert b"hello from the crishim demo sandbox" in _page_through_port_forward(sock)
        _ip_netns(mount_ns, "delete", names[1])
    finally:
        code, out = _stop_demo(first)
    assert (code, _complaints(out)) == (0, [])  # no cleanup error said or swallowed
    assert not _netns_file_exists(mount_ns, "crishim-demo")

    second, _ = _start_demo(mount_ns, sock)
    try:
        assert b"hello from the crishim demo sandbox" in _page_through_port_forward(sock)
    finally:
        code, out = _stop_demo(second)
    assert (code, _complaints(out)) == (0, [])
    assert not _netns_file_exists(mount_ns, "crishim-demo")
