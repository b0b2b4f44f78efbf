"""`crishim port-forward SANDBOX [LOCAL:]REMOTE ...`: kubectl port-forward's behaviour and
output, straight against a CRI runtime endpoint (or, with --kubeconfig, through an API
server's pods/portforward: crishim/client/cluster.py opens those sessions)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from crishim.budget import TokenBucket
from crishim.client.cri import CriClient, CriError
from crishim.client.transports import (
    OPEN_AHEAD_AFTER_REPLY,
    ClientSession,
    ForwardError,
    ForwardStream,
    SessionError,
    UdpNotSupported,
    UpgradeRefused,
    open_session,
)
from crishim.client.udp import MAX_FLOWS, FlowLimit, UdpListener
from crishim.flow import plain_socket_fd, read_buffer, write_lent
from crishim.ports import shown
from crishim.protocols.constants import DIAL_ON_DATA, HEADER_CRISHIM_DIAL
from crishim.sysutil import LISTEN_BACKLOG, read_now

# (transport, ports, ping_interval) -> a new session to the pod: where the stream comes
# from (a CRI PortForward URL, an API server) is the opener's business
SessionOpener = Callable[[str, list[int], float], Awaitable[ClientSession]]


# A spare stream URL older than this is not used: well within the lifetime of stream
# tokens (crishim 60 s, the kubelet's 30 s).
SPARE_URL_MAX_AGE = 10.0
# The spare is asked for when the connection that used the last one has its first bytes
# back, or this long after it opened, whichever is first (seconds).
SPARE_FETCH_DELAY = 0.1
EARLY_READ = 64 * 1024  # read at accept, to go out with the streams' opening frames


class CriOpener:
    """Sessions to the stream URL the runtime's CRI PortForward issues for `sandbox` (a
    SessionOpener; `close()` ends what it holds for later connections).

    The WebSocket channel protocol takes a session, so a CRI call and an upgrade, per
    connection. The next connection's to the same ports is prepared while this one is
    used, once this one's first bytes have come back (OPEN_AHEAD_AFTER_REPLY after its
    reply, at its end, or SPARE_FETCH_DELAY after it opened, whichever is first: the CRI
    call's thread, and crishim serve's answering it, took the GIL from the first byte's
    way). Against a stream server whose 101 says how it dials (Crishim-Dial: crishim
    serve's), the next session itself is opened ahead with Crishim-Dial: on-data: its
    ports are dialled at the connection's first message, so the connection costs a
    frame, not a CRI call, a TCP connect, an upgrade and a session's start; elsewhere
    the next URL is fetched ahead. A connection that comes before its spare was asked
    for asks at once; a spare that is too old (a URL), refused by the CRI, no longer
    redeemable (404) or closed by the server meanwhile is replaced by a fresh one."""

    def __init__(self, cri: CriClient, sandbox: str, insecure: bool = False,
                 ca_file: str | None = None, timeout: float = 10.0) -> None:
        self.cri = cri
        self.sandbox = sandbox
        self.insecure = insecure
        self.ca_file = ca_file
        self.timeout = timeout  # connect and upgrade answer (--timeout)
        # by ports: when it was asked for, and a URL or a session opened ahead
        self._spares: dict[tuple[int, ...],
                           tuple[float, asyncio.Future[str | ClientSession]]] = {}
        self._wanted: dict[tuple[int, ...], asyncio.TimerHandle] = {}  # not asked for yet
        self.opens_ahead = False  # the stream server's last 101 said how it dials

    async def __call__(self, transport: str, ports: list[int], ping_interval: float
                       ) -> ClientSession:
        if transport != "websocket":
            return await open_session(await self._fetch(ports), transport, ports,
                                      ping_interval=ping_interval, insecure=self.insecure,
                                      ca_file=self.ca_file, timeout=self.timeout)
        spare = await self._take_spare(ports)
        session = spare if isinstance(spare, ClientSession) else None
        if isinstance(spare, str):
            try:
                session = await self._channels(spare, ports, ping_interval)
            except UpgradeRefused as e:
                if e.status != 404:  # only an expired or spent spare is worth a retry
                    raise
        if session is None:
            session = await self._channels(await self._fetch(ports), ports, ping_interval)
        self._want_spare(ports, session)
        return session

    async def check_sandbox(self, ports: list[int]) -> None:
        """Before listening: the runtime's CRI PortForward for `ports`, so a sandbox it
        does not know is reported at once. No upgrade: a stream server that does not dial
        on data (containerd's, CRI-O's) dials the pod at the upgrade, and kubectl makes
        no pod connection before a local client does. The URL is the first connection's
        spare while it is fresh (SPARE_URL_MAX_AGE)."""
        url = await self._fetch(ports)
        loop = asyncio.get_running_loop()
        spare: asyncio.Future[str | ClientSession] = loop.create_future()
        spare.set_result(url)
        self._spares[tuple(ports)] = (loop.time(), spare)

    def close(self) -> None:
        self.cri.cancel_calls()  # a spare's, or the first one's at Ctrl-C: not waited for
        for timer in self._wanted.values():
            timer.cancel()
        self._wanted.clear()
        for _, spare in self._spares.values():
            spare.add_done_callback(_close_unused)
            spare.cancel()
        self._spares.clear()

    async def sandbox_problem(self, ports: list[int], since: float) -> CriError | None:
        """After a connection to `ports` failed (at loop time `since`): the runtime's
        CriError if its CRI call for their next session, asked at or after `since` (the
        spare's, kept for the next connection), says the sandbox is lost; else None."""
        key = tuple(ports)
        entry = self._spares.get(key)
        if entry is not None and entry[0] >= since:
            spare = entry[1]
        else:  # none, or asked before the failure: asked again now
            timer = self._wanted.pop(key, None)
            if timer is not None:
                timer.cancel()
            spare = self._ask_spare(ports)  # the one asked before closed
        await asyncio.wait([spare])  # not cancelled with this task: the next connection's
        if spare.cancelled():
            return None
        problem = spare.exception()
        return problem if isinstance(problem, CriError) and problem.sandbox_lost else None

    # --- the next connection's ----------------------------------------------------------
    def _fetch(self, ports: list[int]) -> asyncio.Future[str]:
        return asyncio.get_running_loop().run_in_executor(None, self.cri.port_forward,
                                                          self.sandbox, ports)

    async def _channels(self, url: str, ports: list[int], ping_interval: float,
                        ahead: bool = False) -> ClientSession:
        headers = [(HEADER_CRISHIM_DIAL, DIAL_ON_DATA)] if ahead else []
        session = await open_session(url, "websocket", ports, ping_interval=ping_interval,
                                     insecure=self.insecure, ca_file=self.ca_file,
                                     headers=headers, timeout=self.timeout)
        self.opens_ahead = bool(session.dial)
        if ahead and session.dial != DIAL_ON_DATA:  # dialled already: no connection's yet
            session.close()
            raise SessionError(f"the stream server answered {HEADER_CRISHIM_DIAL}: "
                               f"{session.dial!r}")
        return session

    async def _open_ahead(self, ports: list[int]) -> ClientSession:
        return await self._channels(await self._fetch(ports), ports, 0, ahead=True)

    async def _take_spare(self, ports: list[int]) -> str | ClientSession | None:
        self._fetch_spare(ports)  # wanted and not asked for yet: now
        entry = self._spares.pop(tuple(ports), None)
        if entry is None:
            return None
        asked, future = entry
        try:
            spare = await future
        except (CriError, SessionError):
            return None
        if isinstance(spare, str):
            return spare if asyncio.get_running_loop().time() - asked <= SPARE_URL_MAX_AGE \
                else None
        return None if spare.closed.done() else spare

    def _want_spare(self, ports: list[int], session: ClientSession) -> None:
        key = tuple(ports)
        timer = self._wanted.pop(key, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._wanted[key] = loop.call_later(SPARE_FETCH_DELAY, self._fetch_spare, ports)
        # after the reply has reached the local client: it shares the core
        session.replied.add_done_callback(
            lambda _: loop.call_later(OPEN_AHEAD_AFTER_REPLY, self._fetch_spare, ports))

    def _fetch_spare(self, ports: list[int]) -> None:
        key = tuple(ports)
        timer = self._wanted.pop(key, None)
        if timer is None:
            return  # asked for already
        timer.cancel()
        if key not in self._spares:  # one waits already (connections that came together)
            self._ask_spare(ports)

    def _ask_spare(self, ports: list[int]) -> asyncio.Future[str | ClientSession]:
        replaced = self._spares.get(tuple(ports))
        if replaced is not None:  # never left open: a session ahead holds a server's slot
            replaced[1].add_done_callback(_close_unused)
            replaced[1].cancel()
        spare: asyncio.Future[str | ClientSession]
        if self.opens_ahead:
            spare = asyncio.ensure_future(self._open_ahead(ports))
        else:
            spare = cast("asyncio.Future[str | ClientSession]", self._fetch(ports))
        spare.add_done_callback(lambda f: f.cancelled() or f.exception())  # unused: no error
        self._spares[tuple(ports)] = (asyncio.get_running_loop().time(), spare)
        return spare


def _close_unused(spare: asyncio.Future[str | ClientSession]) -> None:
    if not spare.cancelled() and spare.exception() is None:
        session = spare.result()
        if isinstance(session, ClientSession):
            session.close()


def cri_opener(cri: CriClient, sandbox: str, insecure: bool = False,
               ca_file: str | None = None, timeout: float = 10.0) -> CriOpener:
    """Sessions to the stream URL the runtime's CRI PortForward issues for `sandbox`;
    `timeout` bounds each connect and upgrade answer."""
    return CriOpener(cri, sandbox, insecure, ca_file, timeout)


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 1."""


class ListenError(UsageError):
    """A port spec none of whose addresses could be used: `why` names each, with the
    reason."""

    def __init__(self, why: str) -> None:
        super().__init__(f"unable to listen on {why}")
        self.why = why


@dataclass(frozen=True)
class NamedPort:
    """A remote port given by name (--kubeconfig only): a container port's `name` in the
    pod's spec, resolved to its `containerPort` once the pod is fetched."""

    name: str
    # the container port's protocol a `/tcp` or `/udp` suffix asks for; None (no suffix):
    # any, as kubectl matches names
    protocol: str | None = None
    # kubectl's rule: the local port given as the same text (`http`, `http:http`) is the
    # resolved number
    local_is_remote: bool = False


@dataclass
class PortSpec:
    local: int
    remote: int  # 0 while `named` is unresolved
    protocol: str = "tcp"  # or "udp" (crishim's extension, portforward.crishim.dev/v1)
    named: NamedPort | None = None
    # the spec's text ended in /tcp or /udp: a service's port of that protocol is asked for
    protocol_given: bool = field(default=False, compare=False)

    @property
    def remote_text(self) -> str:
        """The remote port as the output names it: `53/udp`; TCP ports bare, as kubectl."""
        return f"{self.remote}/udp" if self.protocol == "udp" else str(self.remote)


def _is_digits(text: str) -> bool:
    # ASCII only, as kubectl and crishim.ports.parse_port: '٨٠٨٠'.isdigit() too
    return text.isascii() and text.isdigit()


def _is_number_attempt(text: str) -> bool:
    """What kubectl's strconv.Atoi takes for a number (a sign, then digits): never a name."""
    return _is_digits(text[1:] if text[:1] in ("+", "-") else text)


def _could_be_port_name(text: str) -> bool:
    """An IANA service name, the only names the API server lets a container port have:
    lowercase letters, digits and single inner hyphens, at least one letter, 15 at most."""
    return (len(text) <= 15 and text.isascii() and text.islower()
            and text.replace("-", "").isalnum() and "--" not in text
            and any(c.isalpha() for c in text)
            and not text.startswith("-") and not text.endswith("-"))


def parse_port_spec(text: str, names: bool = False) -> PortSpec:
    """`5000`, `6000:5000`, `:5000`, `0:5000` (0 or empty: a free local port), each
    optionally ending in `/tcp` (the default) or `/udp`. With `names` (--kubeconfig) a
    remote port that is not a number is a container port's name (`http`, `8080:http`),
    left for resolve_named_ports; the local port stays a number, except that the same
    text as the remote (`http`, `http:http`) takes the resolved number, as kubectl."""
    spec = shown(text, 40)
    ports_text, slash, protocol = text.rpartition("/")
    if not slash:
        ports_text, protocol = text, "tcp"
    elif protocol not in ("tcp", "udp"):
        raise UsageError(f"invalid port spec {spec}: protocol {protocol!r} is not tcp or "
                         "udp")
    local_text, sep, remote_text = ports_text.partition(":")
    if not sep:
        local_text = remote_text = ports_text
    if ":" in remote_text or "/" in ports_text:
        raise UsageError(f"invalid port spec {spec}: expected [LOCAL:]REMOTE[/tcp|/udp]")
    named: NamedPort | None = None
    if remote_text and not _is_number_attempt(remote_text):
        if not names and _could_be_port_name(remote_text):
            raise UsageError(f"invalid port spec {spec}: remote port {shown(remote_text)} "
                             "is not a number (a named port needs --kubeconfig: only the "
                             "pod's spec names its ports)")
        if names:
            named = NamedPort(remote_text, protocol if slash else None,
                              local_is_remote=local_text == remote_text)
            if named.local_is_remote:
                local_text = "0"  # the resolved number, once known
            remote_text = "1"  # a placeholder that passes the checks below
    if local_text == "":
        local_text = "0"
    for what, value in (("local", local_text), ("remote", remote_text)):
        if not _is_digits(value):
            raise UsageError(f"invalid port spec {spec}: {what} port {shown(value)} is not a "
                             "number")
    local, remote = _port_value(local_text), _port_value(remote_text)
    if local > 65535:
        raise UsageError(f"invalid port spec {spec}: local port {_cut(local_text)} is not "
                         "in 0..65535")
    if not 1 <= remote <= 65535:
        raise UsageError(f"invalid port spec {spec}: remote port {_cut(remote_text)} is not "
                         "in 1..65535")
    if named:
        return PortSpec(local, 0, protocol, named, protocol_given=bool(slash))
    return PortSpec(local, remote, protocol, protocol_given=bool(slash))


def _cut(digits: str) -> str:
    return digits if len(digits) <= 12 else digits[:11] + "…"


def _port_value(digits: str) -> int:
    """The number, or 65536 for any longer one (int() refuses over 4300 digits)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 5 else 65536


def parse_port_specs(texts: list[str], names: bool = False) -> list[PortSpec]:
    """Every spec of a command; a local port given twice for one protocol is refused up
    front, not after 'Forwarding from' when its second listener finds it taken. With
    `names`, see parse_port_spec; a local port a name gives is checked by
    refuse_repeated_local_ports once resolved."""
    specs = [parse_port_spec(text, names) for text in texts]
    refuse_repeated_local_ports(texts, specs)
    return specs


def refuse_repeated_local_ports(texts: list[str], specs: list[PortSpec]) -> None:
    """UsageError for a local port given twice for one protocol (0, or one not yet
    resolved, is no port yet)."""
    seen: dict[tuple[int, str], str] = {}
    for text, spec in zip(texts, specs):
        key = (spec.local, spec.protocol)
        if spec.local and key in seen:
            raise UsageError(f"invalid port specs {shown(seen[key])} and {shown(text)}: "
                             f"local port {spec.local}"
                             f"{'/udp' if spec.protocol == 'udp' else ''} is given twice")
        seen.setdefault(key, text)


@dataclass(frozen=True)
class ListenAddress:
    """One local address to listen on, as kubectl's --address names it."""

    text: str  # as given: the Forwarding lines show it so
    bind: str  # what the socket binds: an IPv4-mapped IPv6 address binds its IPv4 address
    family: socket.AddressFamily
    # one of localhost's two: passed over when it cannot be bound while the other binds
    # (kubectl's failure mode "all"); any other address that cannot be bound is an error
    localhost: bool


def listen_addresses(addresses: list[str] | None) -> list[ListenAddress]:
    """kubectl's --address (parseAddresses): `localhost` (127.0.0.1 and ::1) or IP
    literals, repeatable or comma-separated, listened on in the order kubectl sorts them;
    anything else is a UsageError (`X is not a valid IP`), as kubectl refuses it."""
    given = ["localhost"] if addresses is None else \
        [item for value in addresses if value for item in value.split(",")]
    if not given:  # --address '': kubectl's words
        raise UsageError("you must specify at least 1 address")
    chosen: dict[str, ListenAddress] = {}
    for text in given:
        if text == "localhost":
            for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
                chosen.setdefault(host, ListenAddress(host, host, family, localhost=True))
            continue
        try:
            if "%" in text:  # a zone: ipaddress takes it, kubectl does not
                raise ValueError(text)
            ip = ipaddress.ip_address(text)
        except ValueError:
            shown_text = text if text.isprintable() and len(text) <= 64 else shown(text, 64)
            raise UsageError(f"{shown_text} is not a valid IP") from None
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        if mapped is not None:  # kubectl listens on tcp4 for it, the line shows it as given
            chosen[text] = ListenAddress(text, str(mapped), socket.AF_INET, localhost=False)
        else:
            chosen[text] = ListenAddress(
                text, text, socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                localhost=False)
    return [chosen[text] for text in sorted(chosen)]


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# E lines for failed UDP flows (every local peer is a flow: a flood of peers past the
# server's limits is a flood of failures); the rest are counted in a line a second later
UDP_ERROR_LINES_PER_SECOND = 10.0


def log_error(message: str) -> None:
    """A klog-style error line, as kubectl prints for one failed connection."""
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    print(f"E{stamp} portforward] {message}", file=sys.stderr, flush=True)


class _Pipe:
    """One local connection paired with one forwarded connection."""

    def __init__(self, forwarder: PortForwarder, spec: PortSpec, local_port: int) -> None:
        self.forwarder = forwarder
        self.spec = spec
        self.local_port = local_port
        self.local: asyncio.Transport | None = None
        self.stream: ForwardStream | None = None
        self.session: ClientSession | None = None  # own session (websocket transport)
        self.pending: list[bytes] = []
        self.local_eof = False
        self.done = False


class _LocalSide(asyncio.BufferedProtocol):
    """A local connection; it reads through the loop thread's 1 MiB buffer
    (flow.read_buffer), as crishim serve reads pods: 4.2 -> ~1.1 reads and DATA frames per
    MiB uploaded instead of the loop's 256 KiB pieces."""

    def __init__(self, forwarder: PortForwarder, spec: PortSpec, local_port: int) -> None:
        self.pipe = _Pipe(forwarder, spec, local_port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pipe = self.pipe
        # a TCP connection's transport; uvloop's does not subclass asyncio.Transport
        local = pipe.local = cast(asyncio.Transport, transport)
        local.set_write_buffer_limits(high=1024 * 1024)
        pipe.forwarder.start_pipe(pipe, local)
        # after the streams are on their way: the line (a write to a terminal or a pipe,
        # which wakes its reader) is not on the connection's first-byte path
        # one write, also where stdout is unbuffered (PYTHONUNBUFFERED: print() writes the
        # text and its newline apart, each a system call that wakes the reader)
        sys.stdout.write(f"Handling connection for {pipe.local_port}\n")
        sys.stdout.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        stream = self.pipe.stream
        if stream is not None:  # sent from the read buffer where the session can
            stream.write_view(read_buffer()[:nbytes])
        else:
            self.pipe.pending.append(read_buffer()[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        stream = self.pipe.stream
        if stream is not None:
            stream.write(data)
        else:
            self.pipe.pending.append(data)

    def eof_received(self) -> bool:
        self.pipe.local_eof = True
        if self.pipe.stream is not None:
            self.pipe.stream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pipe = self.pipe
        stream = pipe.stream
        pipe.done = True
        if stream is not None and not stream.is_closing():
            if exc is not None:
                stream.abort()
            else:
                stream.close()
        if pipe.session is not None:
            pipe.session.close()

    def pause_writing(self) -> None:
        if self.pipe.stream is not None:
            self.pipe.stream.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe.stream is not None:
            self.pipe.stream.resume_reading()


def _read_now(local: asyncio.Transport) -> bytes:
    """What the local client sent before its connection was accepted (sysutil.read_now),
    to go out in the same write as the streams' opening frames: crishim serve then has it
    when its dial completes and sends it with the connection (forward.py
    _send_pending_now), and neither crishim serve nor the pod wakes up twice for the
    first bytes."""
    return read_now(local, EARLY_READ)


# how often a local connection that is not read (its stream out of the server's window,
# behind a pod that stopped reading) is asked whether it was reset: a transport that does
# not read sees no reset, and the stream, the pod's connection and the window it holds
# stayed for the life of the session
LOCAL_WATCH = 1.0


class _RemoteSide(asyncio.Protocol):
    #: data_received may be given a view of the loop's read buffer (a session that reads
    #: in place: ClientSession.reads_lent): it is written out, or copied, at once
    takes_views = True

    def __init__(self, pipe: _Pipe, local: asyncio.Transport) -> None:
        self.pipe = pipe
        self.local = local
        self._local_fd = plain_socket_fd(local)
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pending = self.pipe.pending
        if pending:  # read at accept (_read_now): out with the streams' opening frames,
            # on either way of opening them (start_pipe's or _connect's)
            stream = cast(asyncio.Transport, transport)
            for chunk in pending:
                stream.write(chunk)
            pending.clear()

    def data_received(self, data: bytes | memoryview) -> None:
        if type(data) is bytes:
            self.local.write(data)
        elif self._local_fd >= 0:  # a view of the read buffer: see flow.write_lent
            write_lent(self.local, self._local_fd, [data])
        else:
            self.local.write(bytes(data))

    def eof_received(self) -> bool:
        local = self.local
        if not local.is_closing() and local.can_write_eof():
            local.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watch()
        pipe = self.pipe
        if isinstance(exc, ForwardError):
            pipe.forwarder.connection_failed(pipe, exc)
            self.local.abort()
        else:
            self.local.close()
        if pipe.session is not None:
            pipe.session.close()

    def pause_writing(self) -> None:
        self.local.pause_reading()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(LOCAL_WATCH, self._check_local)

    def resume_writing(self) -> None:
        self._stop_watch()
        if not self.local.is_closing():
            self.local.resume_reading()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check_local(self) -> None:
        """The local connection is not read: its socket says whether it was reset (a
        close with FIN is read in turn once the stream's window opens)."""
        self._watch = None
        local = self.local
        if local.is_closing():
            return
        sock = local.get_extra_info("socket")
        try:
            reset = bool(sock is not None and sock.getsockopt(socket.SOL_SOCKET,
                                                                socket.SO_ERROR))
        except OSError:
            reset = True
        if reset:
            stream = self.pipe.stream
            if stream is not None and not stream.is_closing():
                stream.abort()  # as a local reset read in time: the stream is reset
            local.abort()
            return
        self._watch = asyncio.get_running_loop().call_later(LOCAL_WATCH, self._check_local)


class PortForwarder:
    def __init__(self, opener: SessionOpener, specs: list[PortSpec], transport: str,
                 addresses: list[ListenAddress], ping_interval: float = 5.0,
                 max_udp_flows: int = MAX_FLOWS) -> None:
        self.opener = opener
        self.specs = specs
        self.transport = transport
        self.addresses = addresses
        self.ping_interval = ping_interval
        self.session: ClientSession | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.udp_listeners: list[UdpListener] = []
        self.udp_flows = FlowLimit(max_udp_flows)  # every /udp spec's together: one session
        self._udp_error_lines = TokenBucket(UDP_ERROR_LINES_PER_SECOND,
                                            int(5 * UDP_ERROR_LINES_PER_SECOND))
        self._udp_errors_not_shown = 0
        self._udp_errors_timer: asyncio.TimerHandle | None = None
        self.finished: asyncio.Future[tuple[int, str]] | None = None
        self.stopped = False  # Ctrl-C or SIGTERM came
        self._asking: set[asyncio.Task[None]] = set()  # the runtime, after a failure alone

    async def start(self) -> asyncio.Future[tuple[int, str]]:
        """Connect and listen; the future resolves with (exit status, message) at the end."""
        finished = self.finished = asyncio.get_running_loop().create_future()
        udp_specs = [spec for spec in self.specs if spec.protocol == "udp"]
        if udp_specs and self.transport == "websocket":
            raise UsageError(f"{udp_specs[0].remote_text}: the WebSocket channel protocol "
                             "(--transport websocket) cannot carry UDP; use --transport spdy, "
                             "spdy-over-websocket or h2")
        if self.transport == "websocket":
            # Ports are fixed per WebSocket: one session per local connection, opened when
            # it comes. The runtime is asked for the sandbox now, which costs the pod
            # nothing; an upgrade would (CriOpener.check_sandbox).
            check_sandbox = getattr(self.opener, "check_sandbox", None)
            if check_sandbox is not None:
                await check_sandbox([self.specs[0].remote])
        else:
            self.session = await self.opener(self.transport, [], self.ping_interval)
            self.session.closed.add_done_callback(self._session_closed)
        specs = self.specs
        if udp_specs:
            assert self.session is not None
            await self.session.negotiate()
            if not self.session.supports_udp:
                refusal = UdpNotSupported(self.session.stream_version, self.transport)
                refused = ", ".join(spec.remote_text for spec in udp_specs)
                if len(udp_specs) == len(specs):
                    raise SessionError(f"{refusal}: cannot forward {refused}")
                print(f"error: {refusal}: not forwarding {refused}", file=sys.stderr,
                      flush=True)
                specs = [spec for spec in specs if spec.protocol != "udp"]
        await self._listen_all(specs)
        return finished

    async def _listen_all(self, specs: list[PortSpec]) -> None:
        """As kubectl (client-go ForwardPorts): a port spec that cannot listen is a line
        on stderr while another one does; only when none can is it an error."""
        failed: list[tuple[str, ListenError]] = []  # the spec as given, why
        for spec in specs:
            local = spec.local  # as given (0: any): _bind sets the port it got
            try:
                if spec.protocol == "udp":
                    await self._listen_udp(spec)
                else:
                    await self._listen(spec)
            except ListenError as e:
                failed.append((f"{local}:{spec.remote_text}", e))
                if len(specs) > 1:
                    print(f"Unable to listen on port {local}: {e.why}", file=sys.stderr,
                          flush=True)
        if len(failed) == len(specs):
            if len(specs) == 1:
                raise failed[0][1]
            shown_specs = ", ".join(given for given, _ in failed)
            raise UsageError(f"unable to listen on any of the requested ports: {shown_specs}")

    async def _listen(self, spec: PortSpec) -> None:
        loop = asyncio.get_running_loop()
        for address, sock in self._bind(spec, socket.SOCK_STREAM):
            server = await loop.create_server(
                functools.partial(_LocalSide, self, spec, spec.local), sock=sock,
                backlog=LISTEN_BACKLOG)
            self.servers.append(server)
            print(f"Forwarding from {_show(address.text)}:{spec.local} -> {spec.remote}",
                  flush=True)

    async def _listen_udp(self, spec: PortSpec) -> None:
        for address, sock in self._bind(spec, socket.SOCK_DGRAM):
            self.udp_listeners.append(UdpListener(sock, spec.remote, spec.local,
                                                  self._open_flow, self._flow_failed,
                                                  limit=self.udp_flows))
            print(f"Forwarding from {_show(address.text)}:{spec.local} -> {spec.remote_text}",
                  flush=True)

    def _bind(self, spec: PortSpec, kind: socket.SocketKind
              ) -> Iterator[tuple[ListenAddress, socket.socket]]:
        """A socket bound (and listening, for TCP) on each address in turn, for the caller
        to use before the next is bound (spec.local, 0 at first, is the first one's port).
        As kubectl (client-go listenOnPort): one of localhost's two addresses that cannot
        be bound (in use, no IPv6 loopback) is passed over, silently, while the other
        binds; any other address that cannot be bound is a ListenError (those bound
        before it go on listening)."""
        protocol = "/udp" if kind == socket.SOCK_DGRAM else ""
        failed: list[str] = []  # localhost's that could not be bound
        localhost_bound = False
        for address in self.addresses:
            sock = socket.socket(address.family, kind)
            try:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if address.family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address.bind, spec.local))
                if kind == socket.SOCK_STREAM:
                    sock.listen(LISTEN_BACKLOG)
            except OSError as e:
                sock.close()
                why = f"{_show(address.text)}:{spec.local}{protocol}: {e.strerror}"
                if not address.localhost:
                    raise ListenError(why) from None
                failed.append(why)
                continue
            if spec.local == 0:
                spec.local = sock.getsockname()[1]
            localhost_bound = localhost_bound or address.localhost
            yield address, sock
        if failed and not localhost_bound:
            raise ListenError("; ".join(failed))

    def _open_flow(self, port: int, protocol_factory: Callable[[], asyncio.Protocol]
                   ) -> asyncio.Transport:
        session = self.session
        if session is None:
            raise SessionError("no session")
        stream, _ = session.open_connection_nowait(port, protocol_factory, "udp")
        return stream

    def _flow_failed(self, listener: UdpListener, exc: Exception) -> None:
        if self.finished is None or self.finished.done():
            return
        where = f"{listener.local_port} -> {listener.remote_port}/udp"
        if isinstance(exc, ForwardError) and exc.fatal:
            self._lost(where, exc)
        elif self._udp_error_lines.take():
            log_error(f"error forwarding port {where}: {exc}")
        else:  # thousands of local peers past a limit wrote a line each
            self._udp_errors_not_shown += 1
            if self._udp_errors_timer is None:
                self._udp_errors_timer = asyncio.get_running_loop().call_later(
                    1.0, self._udp_errors_summary)

    def _udp_errors_summary(self) -> None:
        self._udp_errors_timer = None
        if self._udp_errors_not_shown:
            log_error(f"{self._udp_errors_not_shown} more UDP flow errors not shown "
                      f"(at most {UDP_ERROR_LINES_PER_SECOND:g} lines a second)")
            self._udp_errors_not_shown = 0

    def start_pipe(self, pipe: _Pipe, local: asyncio.Transport) -> None:
        session = self.session
        if session is not None and not session.closed.done():
            try:  # a multiplexed session: open the streams now, no task, no pause
                if not session.writing_paused:
                    early = _read_now(local)
                    if early:  # _RemoteSide.connection_made writes it
                        pipe.pending.append(early)
                pipe.stream, _ = session.open_connection_nowait(
                    pipe.spec.remote, lambda: _RemoteSide(pipe, local))
                return
            except SessionError:
                pass  # reported by the task below
        local.pause_reading()
        asyncio.get_running_loop().create_task(self._connect(pipe, local))

    async def _connect(self, pipe: _Pipe, local: asyncio.Transport) -> None:
        where = f"{pipe.local_port} -> {pipe.spec.remote}"
        try:
            session = self.session
            if session is None:
                ports = [pipe.spec.remote]
                session = pipe.session = await self.opener("websocket", ports, 0)
            stream, _ = await session.open_connection(pipe.spec.remote,
                                                      lambda: _RemoteSide(pipe, local))
        except CriError as e:  # the next WebSocket's CRI call
            local.abort()
            if e.sandbox_lost:
                self._lost(where, e)
            else:
                self._log_failure(where, e)
            return
        except SessionError as e:
            local.abort()
            if self.transport == "websocket":
                self._failed_alone(where, [pipe.spec.remote], e)
            else:
                self._log_failure(where, e)
            return
        if pipe.done:
            stream.abort()
            return
        pipe.stream = stream  # _RemoteSide.connection_made has written pipe.pending
        if pipe.local_eof:
            stream.write_eof()
        if not local.is_closing():
            local.resume_reading()

    def connection_failed(self, pipe: _Pipe, exc: ForwardError) -> None:
        if self._ending():
            return  # shutting down: the session's end is not a connection's failure
        where = f"{pipe.local_port} -> {pipe.spec.remote}"
        if exc.fatal:
            self._lost(where, exc)  # client-go ends the session on error-stream text
        elif pipe.session is not None:  # its own WebSocket: error text is not fatal there
            self._failed_alone(where, [pipe.spec.remote], exc)
        else:
            log_error(f"error forwarding port {where}: {exc}")

    def _failed_alone(self, where: str, ports: list[int], error: Exception) -> None:
        """A connection on a WebSocket of its own failed. The channel protocol writes every
        failure as text (docs/protocol.md §3.4), a refused port as a sandbox gone, so the
        runtime is asked: the CRI call for the ports' next WebSocket, made now. Its
        NOT_FOUND or UNAVAILABLE ends the command, as a fatal error text ends a SPDY or
        HTTP/2 session (§6); otherwise the connection's E line, and forwarding goes on."""
        ask = getattr(self.opener, "sandbox_problem", None)
        if ask is None:  # not a CriOpener: nothing to ask
            self._log_failure(where, error)
            return
        since = asyncio.get_running_loop().time()

        async def confirm() -> None:
            problem = await ask(ports, since)
            if problem is not None:
                self._lost(where, error)
            else:
                self._log_failure(where, error)

        task = asyncio.get_running_loop().create_task(confirm())
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    def _log_failure(self, where: str, error: object) -> None:
        """One connection's failure that the command outlives: its E line, unless the
        command is ending."""
        if not self._ending():
            log_error(f"error forwarding port {where}: {error}")

    def _lost(self, where: str, error: object) -> None:
        """A fatal error of one connection ends the command as client-go ends kubectl's:
        `E… an error occurred forwarding L -> R: …`, then `error: lost connection to
        pod`, exit 1."""
        if self._ending():
            return
        log_error(f"an error occurred forwarding {where}: {error}")
        self._finish(1, "lost connection to pod")

    def _ending(self) -> bool:
        return self.finished is None or self.finished.done()

    def _session_closed(self, fut: asyncio.Future[str]) -> None:
        if fut.cancelled():
            return
        self._finish(1, f"lost connection to pod ({fut.result()})")

    def _finish(self, code: int, message: str) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_result((code, message))

    def stop_requested(self) -> None:
        self.stopped = True
        self._finish(0, "")

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in self._asking:
            task.cancel()
        for listener in self.udp_listeners:
            listener.close()
        if self._udp_errors_timer is not None:  # the count of lines not shown, now
            self._udp_errors_timer.cancel()
            self._udp_errors_summary()
        session = self.session
        self.session = None
        if session is not None:
            if not session.closed.done():
                session.closed.remove_done_callback(self._session_closed)
            session.close()
        close_opener = getattr(self.opener, "close", None)
        if close_opener is not None:
            close_opener()  # what it holds for later connections (CriOpener)


async def run(opener: SessionOpener, specs: list[PortSpec], transport: str,
              addresses: list[ListenAddress], ping_interval: float,
              max_udp_flows: int = MAX_FLOWS) -> int:
    forwarder = PortForwarder(opener, specs, transport, addresses, ping_interval,
                              max_udp_flows)
    loop = asyncio.get_running_loop()
    starting = asyncio.ensure_future(forwarder.start())

    def stop() -> None:
        forwarder.stop_requested()
        starting.cancel()  # still waiting for the CRI call or the upgrade: given up

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        try:
            finished = await starting
        except asyncio.CancelledError:
            if forwarder.stopped:
                return 0
            raise
        except (CriError, SessionError, UsageError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        code, message = await finished
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    finally:
        forwarder.close()
        await asyncio.sleep(0)
