"""Network namespace entry in one place: sockets created inside a netns, dialled on the loop.

A socket belongs to the netns that was current when it was created, so the thread
enters the sandbox netns only for the socket() call (setns, socket, setns back: three
non-blocking syscalls) and the connect runs asynchronously on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns as pyroute2_netns

from crishim.budget import TokenBucket
from crishim.ports import netns_path_problem
from crishim.runtime import HOST, DialFailed, Sandbox, SandboxGone, dial_target
from crishim.sysutil import LISTEN_BACKLOG, wait_io

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_local = threading.local()
T = TypeVar("T")


# ctypes setns, not pyroute2.netns.setns: 5.7 vs 7.6 us netns entry per dial
# (python3 -m benchmarks.portforward --only direct --size-mib 16)
def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _own_netns_fd() -> int:
    fd = getattr(_local, "home_fd", None)
    if fd is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _local.home_fd = fd
    return fd


NS_GET_NSTYPE = 0xB703  # ioctl(2) on a namespace fd: its CLONE_NEW* type (Linux 4.11)
_nsfs_dev: int | None = None


def _nsfs() -> int:
    """st_dev of nsfs, the filesystem every namespace file lives on."""
    global _nsfs_dev
    if _nsfs_dev is None:
        _nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    return _nsfs_dev


_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)


def _out_of_resources(e: OSError) -> None:
    """Out of descriptors or memory is this process's state, not the sandbox's: that dial
    fails (DialFailed), the sandbox is not reported gone (a fatal error to kubectl)."""
    if e.errno in _RESOURCES:
        raise DialFailed(f"crishim is out of resources: {e.strerror}") from None


def open_netns(path: str) -> int:
    """An fd for the network namespace at path; SandboxGone if there is none, or if path
    is any other file.

    The path is opened with O_PATH first, which opens nothing: a FIFO there blocked the
    whole event loop in open() until a writer came, and a device would be opened as root
    with whatever opening it does. Only once fstat shows nsfs is it opened for setns,
    through /proc/self/fd. That costs 7-10 us against 2.5-4.5 us for a plain open."""
    problem = netns_path_problem(path)
    if problem:  # every caller checks first; a NUL made open() raise ValueError
        raise SandboxGone(f"network namespace path {problem}")
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SandboxGone(f"network namespace {path} no longer exists") from None
    except OSError as e:
        _out_of_resources(e)
        raise SandboxGone(f"network namespace {path}: {e.strerror}") from None
    try:
        if os.fstat(path_fd).st_dev != _nsfs():
            raise SandboxGone(f"{path} is not a network namespace")
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        _out_of_resources(e)
        raise SandboxGone(f"network namespace {path}: {e.strerror}") from None
    finally:
        os.close(path_fd)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:  # a kernel before 4.11: setns itself refuses another namespace type
        kind = CLONE_NEWNET
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise SandboxGone(f"{path} is a namespace, but not a network namespace")
    return fd


def not_a_netns(path: str) -> bool:
    """True if path is a file that no network namespace is: a regular file, a directory,
    a FIFO (looked at without opening it: O_PATH), or a namespace of another type
    (/proc/1/ns/mnt: nsfs files are safe to open, and NS_GET_NSTYPE tells). False where
    it cannot tell (gone, hidden from this process), for the dial to find out."""
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(path_fd).st_dev != _nsfs():
            return True
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    finally:
        os.close(path_fd)
    try:
        return bool(fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET)
    except OSError:  # a kernel before 4.11: the dial's setns tells
        return False
    finally:
        os.close(fd)


def is_netns(path: str) -> bool:
    """True if path is a network namespace file (and nothing about any other file)."""
    try:
        os.close(open_netns(path))
    except SandboxGone:
        return False
    return True


def _call_in_netns(netns_fd: int, call: Callable[..., T], *args: object) -> T:
    """call(*args) with this thread inside the netns behind netns_fd, then back in its own
    (a plain call, not a context manager: it runs once per dial)."""
    home = _own_netns_fd()
    try:
        _setns(netns_fd)
    except OSError as e:
        hint = (" (entering a netns needs CAP_SYS_ADMIN; an unprivileged crishim uses the "
                "helper runtime plugin)" if e.errno == errno.EPERM else "")
        raise SandboxGone(f"cannot enter network namespace: {e.strerror}{hint}") from None
    try:
        return call(*args)
    finally:
        try:
            _setns(home)
        except OSError as e:  # the thread would stay in the sandbox: nothing safe remains
            os.write(2, f"crishim: cannot leave a sandbox netns ({e}); exiting\n".encode())
            os._exit(70)


def socket_in_netns(netns_fd: int, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket created inside the netns behind netns_fd."""
    sock = _call_in_netns(netns_fd, socket.socket, family, kind)
    sock.setblocking(False)
    return sock


def socket_at(netns_path: str, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket created inside the netns at netns_path."""
    fd = open_netns(netns_path)
    try:
        return socket_in_netns(fd, family, kind)
    finally:
        os.close(fd)


_LOCALHOST = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


def _localhost_targets(pod_ip: str) -> list[tuple[int, str]]:
    """What a dial tries, in order: 127.0.0.1, ::1, then pod_ip if given."""
    targets: list[tuple[int, str]] = list(_LOCALHOST)
    if pod_ip:
        targets.append((socket.AF_INET6 if ":" in pod_ip else socket.AF_INET, pod_ip))
    return targets


async def _connect(sock: socket.socket, addr: tuple[str, int]) -> None:
    """Non-blocking connect that does not wait a loop iteration when the kernel finished
    the handshake inside connect() (always so on loopback): first-byte latency matters."""
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        poller = select.poll()  # not select(): fds past 1023 are routine here
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            await wait_io(sock, writable=True)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _socket_in(ns_fd: int, family: int, kind: int) -> socket.socket:
    """A non-blocking socket in the netns behind ns_fd (-1: this thread's own)."""
    if ns_fd >= 0:
        return socket_in_netns(ns_fd, family, kind)
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


async def dial_localhost(netns_path: str | None, port: int, pod_ip: str = "") -> socket.socket:
    """Connect to port on localhost in the netns (None: the host's): 127.0.0.1, then ::1,
    serially; then pod_ip if given. Never a dual-stack dial that could leave the netns."""
    ns_fd = open_netns(netns_path) if netns_path else -1
    try:
        return await dial_localhost_in(ns_fd, port, pod_ip)
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)


async def dial_localhost_in(ns_fd: int, port: int, pod_ip: str = "") -> socket.socket:
    """dial_localhost in the netns behind ns_fd (-1: the host's), which stays open."""
    targets = _localhost_targets(pod_ip)
    reasons = []
    for family, host in targets:
        try:
            sock = _socket_in(ns_fd, family, socket.SOCK_STREAM)
        except OSError as e:  # e.g. no IPv6 in this netns
            reasons.append(f"{host}: {e.strerror}")
            continue
        try:
            await _connect(sock, (host, port))
        except OSError as e:
            sock.close()
            # asyncio words it "Connect call failed (addr)": name the errno instead
            reasons.append(f"{host}: {os.strerror(e.errno) if e.errno else e}")
            if e.errno in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                           errno.EAFNOSUPPORT, errno.EHOSTUNREACH):
                continue
            break
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise DialFailed(f"connect to port {port}: " + "; ".join(reasons))


def listen_in_netns(netns_path: str, host: str, port: int,
                    backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening socket inside a netns (serve_in_netns makes a server of one)."""
    sock = socket_at(netns_path, socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_in_netns(netns_path: str, host: str, port: int,
                         protocol_factory: Callable[[], asyncio.BaseProtocol]
                         ) -> asyncio.Server:
    """A TCP server listening inside a netns with the full accept queue (create_server
    listens again, with 100, unless given the backlog too)."""
    sock = listen_in_netns(netns_path, host, port)
    return await asyncio.get_running_loop().create_server(protocol_factory, sock=sock,
                                                          backlog=LISTEN_BACKLOG)


# --- UDP -------------------------------------------------------------------------------

_UDP_TABLES = ((socket.AF_INET, "/proc/thread-self/net/udp"),
               (socket.AF_INET6, "/proc/thread-self/net/udp6"))


def _proc_address(family: int, text: str) -> str:
    """An address as /proc/net/udp{,6} writes it (32-bit words in host byte order)."""
    raw = bytes.fromhex(text)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


# a /proc/net/udp{,6} row of an unconnected socket: its local address and port
_UDP_UNCONNECTED_ROW = re.compile(r"^\s*\d+: ([0-9A-F]+):([0-9A-F]{4}) [0-9A-F]+:0000 ",
                                  re.MULTILINE)


def _read_udp_listeners() -> dict[int, set[str]]:
    """Port -> addresses with an unconnected UDP socket bound to it, in the calling
    thread's netns (IPv4-mapped IPv6 addresses as IPv4; wildcards as 0.0.0.0 and ::). The
    rows are found by one regular expression over each table: the table holds every UDP
    socket of the netns, crishim's own connected flow sockets too, and splitting each row
    in Python cost ~4 us a row."""
    found: dict[int, set[str]] = {}
    for family, path in _UDP_TABLES:
        try:
            with open(path) as table:
                text = table.read()
        except OSError:  # no IPv6 in this kernel or netns
            continue
        for match in _UDP_UNCONNECTED_ROW.finditer(text):
            address = _proc_address(family, match.group(1))
            if address.startswith("::ffff:") and "." in address:
                address = address[len("::ffff:"):]
            found.setdefault(int(match.group(2), 16), set()).add(address)
    return found


# (netns device, inode) -> its tables and what reading them again may cost. The tables
# are the size of the netns's UDP socket count (4,000 flows parked by one session: 16-23 ms
# a read), and they were read per port dialled: 2,000 flows to distinct ports held the
# loop 31 s. Now one read answers every port for _LISTENERS_TTL; a port with no server
# in them is read afresh (a server started since) while the netns's re-read budget lasts:
# a scan of ports gets at most _REREADS_PER_SECOND reads a second.
_LISTENERS_TTL = 2.0
_REREADS_PER_SECOND = 2.0
_REREAD_BURST = 8
_LISTENERS_KEPT = 1024


class _Tables:
    __slots__ = ("read_at", "listeners", "rereads")

    def __init__(self) -> None:
        self.read_at = -_LISTENERS_TTL
        self.listeners: dict[int, set[str]] = {}
        self.rereads = TokenBucket(_REREADS_PER_SECOND, _REREAD_BURST)


_listeners_seen: dict[tuple[int, int], _Tables] = {}
_NONE: set[str] = set()


def forget_udp_listeners() -> None:
    """Read the tables afresh at the next dial (tests that move a server within the
    2 s an answer is kept)."""
    _listeners_seen.clear()


def udp_listeners(netns_fd: int, port: int) -> set[str]:
    """The addresses a UDP server listens on at port inside the netns behind netns_fd
    (-1: this thread's own), from its /proc tables read while the thread is inside, or
    as read within the last _LISTENERS_TTL seconds."""
    st = os.fstat(netns_fd) if netns_fd >= 0 else os.stat("/proc/thread-self/ns/net")
    key = (st.st_dev, st.st_ino)
    tables = _listeners_seen.get(key)
    if tables is None:
        if len(_listeners_seen) >= _LISTENERS_KEPT:
            _listeners_seen.clear()
        tables = _listeners_seen[key] = _Tables()
    now = time.monotonic()
    if now - tables.read_at >= _LISTENERS_TTL or (
            port not in tables.listeners and tables.rereads.take()):
        tables.listeners = _read_udp_listeners_in(netns_fd)
        tables.read_at = now
    return tables.listeners.get(port, _NONE)


def _read_udp_listeners_in(netns_fd: int) -> dict[int, set[str]]:
    if netns_fd < 0:
        return _read_udp_listeners()
    return _call_in_netns(netns_fd, _read_udp_listeners)


def _serves(listeners: set[str], family: int, host: str) -> bool:
    if family == socket.AF_INET:  # a dual-stack [::] socket takes IPv4 as well
        return bool(listeners & {host, "0.0.0.0", "::"})
    return bool(listeners & {host, "::"})


def dial_udp_localhost(netns_path: str | None, port: int, pod_ip: str = "") -> socket.socket:
    """A non-blocking UDP socket connected to port on localhost in the netns (None: the
    host's). UDP has no handshake to refuse, so the target is the first of 127.0.0.1, ::1
    (then pod_ip if given) with a server bound to it; with none, 127.0.0.1, whose ICMP port
    unreachable then ends the flow as a refused TCP dial would."""
    targets = _localhost_targets(pod_ip)
    ns_fd = open_netns(netns_path) if netns_path else -1
    reasons = []
    try:
        listeners = udp_listeners(ns_fd, port)
        served = [t for t in targets if _serves(listeners, *t)]
        for family, host in served + [t for t in targets if t not in served]:
            try:
                sock = _socket_in(ns_fd, family, socket.SOCK_DGRAM)
            except OSError as e:  # e.g. no IPv6 in this netns
                reasons.append(f"{host}: {e.strerror}")
                continue
            try:
                sock.connect((host, port))  # no packet sent: only sets the peer address
            except OSError as e:
                sock.close()
                reasons.append(f"{host}: {e.strerror or e}")
                continue
            return sock
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
    raise DialFailed(f"udp port {port}: " + "; ".join(reasons))


class InProcessDial:
    """RuntimePlugin.dial and dial_udp for plugins that enter the sandbox netns in this
    process (list it before RuntimePlugin among the bases)."""

    supports_udp = True
    pod_ip_fallback = False  # the plugin sets it from the config

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        netns_path, pod_ip = dial_target(sandbox, self.pod_ip_fallback)
        return await dial_localhost(None if netns_path == HOST else netns_path, port, pod_ip)

    async def dial_udp(self, sandbox: Sandbox, port: int) -> socket.socket:
        netns_path, pod_ip = dial_target(sandbox, self.pod_ip_fallback)
        return dial_udp_localhost(None if netns_path == HOST else netns_path, port, pod_ip)


def bind_udp_in_netns(netns_path: str, host: str, port: int) -> socket.socket:
    """A UDP socket bound inside a netns (the demo's echo server, test servers)."""
    sock = socket_at(netns_path, socket.AF_INET6 if ":" in host else socket.AF_INET,
                     socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _bring_loopback_up(netns_path: str) -> None:
    """ifconfig lo up inside the netns: an interface ioctl acts in its socket's netns."""
    with socket_at(netns_path, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def create_named_netns(name: str, netns_dir: str = "/var/run/netns") -> str:
    """Create a named netns with lo up, as `ip netns add NAME` does. pyroute2 first makes
    netns_dir a shared mount (bind-mounting it onto itself if it is not a mount point
    yet), as iproute2 does, so that every netns mounted in it afterwards unmounts cleanly
    whoever else runs `ip netns add`; then it bind-mounts a new netns onto netns_dir/NAME
    from a forked child."""
    os.makedirs(netns_dir, exist_ok=True)
    path = os.path.join(netns_dir, name)
    try:
        # our libc handle: pyroute2's own lookup (find_library) would run in the forked child
        pyroute2_netns.create(path, libc=_libc)
    except OSError as e:
        if os.path.lexists(path) and not os.path.ismount(path):
            os.unlink(path)  # the mount point a failed create left behind
        raise OSError(e.errno, f"cannot create network namespace {path}: "
                               f"{os.strerror(e.errno) if e.errno else e}") from None
    try:
        _bring_loopback_up(path)
    except BaseException:
        delete_named_netns(name, netns_dir)
        raise
    return path


def delete_named_netns(name: str, netns_dir: str = "/var/run/netns") -> bool:
    """Remove a named netns as `ip netns delete NAME` does (detach its mount, unlink the
    file); False if there was none. A file that cannot be removed raises OSError with its
    path and errno: EBUSY means a copy of its mount still sits under a bind mount of
    netns_dir made after it was created (by an `ip netns add` of an older crishim's era)."""
    path = os.path.join(netns_dir, name)
    if not os.path.lexists(path):
        return False
    try:
        pyroute2_netns.remove(path, libc=_libc)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise OSError(e.errno, f"cannot delete network namespace {path}: "
                               f"{os.strerror(e.errno) if e.errno else e}") from None
    return True
