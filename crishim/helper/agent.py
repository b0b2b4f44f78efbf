"""`crishim helper`: a privileged agent that dials into sandbox netns for an unprivileged shim.

It runs in a privileged helper pod (hostPID, hostNetwork, /var/run/netns mounted) or as a
host process, and listens on a unix socket (helper_socket, mode 0660, group set with
--group). The shim (runtime plugin `helper`) then needs no CAP_SYS_ADMIN, no nsenter and
no socat. The messages are in crishim.helper.protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TypeVar

from crishim.helper.protocol import (
    ProtocolError,
    Reply,
    decode_request,
    read_line,
    send_line,
)
from crishim.netns import dial_localhost_in, is_netns, open_netns
from crishim.runtime import HOST, DialFailed, SandboxGone
from crishim.sysutil import (
    SocketInUse,
    prepare_socket_path,
    remove_socket_file,
    stop_on_signals,
    wait_io,
)

log = logging.getLogger("crishim.helper")

T = TypeVar("T")

REQUEST_TIMEOUT = 10.0  # a client that sends no complete request within this is dropped
SOCAT_LINGER = 4 * 3600  # socat -t: after one direction's EOF, wait this long for the other
RELAY_CHUNK = 256 * 1024


class HelperSetupError(Exception):
    """The helper cannot start as configured; the message says what to change."""


# --- the agent -----------------------------------------------------------------------------

class HelperAgent:
    """The listening side: one task per unix connection."""

    def __init__(self, socket_path: str, mode: str = "fd", group: str = "",
                 max_requests: int = 1024) -> None:
        self.socket_path = socket_path
        self.mode = mode
        self.group = group
        self.max_requests = max_requests
        self._at_limit = False
        self.listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.mode == "socat":
            missing = [tool for tool in ("socat", "nsenter", "setpriv")
                       if shutil.which(tool) is None]
            if missing:  # else every dial would fail the same way, one by one
                raise HelperSetupError(
                    f"mode socat needs {' and '.join(missing)} on PATH (apt-get install "
                    f"socat util-linux), or run --mode fd, which needs none of them")
        gid = self._group_id()  # before the socket exists: a bad one leaves nothing behind
        prepare_socket_path(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)
        try:
            sock.bind(self.socket_path)
            if gid >= 0:
                os.chown(self.socket_path, -1, gid)
            os.chmod(self.socket_path, 0o660)
        except OSError as e:
            sock.close()
            remove_socket_file(self.socket_path)
            raise HelperSetupError(f"{self.socket_path}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        log.info("crishim helper serving %s mode on %s", self.mode, self.socket_path)

    def _group_id(self) -> int:
        """--group as a gid (a name or a number), -1 when not given."""
        if not self.group:
            return -1
        if self.group.isascii() and self.group.isdigit():
            gid = int(self.group)
            if gid >= 2**32 - 1:  # (uid_t)-1 means "no change" to chown
                raise HelperSetupError(f"--group: {self.group} is not a group id "
                                       f"(0..{2**32 - 2})")
            return gid
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise HelperSetupError(f"--group: no group named {self.group!r}") from None

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and friends: back off rather than spin
                log.warning("accept on %s failed: %s", self.socket_path, e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            if len(self._tasks) >= self.max_requests:
                self._refuse_busy(conn)
                continue
            self._at_limit = False
            task = loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse_busy(self, conn: socket.socket) -> None:
        """Answer 'busy' without reading the request (it stays unread; the reply is read
        first) and close: a refusal costs no task, so a flood of them holds nothing."""
        if not self._at_limit:
            self._at_limit = True
            log.warning("serving %d requests (helper_max_requests): refusing more until one "
                        "ends", self.max_requests)
        reply = Reply(False, error="busy", message=(
            f"helper at {self.socket_path} is serving its limit of {self.max_requests} "
            f"requests (helper_max_requests); try again later"))
        try:
            conn.send(reply.encode())  # a new connection's buffer takes one line at once
        except OSError as e:
            log.debug("could not send busy to a client: %s", e)
        conn.close()

    async def stop(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.listener is not None:
            self.listener.close()
            remove_socket_file(self.socket_path)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                line, _ = await asyncio.wait_for(read_line(conn), REQUEST_TIMEOUT)
                request = decode_request(line)
            except (ProtocolError, EOFError, TimeoutError) as e:
                code = e.code if isinstance(e, ProtocolError) else "bad-request"
                log.info("bad request: %s", e)
                await self._reply(conn, Reply(False, error=code, message=str(e)))
                return
            netns = request["netns"]
            if request["op"] == "exists":
                found = netns == HOST or is_netns(netns)
                await self._reply(conn, Reply(True, exists=found))
                return
            if request["mode"] != self.mode:
                await self._reply(conn, Reply(
                    False, error="mode",
                    message=f"helper at {self.socket_path} runs in {self.mode} mode but was "
                            f"asked for {request['mode']} (set helper_mode alike on both)"))
                return
            timeout = float(request.get("timeout", 0))
            if self.mode == "fd":
                await self._dial_fd(conn, netns, request["port"], request.get("pod_ip", ""),
                                    timeout)
            else:
                await self._dial_socat(conn, netns, request["port"], timeout)
        except (ConnectionError, BrokenPipeError) as e:
            log.debug("shim went away: %s", e)
        except _DialTimedOut as e:  # either mode's dial: the connect got no answer in time
            log.debug("%s in %s: dial given up, answered timeout", e, netns)
            with contextlib.suppress(OSError):
                await self._reply(conn, Reply(False, error="timeout", message=str(e)))
        except SandboxGone as e:  # either mode's dial: no network namespace at the path
            with contextlib.suppress(OSError):
                await self._reply(conn, Reply(False, error="gone", message=str(e)))
        except DialFailed as e:  # open_netns: the helper is out of descriptors or memory
            log.warning("helper request failed: %s", e)
            with contextlib.suppress(OSError):
                await self._reply(conn, Reply(False, error="internal", message=str(e)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("helper request failed")
        finally:
            conn.close()

    async def _reply(self, conn: socket.socket, reply: Reply, fds: Sequence[int] = ()) -> None:
        await send_line(conn, reply.encode(), fds)

    async def _dial_fd(self, conn: socket.socket, netns: str, port: int, pod_ip: str,
                       timeout: float = 0.0) -> None:
        try:
            sock = await _dial_in(conn, netns, port,
                                  lambda ns_fd: dial_localhost_in(ns_fd, port, pod_ip), timeout)
            if sock is None:
                return
        except DialFailed as e:
            await self._reply(conn, Reply(False, error="refused", message=str(e)))
            return
        try:
            await self._reply(conn, Reply(True, mode="fd"), [sock.fileno()])
        finally:
            sock.close()
        log.debug("dialled port %d in %s: fd passed", port, netns)

    async def _start_socat(self, ns_fd: int, target: str) -> tuple[Socat | None, str]:
        """socat connected to target inside the netns behind ns_fd (-1: the host's), or
        (None, its error text)."""
        # shut-close: the pod's EOF closes socat's stdout at once (plain "-" keeps it open)
        argv = ["socat", "-d", "-d", "-t", str(SOCAT_LINGER), "-,shut-close", target]
        if ns_fd >= 0:  # the fd open_netns checked, not the path, which may since differ
            argv = ["nsenter", f"--net=/proc/self/fd/{ns_fd}", "--", *argv]
        # a helper killed outright (SIGKILL, OOM) takes its socats with it: one left
        # connecting stayed in the pod's netns for the kernel's ~2 min of SYN retries
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        # plain pipes and subprocess.Popen: uvloop's subprocess transport keeps a copy of
        # the child's stdout, so socat's shut-close would never reach us as EOF
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w,
                                    pass_fds=(ns_fd,) if ns_fd >= 0 else ())
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        socat = Socat(proc, in_w, out_r, err_r)
        errors: list[str] = []
        try:
            while True:
                line = await socat.stderr_line()
                if not line:
                    await socat.close()
                    return None, " ".join(errors) or f"socat exited {proc.returncode}"
                text = line.decode(errors="replace").strip()
                if "starting data transfer loop" in text:
                    socat.discard_stderr()
                    return socat, ""
                if " E " in text or text.startswith(("nsenter:", "setpriv:")):
                    # "E connect(..): Connection refused"; "setpriv: unrecognized option"
                    errors.append(text.rsplit(": ", 1)[-1])
        except asyncio.CancelledError:  # the shim hung up, or the helper stops: no socat left
            await socat.close()
            raise

    async def _socat_to(self, ns_fd: int, port: int) -> tuple[Socat | None, list[str]]:
        """socat connected to port on 127.0.0.1, else ::1; or (None, why not each)."""
        reasons: list[str] = []
        for address_type, host in (("TCP4", "127.0.0.1"), ("TCP6", "[::1]")):
            socat, error = await self._start_socat(ns_fd, f"{address_type}:{host}:{port}")
            if socat is not None:
                return socat, reasons
            reasons.append(f"{host}: {error}")
        return None, reasons

    async def _dial_socat(self, conn: socket.socket, netns: str, port: int,
                          timeout: float = 0.0) -> None:
        found = await _dial_in(conn, netns, port, lambda ns_fd: self._socat_to(ns_fd, port),
                               timeout)
        if found is None:
            return
        socat, reasons = found
        if socat is None:
            await self._reply(conn, Reply(False, error="refused",
                                          message=f"connect to port {port}: " + "; ".join(reasons)))
            return
        try:
            await self._reply(conn, Reply(True, mode="socat"))
            await socat.relay(conn)
        finally:
            await socat.close()


class _DialTimedOut(Exception):
    """The connect got no answer within the request's timeout (answered "timeout")."""


async def _bounded(dial: Coroutine[None, None, T], port: int, timeout: float) -> T:
    """dial, cancelled (closing what it opened) once timeout seconds pass: _DialTimedOut."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await dial
    except TimeoutError:
        if not deadline.expired():
            raise
        raise _DialTimedOut(f"connect to port {port}: no answer after {timeout:g} s") from None


async def _dial_in(conn: socket.socket, netns: str, port: int,
                   dial: Callable[[int], Coroutine[None, None, T]],
                   timeout: float = 0.0) -> T | None:
    """dial(ns_fd) with the requested netns open (-1: the host's) for its duration, at most
    timeout seconds if given (then _DialTimedOut); None, logged, when the shim hung up
    first. SandboxGone: no netns at that path."""
    ns_fd = -1 if netns == HOST else _open_requested_netns(netns)
    try:
        attempt = dial(ns_fd)
        found = await _unless_hung_up(conn, _bounded(attempt, port, timeout) if timeout > 0
                                      else attempt)
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
    if found is None:
        log.debug("shim hung up while port %d in %s was dialled: dial dropped", port, netns)
    return found


async def _unless_hung_up(conn: socket.socket, dial: Coroutine[None, None, T]) -> T | None:
    """dial's result, or None (dial cancelled: it closed what it had opened, socket or
    socat) once the shim hangs up first (closes or half-closes conn: its dial_timeout
    passed, or its client went away). A port whose SYNs are dropped held a request slot
    and a socket (and in socat mode a socat process) here for the kernel's ~2 min of
    retries. Bytes the shim sends ahead (socat mode's traffic) are left where they are:
    not a hang-up, and no longer watched for one."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(dial)
    fd = conn.fileno()

    def readable() -> None:
        try:
            hung_up = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return
        except OSError:  # reset
            hung_up = True
        loop.remove_reader(fd)
        if hung_up and not task.done():
            task.cancel()

    loop.add_reader(fd, readable)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and (current := asyncio.current_task()) is not None \
                and not current.cancelling():
            return None  # the shim hung up; not this request being cancelled
        raise
    finally:
        loop.remove_reader(fd)


def _open_requested_netns(path: str) -> int:
    """open_netns for a path a client named. Every path that is not a network namespace
    (missing, unreadable, a FIFO, a device, /etc/shadow) gets the same answer: the helper
    runs as root, and a different one would tell any member of its socket's group which
    files exist where it cannot look."""
    try:
        return open_netns(path)
    except SandboxGone:
        raise SandboxGone(f"no network namespace at {path}") from None


# waits between looks at a killed socat: 5 ms for 1 s, then 50 ms for 10 s more
_REAP_DELAYS = (0.005,) * 200 + (0.05,) * 200


class Socat:
    """One `socat - TCP:...` child and the three pipe ends the helper holds."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin_fd: int, stdout_fd: int,
                 stderr_fd: int) -> None:
        self.proc = proc
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        for fd in (stdin_fd, stdout_fd, stderr_fd):
            os.set_blocking(fd, False)
        self._stderr = b""
        self._drain: asyncio.Task[None] | None = None

    async def _read(self, fd: int) -> bytes:
        while True:
            try:
                return os.read(fd, RELAY_CHUNK)
            except BlockingIOError:
                await wait_io(fd)

    async def stderr_line(self) -> bytes:
        """socat's next diagnostic line (b"" once it has exited)."""
        while b"\n" not in self._stderr:
            data = await self._read(self.stderr_fd)
            if not data:
                line, self._stderr = self._stderr, b""
                return line
            self._stderr += data
        line, _, self._stderr = self._stderr.partition(b"\n")
        return line + b"\n"

    def discard_stderr(self) -> None:
        async def drain() -> None:
            while await self._read(self.stderr_fd):
                pass

        self._drain = asyncio.get_running_loop().create_task(drain())

    def _close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    async def close(self) -> None:
        self._close_stdin()
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
        for name in ("stdout_fd", "stderr_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self.proc.poll() is None:
            self.proc.kill()
        # reap without blocking the loop (or a thread, which a child SIGKILL cannot end,
        # in uninterruptible sleep, would keep the helper from exiting): SIGKILL is
        # prompt, but a loaded machine may take a while to run the child's exit, and what
        # the caller logs next ("dial dropped") should be true
        for delay in _REAP_DELAYS:
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(delay)

    async def relay(self, conn: socket.socket) -> None:
        """Copy the shim's unix connection to socat's stdin and socat's stdout back, each
        direction's EOF passed on as a half-close, until both have ended."""
        loop = asyncio.get_running_loop()

        async def up() -> None:
            try:
                while True:
                    data = await loop.sock_recv(conn, RELAY_CHUNK)
                    if not data:
                        break
                    view = memoryview(data)
                    while view:
                        try:
                            view = view[os.write(self.stdin_fd, view):]
                        except BlockingIOError:
                            await wait_io(self.stdin_fd, writable=True)
            finally:
                self._close_stdin()  # socat shuts down writing towards the pod

        async def down() -> None:
            while True:
                data = await self._read(self.stdout_fd)
                if not data:
                    break
                await loop.sock_sendall(conn, data)
            with contextlib.suppress(OSError):  # the shim is gone already: nothing to end
                conn.shutdown(socket.SHUT_WR)

        tasks = [loop.create_task(up()), loop.create_task(down())]
        try:
            for task in asyncio.as_completed(tasks):
                await task  # an error in either direction ends both
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- command line --------------------------------------------------------------------------

def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "helper", help="privileged agent that dials into sandbox netns for an unprivileged shim",
        description="Listen on a unix socket; for each request enter the sandbox netns, connect "
                    "to the port and hand the connected socket back by SCM_RIGHTS (mode fd), "
                    "or relay the bytes through `nsenter ... socat` (mode socat). Run it as "
                    "root (or with CAP_SYS_ADMIN + CAP_NET_ADMIN); the shim, with runtime "
                    "plugin `helper`, then needs no privileges.")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (helper_socket, "
                   "helper_mode, helper_max_requests, log_format, log_level are used)")
    p.add_argument("--socket", dest="helper_socket", metavar="PATH",
                   help="unix socket to listen on [default: helper_socket, "
                        "/run/crishim/helper.sock]")
    p.add_argument("--mode", dest="helper_mode", choices=("fd", "socat"),
                   help="fd: pass the connected socket back; socat: relay through nsenter + "
                        "socat [default: helper_mode, fd]")
    p.add_argument("--group", default="", metavar="GROUP",
                   help="group (name or id) given the socket, so that an unprivileged shim in "
                        "that group can connect (mode 0660)")
    p.add_argument("--max-requests", dest="helper_max_requests", type=int, metavar="N",
                   help="requests served at once; in socat mode each live relay (one socat "
                        "process) is one; past it a request is answered 'busy' at once "
                        "[default: helper_max_requests, 1024]")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"),
                   help="log lines as text or one JSON object each [default: log_format, text]")
    p.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"),
                   help="least severe level logged [default: log_level, info]")
    p.set_defaults(func=cmd_helper)


def cmd_helper(args: argparse.Namespace) -> int:
    import uvloop

    from crishim import logs
    from crishim.config import load

    config = load(args.config, overrides={k: getattr(args, k) for k in (
        "helper_socket", "helper_mode", "helper_max_requests", "log_format", "log_level")})
    logs.setup(config.log_format, config.log_level)
    agent = HelperAgent(config.helper_socket, config.helper_mode, args.group,
                        config.helper_max_requests)

    async def main() -> None:
        stop = stop_on_signals()
        await agent.start()
        try:
            await stop.wait()
        finally:
            await agent.stop()

    try:
        uvloop.run(main())
    except (SocketInUse, HelperSetupError, PermissionError) as e:
        print(f"crishim helper: {e}", file=sys.stderr)
        return 1
    return 0
