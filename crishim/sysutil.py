"""Unix socket files, signals and descriptor limits, shared by `crishim serve` and
`crishim helper`."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable

log = logging.getLogger("crishim")

# The accept queue every TCP listener of crishim's asks for (the kernel caps it at
# net.core.somaxconn), as Go's listeners do. asyncio's create_server re-listens with 100
# unless told: a burst of connects then loses SYNs and each waits the 1 s retransmission
# (200 connections at once through crishim port-forward: 1.07 s instead of 0.12).
LISTEN_BACKLOG = 4096


async def wait_io(sock: socket.socket | int, writable: bool = False) -> None:
    """Until sock (or an fd) is readable (or writable) on the running loop."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = sock if isinstance(sock, int) else sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def read_now(transport: asyncio.BaseTransport, limit: int) -> bytes:
    """What the peer of a just-accepted plain TCP connection sent before it was accepted,
    read at once from the socket rather than on the loop's next turn (b"" if nothing
    yet; after a reset or an EOF the transport finds it). Most clients speak first (an
    upgrade request, a forwarded client's request): handled in the accept's callback,
    it saves the loop a turn and the process a wake-up on the first bytes' way
    (benchmarks.probe --first-byte). The transport reads on from where this stopped.
    Never for a TLS transport: its socket carries records, not the peer's bytes."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return b""
    try:
        return os.read(sock.fileno(), limit)
    except OSError:  # nothing yet (EAGAIN)
        return b""


class SocketInUse(Exception):
    """A live server already answers on the socket path (or the path is not a socket)."""


MAX_SOCKET_PATH = 107  # bytes: sockaddr_un's sun_path is 108, with its NUL


def socket_path_problem(path: str) -> str:
    """Why bind() or connect() cannot take `path` as a unix socket address (gRPC's C core
    printed a dump of errors for one), or ""."""
    if "\0" in path:
        return f"{path[:40]!r}: a unix socket path cannot contain a NUL byte"
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH:
        return ""
    return f"{path[:40]}…: a unix socket path of {size} bytes; at most {MAX_SOCKET_PATH} fit"


def prepare_socket_path(path: str) -> None:
    """Create the parent directory (0755 at most: the umask may narrow it, never widen
    it); replace a stale socket file; refuse a live one, and a path bind() cannot take."""
    problem = socket_path_problem(path)
    if problem:
        raise SocketInUse(problem)
    missing = []
    directory = os.path.dirname(os.path.abspath(path))
    while directory and not os.path.isdir(directory):
        missing.append(directory)  # os.makedirs gives only the last one its mode
        directory = os.path.dirname(directory)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:  # made meanwhile by another, or a file of that name
            pass
        except OSError as e:
            raise SocketInUse(f"{path}: cannot create {directory} ({e.strerror})") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _try_bind(path)
        return
    except OSError as e:  # ENOTDIR: a file where a directory should be
        raise SocketInUse(f"{path}: cannot listen there ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # stale: nobody listens
            return
        raise SocketInUse(f"{path}: cannot tell whether it is in use ({e.strerror})") from None
    finally:
        probe.close()
    raise SocketInUse(f"another server is already listening on {path}; stop it or choose "
                      "another --socket")


def _try_bind(path: str) -> None:
    """Bind path once and let it go: a directory that takes no sockets (/proc, a read-only
    mount) is one clear line here, where gRPC printed C-core errors and raised
    RuntimeError."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(path)
    except OSError as e:
        raise SocketInUse(f"{path}: cannot listen there ({e.strerror})") from None
    finally:
        probe.close()
    os.unlink(path)


def remove_socket_file(path: str) -> None:
    """Unlink path if it is (still) a socket; anything else put there is left alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals(again: Callable[[signal.Signals], None] | None = None) -> asyncio.Event:
    """An event that SIGINT, SIGTERM or SIGHUP sets, handled on the running loop from now
    on; `again` is called for each one after the first (a second Ctrl-C while draining).
    SIGHUP (the terminal closed) killed the process outright: no drain, the socket file
    and the demo's netns left behind."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def received(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s received", sig.name)
            stop.set()
        elif again is not None:
            again(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, received, sig)
    return stop


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each forwarded connection holds a
    descriptor); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
    return soft
