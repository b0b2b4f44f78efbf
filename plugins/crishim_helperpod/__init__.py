"""Helper-pod runtime: a privileged `crishim helper` dials into the sandbox; the shim needs no
privileges.

Sandboxes resolve as in the netns plugin (a named netns under netns_dir, or the explicit
`sandboxes` map), or through the upstream runtime's PodSandboxStatus as the containerd
plugin does when upstream_endpoint is set (both lookups live in crishim.sandboxes). The
shim never opens the netns: it only checks that the path exists and looks like one (an
O_PATH look at its filesystem), and when it may not look (a /proc/<pid>/ns/net of another
user) or its view says no namespace (its mounts need not follow the host's) it asks the
helper. Each dial is one unix
connection to helper_socket (protocol: crishim.helper.protocol). In helper_mode fd the
connected TCP socket comes back by SCM_RIGHTS; in socat mode the unix connection itself
carries the bytes. A helper that is down or restarting fails only the dials made
meanwhile, with DialFailed("helper at PATH unavailable: ..."); the next dial connects
afresh.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat

from crishim.config import Config
from crishim.helper.protocol import (
    ProtocolError,
    Reply,
    encode_request,
    read_line,
    send_line,
)
from crishim.netns import not_a_netns
from crishim.runtime import (
    HOST,
    DialFailed,
    DialTimedOut,
    DialUnavailable,
    RuntimePlugin,
    Sandbox,
    SandboxGone,
    SandboxNotFound,
    dial_target,
)
from crishim.sandboxes import NamedSandboxes, UpstreamSandboxes


class HelperUnavailable(DialUnavailable):
    """The helper's socket does not answer (not started, restarting, crashed)."""


class HelperPodRuntime(RuntimePlugin):
    """Dials through `crishim helper` (SCM_RIGHTS fd passing, or nsenter + socat)."""

    name = "helper"

    def __init__(self, config: Config) -> None:
        self.names = NamedSandboxes(config.netns_dir, config.sandboxes)
        # with an upstream runtime, sandboxes are found as the containerd plugin finds them
        self.upstream = (UpstreamSandboxes(config.upstream_endpoint)
                         if config.upstream_endpoint else None)
        self.socket_path = config.helper_socket
        self.mode = config.helper_mode
        self.pod_ip_fallback = config.pod_ip_fallback
        # the helper's connect and answer: a dial's own bound (it enters the netns and
        # connects for us); stream_creation_timeout is about stream pairs, not helpers
        self.timeout = config.dial_timeout
        # a dial's answer is waited for until dial_timeout less this, and the helper's
        # connect is given this less again: a pod's port that never answers is then the
        # helper's "timeout" answer, and a helper that never answers is told apart from
        # it, both before the shim's own dial_timeout ends the dial with neither said
        # (at least 50 ms where dial_timeout allows: a 2 ms margin flipped on a busy node)
        self.margin = min(1.0, max(self.timeout / 10, min(0.05, self.timeout / 4)))
        # the helper bounds its dials (Reply.bounds_dials, learnt from its last reply); an
        # older one's silence may be a port it still dials, which is no stuck helper (a
        # rolling upgrade, the shim first). None: not heard from yet (see _learn_bounds)
        self.helper_bounds_dials: bool | None = None

    async def resolve(self, sandbox_id: str) -> Sandbox:
        if self.upstream is not None and sandbox_id not in self.names:
            return await self.upstream.resolve(sandbox_id)
        try:
            return self.names.resolve(sandbox_id)
        except (SandboxNotFound, SandboxGone):
            path = self.names.path_of(sandbox_id)  # never HOST: that resolves without error
            if path is None or not (_hidden_from_us(path) or not_a_netns(path)):
                raise
            try:
                exists = await self.exists(path)
            except DialFailed as e:
                raise SandboxNotFound(f"sandbox {sandbox_id!r}: cannot check {path} "
                                      f"({e})") from None
            if not exists:
                raise
            return Sandbox(sandbox_id, netns_path=path)

    async def close(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()

    async def exists(self, netns_path: str) -> bool:
        """Ask the helper whether a netns path exists (for paths the shim may not stat)."""
        reply = await self._exists_reply(netns_path)
        if not reply.ok:
            raise DialFailed(f"helper at {self.socket_path}: {reply.message}")
        return bool(reply.exists)

    # no UDP (RuntimePlugin's supports_udp False): the helper's protocol passes back
    # connected TCP sockets (fd mode) or relays one byte stream (socat mode)

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        netns, pod_ip = dial_target(sandbox, self.pod_ip_fallback)
        loop = asyncio.get_running_loop()
        answer_by = loop.time() + self.timeout - self.margin
        if self.helper_bounds_dials is None:
            await self._learn_bounds(netns, answer_by)
        conn = await self._connect()
        fds: list[int] = []
        keep = False
        try:
            # a helper known to bound its dials is stuck past its timeout and a margin;
            # an older one is waited for as long as the dial may take (the shim's own
            # dial_timeout ends it first, as "no answer" from the pod's port)
            wait = (answer_by - loop.time(), self.timeout - self.margin) \
                if self.helper_bounds_dials else None
            reply, fds = await self._ask(
                conn, encode_request("dial", netns, port, self.mode, pod_ip,
                                     timeout=self.timeout - 2 * self.margin),
                max_fds=1, wait=wait)
            if not reply.ok:
                if self.upstream is not None:
                    self.upstream.forget(sandbox.id)  # the next resolve asks the runtime
                if reply.error == "gone":
                    raise SandboxGone(reply.message)
                if reply.error == "timeout":  # the pod's port, not the helper
                    raise DialTimedOut(reply.message)
                raise DialFailed(reply.message or f"helper error {reply.error}")
            if reply.mode != self.mode:  # its own bytes would be forwarded as the pod's
                raise DialFailed(f"helper at {self.socket_path} answered in "
                                 f"{reply.mode or 'no'} mode; this shim asked for {self.mode}")
            if reply.mode == "socat":
                keep = True  # the unix connection itself carries the bytes
                return conn
            if len(fds) != 1:
                raise DialFailed(f"helper at {self.socket_path} answered without a socket")
            sock = self._pod_socket(fds[0], port)
            fds.clear()  # the socket owns it now
            return sock
        finally:
            for fd in fds:  # any the reply brought that no socket took
                os.close(fd)
            if not keep:
                conn.close()

    async def _learn_bounds(self, netns: str, answer_by: float) -> None:
        """The helper not heard from yet: ask it what every version answers at once (does
        the dial's netns exist), by answer_by. No answer is a stuck helper, whatever its
        version (HelperUnavailable, as a dial's silence); the answer says whether it bounds
        its dials (_ask learns it from every reply)."""
        await self._exists_reply("/proc/self/ns/net" if netns == HOST else netns,
                                 (answer_by - asyncio.get_running_loop().time(),
                                  self.timeout - self.margin))

    async def _exists_reply(self, netns_path: str, wait: tuple[float, float] | None = None
                            ) -> Reply:
        """The helper's answer to "exists" for netns_path, waited for `wait` (see _ask)."""
        conn = await self._connect()
        try:
            reply, _ = await self._ask(conn, encode_request("exists", netns_path), wait=wait)
        finally:
            conn.close()
        return reply

    def _pod_socket(self, fd: int, port: int) -> socket.socket:
        """The connected TCP socket a helper passed as fd, or DialFailed with fd still the
        caller's to close: a pipe made socket() raise ENOTSOCK once the fd had left the list
        that closes it (a traceback and a leaked fd per dial), and a UDP socket was
        forwarded as the pod's TCP connection."""
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise DialFailed(f"helper at {self.socket_path} passed a descriptor that is not "
                             "a socket")
        try:
            sock = socket.socket(fileno=fd)  # family and type as the kernel reports them
        except OSError as e:  # a family Python cannot make a socket object of
            raise DialFailed(f"helper at {self.socket_path} passed a socket of no usable "
                             f"kind ({e.strerror or e})") from None
        peer = _peer(sock) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        if not (sock.type == socket.SOCK_STREAM and peer is not None):
            kind = f"{sock.family.name}/{sock.type.name}"
            sock.detach()
            raise DialFailed(f"helper at {self.socket_path} passed a {kind} socket, not a "
                             "connected TCP socket")
        peer_port = peer[1]
        if peer_port != port:  # another service's bytes would be forwarded as the pod's
            sock.detach()
            raise DialFailed(f"helper at {self.socket_path} passed a socket connected to "
                             f"port {peer_port}, not to port {port}")
        sock.setblocking(False)
        return sock

    async def _connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(conn, self.socket_path),
                                   self.timeout)
        except (OSError, TimeoutError) as e:
            conn.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise HelperUnavailable(f"helper at {self.socket_path} unavailable: {reason}") \
                from None
        return conn

    async def _ask(self, conn: socket.socket, request: bytes, max_fds: int = 0,
                   wait: tuple[float, float] | None = None) -> tuple[Reply, list[int]]:
        """The helper's reply to request, waited for `wait`: (seconds left, the whole wait
        the message names), or dial_timeout. No reply in time: the helper is stuck (a
        dial's connect is bounded by the helper itself, which then answers "timeout")."""
        left, whole = wait or (self.timeout, self.timeout)
        try:
            try:
                await send_line(conn, request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a busy helper answers and closes without reading: its reply is there
            line, fds = await asyncio.wait_for(read_line(conn, max_fds), max(left, 0))
        except TimeoutError:
            raise HelperUnavailable(f"helper at {self.socket_path} did not answer within "
                                    f"{whole:g}s") from None
        except (OSError, EOFError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise HelperUnavailable(f"helper at {self.socket_path} unavailable: {reason}") \
                from None
        except ProtocolError as e:
            raise DialFailed(f"helper at {self.socket_path}: {e}") from None
        try:
            reply = Reply.decode(line)
        except ProtocolError as e:
            for fd in fds:
                os.close(fd)
            raise DialFailed(f"helper at {self.socket_path}: {e}") from None
        self.helper_bounds_dials = reply.bounds_dials
        return reply, fds


def _peer(sock: socket.socket) -> tuple[str, int] | None:
    """The address sock is connected to; None if it is not (never connected, listening,
    or reset meanwhile)."""
    try:
        peer: tuple[str, int] = sock.getpeername()[:2]
    except OSError:  # ENOTCONN
        return None
    return peer


def _hidden_from_us(path: str) -> bool:
    """True when this process may not look at path (so only the helper can tell)."""
    try:
        os.stat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def factory(config: Config) -> HelperPodRuntime:
    return HelperPodRuntime(config)
