"""The helper protocol on its own: a real `crishim helper` (root) and the helper runtime plugin
in the test process, over a real unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time

import crishim_helperpod
import pytest
from crishim_helperpod import HelperUnavailable

from crishim.config import load
from crishim.helper.protocol import MAX_DIAL_TIMEOUT, Reply, decode_request, encode_request
from crishim.netns import listen_in_netns, socket_at
from crishim.runtime import DialFailed, DialTimedOut, Sandbox, SandboxGone, SandboxNotFound
from tests.support.helper_proc import HelperProcess
from tests.support.podnet import CLOSED_PORT, ECHO_PORT, HTTP_BODY, HTTP_PORT


@pytest.fixture(scope="module")
def helper():
    path = os.path.join(tempfile.mkdtemp(prefix="crishim-helper-proto-"), "helper.sock")
    with HelperProcess(path, "fd", group="0") as proc:
        yield proc
    os.rmdir(os.path.dirname(path))


def plugin_for(socket_path: str, sandboxes: dict, mode: str = "fd", dial_timeout: str = "5s"):
    return crishim_helperpod.factory(load(None, env={}, overrides={
        "helper_socket": socket_path, "helper_mode": mode, "sandboxes": sandboxes,
        "dial_timeout": dial_timeout}))


def raw_exchange(path: str, request: bytes, timeout: float = 10) -> tuple[Reply, list[int]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        data, fds, _, _ = socket.recv_fds(s, 4096, 1)
    return Reply.decode(data.rstrip(b"\n")), fds


def test_dial_hands_back_a_connected_socket(helper, podnet):
    plugin = plugin_for(helper.socket, {"sb": podnet.path})

    async def go() -> bytes:
        sock = await plugin.dial(await plugin.resolve("sb"), HTTP_PORT)
        loop = asyncio.get_running_loop()
        try:
            assert sock.family in (socket.AF_INET, socket.AF_INET6)
            assert sock.getpeername()[1] == HTTP_PORT
            await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(HTTP_BODY):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                assert chunk
                data += chunk
            return data
        finally:
            sock.close()

    assert asyncio.run(go()).endswith(HTTP_BODY)


def test_refused_port_is_dial_failed_with_the_reason(helper, podnet):
    plugin = plugin_for(helper.socket, {"sb": podnet.path})

    async def go() -> None:
        await plugin.dial(await plugin.resolve("sb"), CLOSED_PORT)

    with pytest.raises(DialFailed) as e:
        asyncio.run(go())
    assert f"port {CLOSED_PORT}" in str(e.value) and "Connection refused" in str(e.value)


def test_missing_netns_is_sandbox_gone(helper):
    plugin = plugin_for(helper.socket, {})
    with pytest.raises(SandboxGone) as e:
        asyncio.run(plugin.dial(Sandbox("x", netns_path="/var/run/netns/crishim-none"), 80))
    assert "/var/run/netns/crishim-none" in str(e.value)


def test_unknown_sandbox_is_not_found(helper):
    plugin = plugin_for(helper.socket, {})
    with pytest.raises(SandboxNotFound):
        asyncio.run(plugin.resolve("crishim-no-such-netns"))


def test_exists_op(helper, podnet):
    reply, _ = raw_exchange(helper.socket, encode_request("exists", podnet.path))
    assert reply.ok and reply.exists is True
    reply, _ = raw_exchange(helper.socket, encode_request("exists", "/var/run/netns/nope"))
    assert reply.ok and reply.exists is False


def _release(fifo: str) -> None:
    """Open the FIFO for writing, so that a reader blocked on it (old helpers) goes on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody is reading it
        pass


# /etc/shadow and /dev/null exist and /proc/1/ns/mnt is a namespace, of the wrong type:
# the helper, as root, must answer about each as about a path that does not exist
@pytest.mark.parametrize("path", ["/etc/shadow", "/dev/null", "/proc/1/ns/mnt",
                                  "/etc/shadow/x", "/var/run/netns/crishim-none"])
def test_only_network_namespaces_exist_for_the_helper(helper, path):
    reply, _ = raw_exchange(helper.socket, encode_request("exists", path))
    assert reply.ok and reply.exists is False
    reply, fds = raw_exchange(helper.socket, encode_request("dial", path, 80, "fd"))
    assert not reply.ok and not fds
    assert (reply.error, reply.message) == ("gone", f"no network namespace at {path}")


def test_a_fifo_named_as_netns_is_refused_and_blocks_no_other_request(helper, podnet,
                                                                      tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    try:
        with socket.socket(socket.AF_UNIX) as first:
            first.settimeout(5)
            first.connect(helper.socket)
            first.sendall(encode_request("dial", fifo, HTTP_PORT, "fd"))
            time.sleep(0.2)  # the helper has read it (an old one sits in open() from here)
            start = time.monotonic()
            reply, _ = raw_exchange(helper.socket, encode_request("exists", podnet.path), 3)
            assert reply.ok and reply.exists is True
            assert time.monotonic() - start < 1
            reply = Reply.decode(first.recv(4096).rstrip(b"\n"))
        assert (reply.error, reply.message) == ("gone", f"no network namespace at {fifo}")
    finally:
        _release(fifo)


def test_socat_mode_refuses_a_fifo_and_enters_the_netns_it_checked(podnet, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    try:
        with HelperProcess(str(tmp_path / "helper.sock"), "socat", group="0") as proc:
            reply, _ = raw_exchange(proc.socket, encode_request("dial", fifo, HTTP_PORT,
                                                                "socat"), 3)
            assert (reply.error, reply.message) == ("gone", f"no network namespace at {fifo}")
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(10)
                conn.connect(proc.socket)
                conn.sendall(encode_request("dial", podnet.path, HTTP_PORT, "socat"))
                time.sleep(0.002)  # the traffic sent ahead comes while socat is starting
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(HTTP_BODY):
                    chunk = conn.recv(65536)
                    assert chunk, data
                    data += chunk
            assert data.startswith(b'{"v":1,"ok":true,"mode":"socat","bounds_dials":true}\n')
    finally:
        _release(fifo)


@pytest.mark.parametrize("request_line, code, words", [
    (b"not json\n", "bad-request", "not JSON"),
    (b'{"v": 99, "op": "dial"}\n', "version", "version 99"),
    (b'{"v": 1, "op": "dance", "netns": "host"}\n', "bad-request", "unknown op"),
    (b'{"v": 1, "op": "dial", "netns": "relative/path", "port": 80, "mode": "fd"}\n',
     "bad-request", "absolute path"),
    (b'{"v": 1, "op": "dial", "netns": "host", "port": 70000, "mode": "fd"}\n',
     "bad-request", "1..65535"),
    # a NUL made open() raise ValueError and a host name made connect() raise TypeError:
    # a traceback in the helper's log and EOF for the shim instead of an answer
    (b'{"v": 1, "op": "exists", "netns": "/run/netns/a\\u0000b"}\n',
     "bad-request", "contains a NUL byte"),
    (b'{"v": 1, "op": "dial", "netns": "host", "port": 80, "mode": "fd", '
     b'"pod_ip": "a\\u0000b"}\n', "bad-request", "pod_ip must be an IP address"),
    (b'{"v": 1, "op": "dial", "netns": "host", "port": 80, "mode": "fd", '
     b'"pod_ip": "example.com"}\n', "bad-request", "pod_ip must be an IP address"),
    (b'{"v": 1, "op": "dial", "netns": "host", "port": 80, "mode": "socat"}\n',
     "mode", "runs in fd mode"),
])
def test_bad_requests_get_a_structured_error(helper, request_line, code, words):
    reply, fds = raw_exchange(helper.socket, request_line)
    assert not reply.ok and not fds
    assert reply.error == code
    assert words in reply.message


def test_a_client_that_sends_half_a_line_does_not_block_others(helper, podnet):
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(helper.socket)
        stalled.sendall(b'{"v": 1, "op": ')
        reply, _ = raw_exchange(helper.socket, encode_request("exists", podnet.path))
        assert reply.ok and reply.exists


def test_no_helper_is_a_clear_dial_failed(tmp_path, podnet):
    path = str(tmp_path / "absent.sock")
    plugin = plugin_for(path, {"sb": podnet.path})

    async def go() -> None:
        await plugin.dial(await plugin.resolve("sb"), HTTP_PORT)

    with pytest.raises(DialFailed) as e:
        asyncio.run(go())
    assert str(e.value) == f"helper at {path} unavailable: No such file or directory"


def test_a_request_nested_past_the_recursion_limit_is_a_bad_request(helper):
    for _ in range(20):
        reply, fds = raw_exchange(helper.socket, b"[" * 4000 + b"\n")
        assert (reply.ok, reply.error, fds) == (False, "bad-request", [])
        assert reply.message.startswith("request is not JSON: maximum recursion depth")
    assert "Traceback" not in helper.log()


class FakeHelper:
    """A helper that answers every request with reply(conn): a buggy or hostile one."""

    def __init__(self, path: str, reply) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.reply = reply
        self.stopped = threading.Event()
        self.served = 0  # replies finished, with this helper's own descriptors closed
        self.served_cond = threading.Condition()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                self.reply(conn)
            with self.served_cond:
                self.served += 1
                self.served_cond.notify_all()

    def wait_served(self, count: int) -> None:
        """Wait until count replies are finished: the shim can fail a dial on the reply
        before this thread has closed its own copies (the connection, a pipe's two ends)."""
        with self.served_cond:
            assert self.served_cond.wait_for(lambda: self.served >= count, 10), self.served

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


def _send_with_fd(conn: socket.socket, line: bytes, make_fd) -> None:
    """Send line with one descriptor, closing our copies of what make_fd opened."""
    keep, *extra = make_fd()
    try:
        socket.send_fds(conn, [line], [keep])
    finally:
        for fd in (keep, *extra):
            os.close(fd)


def _udp_fd() -> list[int]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    return [udp.detach()]


def _listening_fd() -> list[int]:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    return [tcp.detach()]


_ELSEWHERE = socket.socket()  # a host service, not the port the shim asked for
_ELSEWHERE.bind(("127.0.0.1", 0))
_ELSEWHERE.listen(64)


def _elsewhere_fd() -> list[int]:
    tcp = socket.create_connection(_ELSEWHERE.getsockname())
    return [tcp.detach()]


OK_FD = b'{"v":1,"ok":true,"mode":"fd"}\n'


@pytest.mark.parametrize("bounds_dials, within", [(True, "0.25s"), (False, "0.3s"),
                                                  (None, "0.25s")],
                         ids=["helper-that-bounds-dials", "older-helper", "no-reply-yet"])
def test_a_helper_that_does_not_answer_fails_the_call_at_dial_timeout(tmp_path, podnet,
                                                                      bounds_dials, within):
    """The helper's answer is waited for as long as a dial is, not stream_creation_timeout,
    which bounds stream pairs. A helper that never answers is unavailable (the node's
    problem, a WARNING), not a refused port. Where it has said it bounds its dials (its
    replies' bounds_dials), its silence past its timeout and a margin (50 ms here) is that,
    before the shim's own dial_timeout; an older helper may still be dialling a port that
    never answers, so it is waited for the whole dial_timeout, where the shim's own bound
    ends the dial as that port's "no answer" (a rolling upgrade, the shim first, blamed the
    helper for such ports). One not heard from yet is asked first what every version
    answers at once: its silence there is a stuck helper, whatever its version."""
    path = str(tmp_path / "helper.sock")
    replies = iter([] if bounds_dials is None else [Reply(True, exists=True,
                                                          bounds_dials=bounds_dials)])

    def reply(conn: socket.socket) -> None:  # the "exists" answer, then silence
        answer = next(replies, None)
        if answer is None:
            time.sleep(1.5)
        else:
            conn.sendall(answer.encode())

    fake = FakeHelper(path, reply)
    plugin = crishim_helperpod.factory(load(None, env={}, overrides={
        "helper_socket": path, "dial_timeout": "300ms", "stream_creation_timeout": "30s"}))

    async def go() -> None:
        if bounds_dials is not None:  # as a resolve does for a path the shim cannot stat
            assert await plugin.exists(podnet.path)
        await plugin.dial(Sandbox("sb", netns_path=podnet.path), HTTP_PORT)

    try:
        started = time.monotonic()
        with pytest.raises(HelperUnavailable,
                           match=f"^helper at {path} did not answer within {within}$"):
            asyncio.run(go())
        assert time.monotonic() - started < 1.2
    finally:
        fake.close()


@contextlib.contextmanager
def syn_dropping_port(netns_path: str):
    """A port in the netns whose SYNs are dropped: a listener whose accept queue (backlog
    0) one connection fills. A connect to it never completes."""
    listener = listen_in_netns(netns_path, "127.0.0.1", 0, backlog=0)
    port = listener.getsockname()[1]
    filler = socket_at(netns_path, socket.AF_INET)
    try:
        filler.setblocking(True)
        filler.settimeout(5)
        filler.connect(("127.0.0.1", port))
        yield port
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("mode", ["fd", "socat"])
def test_a_pod_port_that_never_answers_is_told_apart_from_a_helper_that_does_not(
        tmp_path, podnet, mode):
    """Through the helper, a pod's port whose SYNs are dropped and a helper that never
    answers both ended as the helper's silence: the helper dialled until the shim hung up,
    and the shim said "helper ... did not answer" (or, through crishim serve, whose own
    dial_timeout ended it first, "connect to port N: no answer" for both). The request
    now bounds the helper's connect, which answers "timeout" first: DialTimedOut, the
    port's words, the helper's silence kept for a helper that is stuck."""
    with HelperProcess(str(tmp_path / "helper.sock"), mode, "0") as proc, \
            syn_dropping_port(podnet.path) as port:
        plugin = plugin_for(proc.socket, {"sb": podnet.path}, mode, dial_timeout="1s")
        # the helper's answer, not the shim's wait (that would be HelperUnavailable)
        with pytest.raises(DialTimedOut) as e:
            asyncio.run(plugin.dial(Sandbox("sb", netns_path=podnet.path), port))
        assert str(e.value) == f"connect to port {port}: no answer after 0.8 s"
        assert not isinstance(e.value, HelperUnavailable)
        assert "Traceback" not in proc.log()


@pytest.mark.parametrize("reply, words", [
    (lambda c: c.sendall(b"[" * 4000 + b"\n"), "reply is not JSON: maximum recursion depth"),
    (lambda c: _send_with_fd(c, b"[" * 4000 + b"\n", os.pipe),
     "reply is not JSON: maximum recursion depth"),
    (lambda c: _send_with_fd(c, OK_FD, os.pipe), "passed a descriptor that is not a socket"),
    (lambda c: _send_with_fd(c, OK_FD, _udp_fd), "not a connected TCP socket"),
    (lambda c: _send_with_fd(c, OK_FD, _listening_fd), "not a connected TCP socket"),
    # the helper's own bytes were forwarded as the pod's
    (lambda c: c.sendall(b'{"v":1,"ok":true,"mode":"socat"}\n'),
     "answered in socat mode; this shim asked for fd"),
    # a host service's bytes were forwarded as the pod's
    (lambda c: _send_with_fd(c, OK_FD, _elsewhere_fd), f"not to port {HTTP_PORT}"),
], ids=["deep", "deep-with-fd", "pipe", "udp", "listening", "socat-in-fd-mode",
        "another-port"])
def test_a_bad_helper_reply_fails_that_dial_and_leaks_no_descriptor(tmp_path, podnet,
                                                                    reply, words):
    path = str(tmp_path / "helper.sock")
    fake = FakeHelper(path, reply)
    plugin = plugin_for(path, {"sb": podnet.path})

    async def dial() -> None:
        await plugin.dial(await plugin.resolve("sb"), HTTP_PORT)

    try:
        with pytest.raises(DialFailed) as first:
            asyncio.run(dial())
        fake.wait_served(1)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(DialFailed) as e:
                asyncio.run(dial())
            assert words in str(e.value) and str(e.value).startswith(f"helper at {path}")
        fake.wait_served(21)
        # no more than before: a socket an earlier test left to this process's pod servers
        # may close meanwhile (socat lingers); a leak would be one or more per dial
        assert len(os.listdir("/proc/self/fd")) <= before
        assert str(first.value) == str(e.value)
    finally:
        fake.close()


def _children(pid: int) -> int:
    return sum(1 for task in os.listdir(f"/proc/{pid}/task")
               for _ in open(f"/proc/{pid}/task/{task}/children").read().split())


def test_requests_past_helper_max_requests_are_answered_busy(podnet, tmp_path):
    """In socat mode each relay is a request and a socat process for its whole life: 300
    dials were 300 processes. Past the limit a request is told so at once."""
    with HelperProcess(str(tmp_path / "helper.sock"), "socat", "0",
                       "--max-requests", "3") as proc:
        relays = []
        try:
            for _ in range(3):
                conn = socket.socket(socket.AF_UNIX)
                conn.settimeout(10)
                conn.connect(proc.socket)
                conn.sendall(encode_request("dial", podnet.path, ECHO_PORT, "socat"))
                assert conn.recv(4096) == b'{"v":1,"ok":true,"mode":"socat","bounds_dials":true}\n'
                relays.append(conn)
            plugin = plugin_for(proc.socket, {"sb": podnet.path}, "socat")
            for _ in range(20):
                with pytest.raises(DialFailed) as e:
                    asyncio.run(plugin.dial(Sandbox("sb", netns_path=podnet.path), ECHO_PORT))
                assert str(e.value) == (f"helper at {proc.socket} is serving its limit of 3 "
                                        "requests (helper_max_requests); try again later")
            assert _children(proc.proc.pid) == 3
            relays[0].sendall(b"still relayed")
            assert relays[0].recv(4096) == b"still relayed"
            relays.pop(0).close()

            async def relayed() -> bytes:  # the place the closed relay left is taken again
                conn = await plugin.dial(Sandbox("sb", netns_path=podnet.path), ECHO_PORT)
                loop = asyncio.get_running_loop()
                try:
                    await loop.sock_sendall(conn, b"again")
                    return await asyncio.wait_for(loop.sock_recv(conn, 4096), 10)
                finally:
                    conn.close()

            deadline = time.monotonic() + 10
            while True:  # once the helper has seen the close and reaped that socat
                try:
                    assert asyncio.run(relayed()) == b"again"
                    break
                except DialFailed:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            for conn in relays:
                conn.close()
        assert proc.log().count("refusing more until one ends") == 1
        assert "Traceback" not in proc.log()


def test_a_helper_out_of_descriptors_answers_internal_without_a_traceback(podnet, tmp_path):
    """The helper's own state: with one descriptor left, the accept takes it and opening
    the netns for an `exists` finds none; that request is answered 'internal' with the
    reason and one warning (it raised past the request: a traceback each)."""
    import subprocess

    path = str(tmp_path / "helper.sock")
    with HelperProcess(path, "fd", "0", "--max-requests", "1000") as helper:
        fds = f"/proc/{helper.proc.pid}/fd"
        base = len(os.listdir(fds))
        limit = base + 8
        subprocess.run(["prlimit", f"--pid={helper.proc.pid}", f"--nofile={limit}:{limit}"],
                       check=True)
        idle = []
        try:
            while base + len(idle) < limit - 1:  # each held until the helper reads it
                conn = socket.socket(socket.AF_UNIX)
                conn.connect(path)
                idle.append(conn)
                deadline = time.monotonic() + 5
                while len(os.listdir(fds)) < base + len(idle) and time.monotonic() < deadline:
                    time.sleep(0.01)
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(10)
                conn.connect(path)
                conn.sendall(encode_request("exists", podnet.path))
                line = conn.makefile("rb").readline()
        finally:
            for conn in idle:
                conn.close()
        reply = Reply.decode(line)
        log = helper.log()
    assert not reply.ok and reply.error == "internal", line
    assert "out of resources" in reply.message
    assert "Traceback" not in log


@pytest.mark.parametrize("dial_timeout", ["2h", "3603s"])
def test_a_dial_timeout_past_the_protocols_bound_still_dials(helper, podnet, dial_timeout):
    """A dial's timeout is at most MAX_DIAL_TIMEOUT (3600 s) on the wire: a dial_timeout
    of 2 h sent 7198 s, which the helper refused as a bad request, so every dial failed."""
    assert decode_request(encode_request("dial", "host", 80, "fd", timeout=7200)
                          )["timeout"] == MAX_DIAL_TIMEOUT
    plugin = plugin_for(helper.socket, {"sb": podnet.path}, dial_timeout=dial_timeout)

    async def go() -> None:
        sock = await plugin.dial(await plugin.resolve("sb"), HTTP_PORT)
        sock.close()

    asyncio.run(go())
