"""dial_timeout: a port in the pod whose SYNs are dropped (an iptables DROP rule in the pod
netns, as a NetworkPolicy or a firewall in the pod makes them) fails that connection once
the timeout passes, as a refused port does, instead of holding it, its socket and the
netns descriptor for the kernel's ~2 min of SYN retries. The session and its other
connections carry on; with the helper-pod backend the helper drops its dial too when the
shim gives up."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.integration.test_hostile_endpoints import _wait_for
from tests.integration.test_operations import _free_port, _metric
from tests.support.crishim_proc import CrishimProcess
from tests.support.helper_proc import HelperProcess, UnprivilegedCrishim
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

DROP_PORT = 9005  # SYNs dropped in the pod netns (nothing listens either)


def _in_pod(podnet, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={podnet.path}", "--", *argv], check=True,
                          capture_output=True, text=True, timeout=20).stdout


@pytest.fixture(scope="module")
def dropping(podnet):
    rule = ["INPUT", "-p", "tcp", "--dport", str(DROP_PORT), "-j", "DROP"]
    _in_pod(podnet, "iptables", "-I", *rule)
    try:
        yield podnet
    finally:
        _in_pod(podnet, "iptables", "-D", *rule)


def _socats(pid: int) -> list[str]:
    """The helper's socat children still running."""
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "comm="], capture_output=True,
                         text=True, timeout=20).stdout
    return [name for name in out.split() if name in ("socat", "nsenter", "setpriv")]


def _children(pid: int) -> dict[int, str]:
    """The process's children, live or zombie: pid -> argv joined ("" for a zombie)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _dialling_children(pid: int, port: int) -> list[int]:
    """The helper's live children (setpriv, nsenter, then socat: one argv) dialling port:
    their last argument is TCP4:127.0.0.1:port or TCP6:[::1]:port."""
    return [child for child, argv in _children(pid).items()
            if argv.split() and argv.split()[-1].endswith(f":{port}")]


def _dialling(podnet) -> list[str]:
    """Sockets in the pod netns still sending SYNs to DROP_PORT."""
    out = _in_pod(podnet, "ss", "-Htn", "state", "syn-sent", "dport", f"= :{DROP_PORT}")
    return [line for line in out.splitlines() if line.strip()]


def _dropped_dial_ends_only_its_connection(proc, podnet, while_dialling=None
                                           ) -> SpdyPortForwardClient:
    with SpdyPortForwardClient(proc.port_forward_url("sb")) as client:
        live = client.forward(ECHO_PORT)
        live.send(b"before")
        assert client.wait(lambda: bytes(live.received) == b"before")
        fwd = client.forward(DROP_PORT)
        if while_dialling is not None:
            while_dialling()
        # the kernel retries a dropped SYN for ~2 min: ended here by the 0.5 s timeout
        assert client.wait(fwd.finished, timeout=15), "the dial was not given up"
        assert fwd.reset_status is not None  # the data stream reset, as a refused port's
        assert fwd.error_text == ""  # quiet policy: kubectl keeps its session
        assert not client.closed
        live.send(b"after")
        assert client.wait(lambda: bytes(live.received) == b"beforeafter")
        assert client.roundtrip(ECHO_PORT, b"new one").received == b"new one"
        # the cancelled dial closed its socket: nothing keeps sending SYNs for it
        assert _wait_for(lambda: not _dialling(podnet), 5), _dialling(podnet)
        live.close_write()
        assert client.wait(live.finished)
    return client


def test_a_dial_whose_syns_are_dropped_fails_its_connection_at_dial_timeout(dropping):
    port = _free_port()
    with CrishimProcess("--sandboxes", f"sb={dropping.path}", "--dial-timeout", "500ms",
                        "--metrics-address", f"127.0.0.1:{port}") as proc:
        _dropped_dial_ends_only_its_connection(proc, dropping)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) \
            .read().decode()
        log = proc.log()
    assert f"connect to port {DROP_PORT}: no answer after 0.5 s" in log, log
    assert _metric(text, "crishim_forward_failures_total", reason="dial_timeout") == 1


@pytest.mark.parametrize("mode", ["fd", "socat"])
def test_the_helper_drops_its_dial_when_the_shim_gives_up(dropping, mode: str):
    """The helper dials (fd mode: passes the socket back; socat mode: runs socat in the
    netns). The request bounds the helper's connect (dial_timeout less the margins); the
    helper, which would have waited out the kernel's retries holding a request slot and
    the socket (and socat), drops the dial then and answers "timeout", which the shim
    reports as the port's (a helper that never answers is said to be the helper)."""
    with tempfile.TemporaryDirectory(prefix="crishim-helper-dial-") as d:
        os.chmod(d, 0o755)
        sock = os.path.join(d, "helper.sock")
        with HelperProcess(sock, mode) as helper, \
                UnprivilegedCrishim("--runtime", "helper", "--helper-socket", sock,
                                    "--helper-mode", mode, "--sandboxes",
                                    f"sb={dropping.path}", "--dial-timeout", "500ms") as shim:
            dial: list[int] = []  # the dropped dial's socat, seen while it dials

            def note_dial() -> None:
                deadline = time.monotonic() + 5
                while not dial and time.monotonic() < deadline:
                    dial.extend(_dialling_children(helper.proc.pid, DROP_PORT))
                    time.sleep(0.01)
                assert dial, f"no child of the helper dialled port {DROP_PORT}"

            _dropped_dial_ends_only_its_connection(
                shim, dropping, note_dial if mode == "socat" else None)
            assert _wait_for(lambda: f"connect to port {DROP_PORT}: no answer after 0.4 s in "
                             f"{dropping.path}: dial given up, answered timeout"
                             in helper.log(), 5), helper.log()
            # killed and reaped before the helper says so (a zombie still has /proc/PID).
            # The echo connections' socats are not looked at: each ends, and is reaped, as
            # its relay ends, which may be a moment after the client has seen its streams end
            assert not [pid for pid in dial if os.path.exists(f"/proc/{pid}")], dial
            assert not _dialling_children(helper.proc.pid, DROP_PORT)
            if mode == "fd":
                assert not _children(helper.proc.pid)
            shim_log = shim.log()
    assert f"reason=connect to port {DROP_PORT}: no answer after 0.4 s" in shim_log, shim_log


def test_a_killed_socat_helper_leaves_no_socat_dialling(dropping):
    """socat runs with the helper's death as its own (setpriv --pdeathsig): a helper
    SIGKILLed (or OOM-killed) mid-dial left its socat, reparented to init, sending SYNs
    in the pod's netns for the kernel's ~2 min of retries."""
    import socket

    from crishim.helper.protocol import encode_request

    with tempfile.TemporaryDirectory(prefix="crishim-helper-kill-") as d:
        os.chmod(d, 0o755)
        helper = HelperProcess(os.path.join(d, "helper.sock"), "socat").start()
        try:
            with socket.socket(socket.AF_UNIX) as shim:
                shim.connect(helper.socket)
                shim.sendall(encode_request("dial", dropping.path, DROP_PORT, mode="socat"))
                assert _wait_for(lambda: _dialling(dropping) and _socats(helper.proc.pid), 10)
                children = subprocess.run(["ps", "--ppid", str(helper.proc.pid), "-o",
                                           "pid="], capture_output=True, text=True,
                                          timeout=20).stdout.split()
                assert children
                helper.kill()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and (
                        any(os.path.exists(f"/proc/{pid}") for pid in children)
                        or _dialling(dropping)):
                    time.sleep(0.05)
                assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
                assert not _dialling(dropping)
        finally:
            helper.stop()
