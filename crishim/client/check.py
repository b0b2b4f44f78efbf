"""`crishim check`: a conformance and health battery against any runtime's streaming server.

With root and the sandbox's netns (PodSandboxStatus verbose info, or --netns), it starts
its own peers inside the sandbox: echo, sink (reads "N\\n" and N bytes, answers
"<count> <sha256>\\n"),
source (sends N deterministic bytes for "N\\n"), reset (RST on the first byte), and a
closed port, and a UDP echo for the optional udp-echo check (crishim's port-forward
extension, skipped with the reason where the runtime does not negotiate it). Otherwise
only the checks that need no cooperating server run, against --port, and the others are
listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

from crishim.client.cri import CriClient, CriError
from crishim.client.podservers import FIN_MARK, Peers, source_piece
from crishim.client.transports import (
    TRANSPORTS,
    ClientSession,
    ForwardError,
    SessionError,
    UpgradeRefused,
    open_session,
    without_userinfo,
)
from crishim.client.transports.h2 import H2ClientSession
from crishim.protocols.constants import PORTFORWARD_CRISHIM_V1
from crishim.protocols.datagram import DatagramDecoder, encode_datagram

# A check's whole run at most: this, plus a second per MiB of --size (each read or write
# of a check waits up to --timeout)
CHECK_TIMEOUT = 120.0
UDP_CHECK_SIZES = (1, 512, 1472, 8192, 65507)  # 65,507: the largest UDP payload over IPv4
# What a check says: its result (pass | fail | warn) and a line of detail.
Outcome = tuple[str, str]
CHUNK = 1 << 20  # the upload's and download's unit: --size is never held in memory whole
# A data check that failed in the forwarding after this long (less its transport's
# handshake: a slow cluster's CRI call and upgrade) failed as a dial with no answer does
# (a wrong netns refuses at once)
SLOW_DIAL = 1.0
URL_RE = re.compile(r"^(https?)://([^/]+)/portforward/([^/?#]+)$")


def upload_pieces(n: int, block: bytes) -> Iterator[bytes]:
    """The upload check's n bytes, chunk by chunk: `block` (random), each chunk's first 8
    bytes its number, so a chunk lost, repeated or out of order changes the digest."""
    for i, start in enumerate(range(0, n, len(block))):
        length = min(len(block), n - start)
        yield (struct.pack(">Q", i) + block[8:length])[:length]


class _Datagrams(asyncio.Protocol):
    """A UDP flow's stream, its datagrams queued as they arrive, boundaries kept."""

    def __init__(self) -> None:
        self.decoder = DatagramDecoder()
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        for datagram in self.decoder.receive_data(data):
            self.queue.put_nowait(datagram)

    def eof_received(self) -> bool:
        self.queue.put_nowait(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(exc)


@dataclass
class CheckResult:
    name: str
    result: str  # pass | fail | warn | skip
    detail: str
    seconds: float
    required: bool


# --------------------------------------------------------------------------- the battery


class Checker:
    def __init__(self, cri: CriClient, args: argparse.Namespace) -> None:
        self.cri = cri
        self.sandbox = args.sandbox
        self.transport = args.transport
        self.port = args.port
        self.size = max(1, args.size) << 20
        self.insecure: bool = args.insecure_skip_tls_verify
        self.ca_file: str | None = args.certificate_authority
        self.timeout = args.timeout  # the CRI call, each upgrade, each read or write
        self.check_timeout = CHECK_TIMEOUT + (self.size >> 20)
        self.netns_arg = args.netns
        self.no_servers = args.no_servers
        self.results: list[CheckResult] = []
        self.peers: Peers | None = None
        self.netns = ""
        self.why_no_servers = ""
        self.session: ClientSession | None = None
        self.hint = ""

    # --- plumbing -----------------------------------------------------------------------
    async def url(self, ports: Sequence[int] = ()) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            None, self.cri.port_forward, self.sandbox, list(ports))

    async def new_session(self, transport: str, ports: Sequence[int] = ()) -> ClientSession:
        url = await self.url(ports if transport == "websocket" else [])
        return await self.open_url(url, transport, ports)

    async def open_url(self, url: str, transport: str, ports: Sequence[int]) -> ClientSession:
        """A session to `url` with the command's TLS settings and timeout, no keepalive."""
        return await open_session(url, transport, ports, ping_interval=0,
                                  timeout=self.timeout, insecure=self.insecure,
                                  ca_file=self.ca_file)

    async def shared_session(self) -> ClientSession:
        """The session the data checks share, a new one once it takes no new connections
        (ended, or the server sent GOAWAY)."""
        session = self.session
        if session is None or session.closed.done() or session.going_away:
            session = self.session = await self.new_session(self.transport)
        return session

    def peer(self, name: str) -> int:
        """The port of one of our servers in the sandbox (data checks run only with them)."""
        if self.peers is None:
            raise RuntimeError(f"no {name} server: the data checks need the sandbox's netns")
        return self.peers.ports[name]

    @contextlib.asynccontextmanager
    async def connection(self, port: int
                         ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """A forwarded connection on the shared session, or on a WebSocket of its own for the
        channel protocol; closed, with that WebSocket, however the check ends."""
        own: ClientSession | None = None
        if self.transport == "websocket":
            session = own = await self.new_session("websocket", [port])
        else:
            session = await self.shared_session()
        try:
            reader, writer = await session.open_stream(port)
            try:
                yield reader, writer
            finally:
                writer.close()
        finally:
            if own is not None:
                own.close()

    def add(self, name: str, result: str, detail: str, t0: float, required: bool = True) -> None:
        self.results.append(CheckResult(name, result, detail, time.perf_counter() - t0,
                                        required))

    def skip(self, name: str, why: str, required: bool = True) -> None:
        self.results.append(CheckResult(name, "skip", why, 0.0, required))

    def timed_out(self, e: TimeoutError) -> str:
        """A timeout's reason (its text is empty where asyncio raised it)."""
        return str(e) or (f"timed out: no answer in time (a read waits up to "
                          f"{self.timeout:g} s, a whole check {self.check_timeout:g} s)")

    async def run_check(self, name: str, fn: Callable[[], Awaitable[Outcome]],
                        required: bool = True) -> None:
        t0 = time.perf_counter()
        try:
            result, detail = await asyncio.wait_for(fn(), self.check_timeout)
        except TimeoutError as e:
            result, detail = "fail", self.timed_out(e)
        except (SessionError, CriError, ForwardError, OSError, asyncio.IncompleteReadError,
                ValueError) as e:
            result, detail = "fail", f"{type(e).__name__}: {e}"
        self.add(name, result, detail, t0, required)

    # --- setup --------------------------------------------------------------------------
    async def find_netns(self) -> None:
        if self.no_servers:
            self.why_no_servers = "--no-servers given"
            return
        if os.geteuid() != 0:
            self.why_no_servers = "not root: cannot enter the sandbox netns"
            return
        netns = self.netns_arg
        if not netns:
            try:
                netns = await asyncio.get_running_loop().run_in_executor(
                    None, self.cri.sandbox_netns, self.sandbox)
            except CriError as e:
                self.why_no_servers = (f"sandbox netns unknown ({e}); name it with --netns "
                                       "PATH")
                return
        peers = Peers(netns)
        try:
            await peers.start()
        except Exception as e:  # noqa: BLE001 - reported as the reason for skipping
            peers.close()  # the servers started before the failure
            self.why_no_servers = f"cannot start servers in {netns}: {e}"
            return
        self.peers = peers
        self.netns = netns

    # --- checks -------------------------------------------------------------------------
    async def check_url(self) -> Outcome:
        url = without_userinfo(await self.url())  # credentials are never shown
        m = URL_RE.match(url)
        if not m:
            return "fail", ("not an absolute http(s)://HOST:PORT/portforward/TOKEN URL: "
                            + url)
        token = m.group(3)
        bits = len(token) * 6 if re.fullmatch(r"[A-Za-z0-9_-]+", token) else len(token) * 4
        result = "pass" if len(token) >= 8 else "warn"
        return result, (f"{m.group(1)}://{m.group(2)}/portforward/…, token {len(token)} chars "
                        f"(at most {bits} bits, from its length"
                        f"{'; reference runtimes use 8' if bits < 96 else ''})")

    async def check_token_single_use(self, transport: str) -> Outcome:
        """One stream URL used twice on `transport`: the second use must be refused. The
        upgrade transports spend the token on the upgrade and refuse it there (404 from
        crishim and containerd alike); HTTP/2 spends it on the connection's first stream,
        whose answer is the verdict."""
        ports = [self.probe_port()] if transport == "websocket" else []
        url = await self.url(ports)
        first = await self.open_url(url, transport, ports)
        try:
            status = await self.first_answer(first)
        finally:
            first.close()
        if status != 200:
            return "fail", f"{transport}: the first use was refused with {status}"
        try:
            second = await self.open_url(url, transport, ports)
        except UpgradeRefused as e:
            return self.second_use_refused(transport, e.status)
        try:
            status = await self.first_answer(second)
        finally:
            second.close()
        if status != 200:
            return self.second_use_refused(transport, status)
        return "fail", f"{transport}: the same token was accepted twice"

    async def first_answer(self, session: ClientSession) -> int:
        """The status the token got on a session just opened: 200 once upgraded, and on
        HTTP/2 (a connection, no upgrade) the answer to its first stream, the version
        probe."""
        if not isinstance(session, H2ClientSession):
            return 200
        await session.negotiate(self.timeout)
        return session.first_status or 0

    @staticmethod
    def second_use_refused(transport: str, status: int) -> Outcome:
        if 400 <= status < 500:
            return "pass", f"{transport}: second use refused with {status}"
        if status == 101:  # upgraded: the token was taken, whatever was wrong after
            return "fail", (f"{transport}: the same token was accepted twice (the second "
                            "upgrade succeeded, its answer unusable)")
        return "warn", (f"{transport}: second use refused with {status}, which does not say "
                        "the token was spent (a refusal for a used token is a 4xx, crishim's "
                        "and containerd's 404)")

    def probe_port(self) -> int:
        if self.peers is not None:
            return self.peers.ports["echo"]
        return self.port or 1

    async def check_handshake(self, transport: str) -> Outcome:
        ports = [self.probe_port()] if transport == "websocket" else []
        t0 = time.perf_counter()
        try:
            session = await self.new_session(transport, ports)
        except UpgradeRefused as e:
            return ("fail" if transport == self.transport else "warn"), str(e)
        except (SessionError, OSError, TimeoutError) as e:
            if transport == self.transport:
                raise
            # another transport the runtime does not speak (containerd closes an HTTP/2
            # preface) is what a refused one is: a warning, not an optional failure
            return "warn", (self.timed_out(e) if isinstance(e, TimeoutError) and not str(e)
                            else f"{type(e).__name__}: {e}")
        ms = (time.perf_counter() - t0) * 1000
        detail = f"upgraded in {ms:.1f} ms"
        if transport in ("spdy", "spdy-over-websocket", "h2"):
            rtt = await session.ping(5)
            detail += f", ping {rtt * 1000:.2f} ms"
        session.close()
        return "pass", detail

    async def check_echo(self) -> Outcome:
        data = os.urandom(min(self.size, 4 << 20))
        async with self.connection(self.peer("echo")) as (reader, writer):
            writer.write(data)
            got = await asyncio.wait_for(reader.readexactly(len(data)), self.timeout)
        ok = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        return ("pass" if ok else "fail"), f"{len(data)} bytes echoed, sha256 " + \
            ("matches" if ok else "DIFFERS")

    async def check_upload(self) -> Outcome:
        n = self.size
        block = os.urandom(min(n, CHUNK))
        want = hashlib.sha256()
        for piece in upload_pieces(n, block):  # the digest first: off the timed loop
            want.update(piece)
        async with self.connection(self.peer("sink")) as (reader, writer):
            t0 = time.perf_counter()
            writer.write(b"%d\n" % n)
            for piece in upload_pieces(n, block):  # memory stays a chunk or two, any --size
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), self.timeout)
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            secs = time.perf_counter() - t0
        ok = line.decode(errors="replace").strip() == f"{n} {want.hexdigest()}"
        verdict = "matches" if ok else "DIFFERS: " + line[:80].decode(errors="replace")
        return ("pass" if ok else "fail"), (f"{n >> 20} MiB up, sha256 {verdict}, "
                                            f"{n / secs / 1e6:.0f} MB/s")

    async def check_download(self) -> Outcome:
        n = self.size
        async with self.connection(self.peer("source")) as (reader, writer):
            t0 = time.perf_counter()
            writer.write(f"{n}\n".encode())
            h = hashlib.sha256()
            got = 0
            while True:
                chunk = await asyncio.wait_for(reader.read(CHUNK), self.timeout)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            secs = time.perf_counter() - t0
        want = hashlib.sha256()
        for start in range(0, n, CHUNK):  # what the source sent, a chunk at a time
            want.update(source_piece(start, min(CHUNK, n - start)))
        ok = got == n and h.digest() == want.digest()
        return ("pass" if ok else "fail"), (f"{got >> 20} MiB down, sha256 "
                                            f"{'matches' if ok else 'DIFFERS'}, "
                                            f"{got / secs / 1e6:.0f} MB/s")

    async def check_half_close(self) -> Outcome:
        data = os.urandom(65536)
        async with self.connection(self.peer("fin")) as (reader, writer):
            writer.write(data)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), self.timeout)
        if got == data + FIN_MARK:
            return "pass", "FIN reached the pod, which still answered; its FIN came back"
        if got == data:
            return "fail", ("the pod's answer to the FIN (an EOF mark) never came back: the "
                            "runtime ended the connection instead of passing the half-close "
                            "on, or before the pod answered")
        return "fail", f"got {len(got)} bytes, expected {len(data)} and the pod's EOF mark"

    async def _failing_then_survive(self, port: int, payload: bytes) -> Outcome:
        error: ForwardError | None = None
        async with self.connection(port) as (reader, writer):
            writer.write(payload)
            try:
                await asyncio.wait_for(reader.read(), self.timeout)
            except ForwardError as e:
                error = e
            except ConnectionError:
                pass
            except TimeoutError:  # not a clean EOF: nothing ended at all
                return "fail", (f"no EOF and no error within {self.timeout:g} s: the runtime "
                                "left the connection open after the pod's side failed")
            if error is None:
                try:
                    # the data stream ended; the verdict is on the error stream, which may
                    # end later
                    if writer.can_write_eof():
                        writer.write_eof()
                    await asyncio.wait_for(writer.wait_closed(), 5)
                except ForwardError as e:
                    error = e
                except (ConnectionError, TimeoutError):
                    pass
        if error is None:
            how = "ended with a clean EOF (no error reported)"
        elif error.fatal:
            how = f"error text {str(error)[:400]!r} (client-go ends the session on it)"
        else:
            how = f"reported: {str(error)[:400]}"
        if self.transport == "websocket":
            return ("pass" if error is not None else "warn"), how
        async with self.connection(self.peer("echo")) as (reader, writer):
            writer.write(b"still there?")
            try:
                back = await asyncio.wait_for(reader.readexactly(12), 5)
            except (ForwardError, asyncio.IncompleteReadError, TimeoutError):
                back = b""
        survived = back == b"still there?"
        if not survived:
            return "fail", how + "; the session did NOT survive"
        return ("warn" if error is not None and error.fatal else "pass"), \
            how + "; the session survived"

    async def check_closed_port(self) -> Outcome:
        return await self._failing_then_survive(self.peer("closed"), b"")

    async def check_reset(self) -> Outcome:
        return await self._failing_then_survive(self.peer("reset"), b"x")

    async def check_concurrent(self, n: int = 16) -> Outcome:
        async def one(i: int) -> bool:
            data = os.urandom(256 * 1024)
            async with self.connection(self.peer("echo")) as (reader, writer):
                writer.write(data)
                got = await asyncio.wait_for(reader.readexactly(len(data)), self.timeout)
                return got == data
        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        ok = sum(1 for r in results if r is True)
        errors = [self.timed_out(r) if isinstance(r, TimeoutError) else
                  f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        detail = f"{ok}/{n} connections echoed 256 KiB intact"
        if errors:
            detail += f"; first error: {errors[0][:100]}"
        return ("pass" if ok == n else "fail"), detail

    async def check_latency(self, n: int = 20) -> Outcome:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            async with self.connection(self.peer("echo")) as (reader, writer):
                writer.write(b"x")
                await asyncio.wait_for(reader.readexactly(1), self.timeout)
                samples.append(time.perf_counter() - t0)
        samples.sort()
        p50 = statistics.median(samples) * 1000
        return "pass", f"open + 1-byte round trip over {n}: p50 {p50:.2f} ms, max " \
                       f"{samples[-1] * 1000:.2f} ms"

    async def udp_unavailable(self) -> str:
        """Why the udp-echo check cannot run here, or "" if it can."""
        if self.transport == "websocket":
            return "the WebSocket channel protocol cannot carry UDP"
        if self.peers is None:
            return "needs a cooperating server in the sandbox (see below)"
        session = await self.shared_session()
        version = await session.negotiate(self.timeout)
        if not session.supports_udp:
            return (f"the runtime's stream server negotiated {version}, not "
                    f"{PORTFORWARD_CRISHIM_V1}: it does not forward UDP")
        return ""

    async def check_udp_echo(self) -> Outcome:
        assert self.session is not None and self.peers is not None
        stream, flow = await self.session.open_connection(
            self.peers.ports["udp_echo"], _Datagrams, "udp")
        assert isinstance(flow, _Datagrams)
        try:
            for size in UDP_CHECK_SIZES:
                sent = os.urandom(size)
                stream.write(encode_datagram(sent))
                got = await asyncio.wait_for(flow.queue.get(), self.timeout)
                if isinstance(got, BaseException):
                    raise got
                if got is None:
                    return "fail", f"the flow ended before the {size}-byte datagram came back"
                if got != sent:
                    return "fail", (f"a {size}-byte datagram came back as {len(got)} bytes"
                                    + (" (content differs)" if len(got) == size else ""))
        finally:
            stream.close()
        sizes = ", ".join(str(n) for n in UDP_CHECK_SIZES)
        return "pass", f"datagrams of {sizes} bytes echoed whole, boundaries kept"

    async def check_connect_user_port(self) -> Outcome:
        async with self.connection(self.port) as (reader, writer):
            t0 = time.perf_counter()
            try:
                first = await asyncio.wait_for(reader.read(1), 1.0)
            except TimeoutError:  # nothing to read, and no failure: the connection is up
                return "pass", (f"a connection to port {self.port} was accepted and stayed "
                                "up 1 s")
        if first:
            return "pass", f"a connection to port {self.port} was accepted; the pod spoke first"
        return "warn", (f"the connection to port {self.port} ended after "
                        f"{(time.perf_counter() - t0) * 1000:.0f} ms with a clean EOF and no "
                        "error: a server that closes at once, or a runtime that turns a "
                        "failed dial into a clean close (nothing tells them apart here)")

    # --- the run ------------------------------------------------------------------------
    async def run(self) -> None:
        await self.url()  # an unusable endpoint or unknown sandbox: one error, no table
        try:
            await self._run_checks()
        finally:
            if self.session is not None:
                self.session.close()
            if self.peers is not None:
                self.peers.close()

    async def _run_checks(self) -> None:
        await self.find_netns()
        await self.run_check("cri-url", self.check_url)
        if self.peers is None and not self.port:
            self.why_no_servers += "; and no --port given"
        for transport in TRANSPORTS:
            await self.run_check(f"handshake:{transport}",
                                 functools.partial(self.check_handshake, transport),
                                 required=transport == self.transport)
        await self.run_token_checks()
        half_close = self.transport != "websocket"
        data_checks = [
            ("echo-sha256", self.check_echo, True),
            ("upload-sha256", self.check_upload, True),  # a sized sink: no half-close
            ("download-sha256", self.check_download, True),
            ("half-close", self.check_half_close, half_close),
            ("closed-port", self.check_closed_port, True),
            ("pod-reset", self.check_reset, True),
            ("concurrent", self.check_concurrent, True),
            ("setup-latency", self.check_latency, True),
        ]
        for name, fn, applicable in data_checks:
            required = name != "setup-latency"  # a figure, not a verdict: optional
            if not applicable:
                self.skip(name, "the WebSocket channel protocol has no half-close",
                          required=False)
            elif self.peers is None:
                self.skip(name, "needs a cooperating server in the sandbox (see below)",
                          required=required)
            else:
                await self.run_check(name, fn, required=required)
        self.hint = self.unreached_servers_hint()
        try:
            why_no_udp = await self.udp_unavailable()
        except (SessionError, CriError) as e:  # the runtime gone mid-check: the table stays
            why_no_udp = f"cannot open a session to ask: {e}"
        if why_no_udp:
            self.skip("udp-echo", why_no_udp, required=False)
        else:
            await self.run_check("udp-echo", self.check_udp_echo, required=False)
        if self.peers is None and self.port:
            await self.run_check("connect", self.check_connect_user_port)

    async def run_token_checks(self) -> None:
        """token-single-use on --transport, and token-single-use:<t> on each other transport
        the runtime speaks (its handshake passed): a stream server may refuse a used token
        on one transport and take it on another. Required wherever it runs (a token taken
        twice on any transport the runtime speaks lets a second client in); skipped,
        optional, for a transport the runtime does not speak."""
        await self.run_check("token-single-use",
                             functools.partial(self.check_token_single_use, self.transport))
        for transport in TRANSPORTS:
            if transport == self.transport:
                continue
            name = f"token-single-use:{transport}"
            handshake = next(r for r in self.results if r.name == f"handshake:{transport}")
            if handshake.result != "pass":
                self.skip(name, f"the runtime does not speak {transport} (see "
                                f"handshake:{transport})", required=False)
            else:
                await self.run_check(name, functools.partial(self.check_token_single_use,
                                                             transport))

    def unreached_servers_hint(self) -> str:
        """Why every data check may have failed: said when no connection reached the
        check's servers (each one failed in the forwarding, none timed out or came back
        wrong). Where the runtime's dial into the sandbox got no answer (the server's error
        text says so, or each failed only after a dial's wait), that dial is named: a
        helper that did not answer (crishim's helper-pod backend says so), or the pod's
        port; otherwise the netns: the runtime dials the sandbox's, and the check's
        servers run in the one named (--netns, or the runtime's verbose status)."""
        echo = next((r for r in self.results if r.name == "echo-sha256"), None)
        if self.peers is None or echo is None or not echo.detail.startswith("ForwardError"):
            return ""
        concurrent = next((r for r in self.results if r.name == "concurrent"), None)
        if concurrent is not None and not concurrent.detail.startswith("0/"):
            return ""
        text = echo.detail.removeprefix("ForwardError: ")[:200]
        unreached = "no data check's connection reached the check's servers"
        if re.match(r"helper at .* did not answer", text):
            return (f"{unreached}: the stream server's helper did not answer its dials "
                    f"({text!r}): the runtime's helper is stuck or overloaded (crishim's "
                    "helper-pod backend: see `crishim helper`'s log), not the pod")
        # the first data check opens the session too: the handshake's time is not a dial's
        setup = next((r.seconds for r in self.results
                      if r.name == f"handshake:{self.transport}"), 0.0)
        if "no answer after" in text or echo.seconds - setup >= SLOW_DIAL:
            why = (repr(text) if "no answer after" in text else
                   f"each failed after {echo.seconds:.0f} s, no reason given")
            return (f"{unreached}: the runtime's dial into the sandbox got no answer ({why}): "
                    f"the sandbox's network drops connections to the servers' ports (a "
                    "firewall), or the runtime's own way in is stuck (behind crishim's "
                    "helper-pod backend a helper that does not answer says so in the "
                    "error text of error_policy verbose, and in crishim's log)")
        named = "--netns" if self.netns_arg else "the runtime's PodSandboxStatus"
        return (f"{unreached}, which run in "
                f"{self.netns} (from {named}): if that is not the sandbox's network "
                "namespace, name the right one with --netns PATH")

    @property
    def ok(self) -> bool:
        return not any(r.result == "fail" and r.required for r in self.results)

    @property
    def required_skipped(self) -> list[str]:
        return [r.name for r in self.results if r.result == "skip" and r.required]

    def summary(self) -> str:
        """The last line: whether a required check failed and, if none did, whether all of
        them ran (without a cooperating server no bytes are forwarded and checked, and
        'all required checks passed' said otherwise)."""
        if not self.ok:
            return "FAILED: a required check failed"
        skipped = self.required_skipped
        if not skipped:
            return "all required checks passed"
        required = sum(r.required for r in self.results)
        reasons = list(dict.fromkeys(r.detail for r in self.results
                                     if r.result == "skip" and r.required))
        if self.peers is None:
            reasons = [f"no cooperating server in the sandbox: "
                       f"{self.why_no_servers.lstrip('; ')}"]
        return (f"the required checks that ran passed, but {len(skipped)} of {required} "
                f"were skipped, so the data path was not checked ({'; '.join(reasons)})")

    def report(self) -> dict[str, object]:
        return {"sandbox": self.sandbox, "transport": self.transport,
                "endpoint": self.cri.target, "servers": self.peers is not None,
                "netns": self.netns, "servers_reason": self.why_no_servers.lstrip("; "),
                "ok": self.ok, "checks": [asdict(r) for r in self.results],
                "skipped": [r.name for r in self.results if r.result == "skip"],
                "required_skipped": self.required_skipped, "hint": self.hint,
                "summary": self.summary()}


def print_table(checker: Checker) -> None:
    rows = [("CHECK", "RESULT", "TIME", "DETAIL")]
    for r in checker.results:
        result = r.result.upper() + ("" if r.required else " (optional)")
        rows.append((r.name, result, f"{r.seconds * 1000:.0f} ms" if r.seconds else "-",
                     r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    if checker.peers is None and not checker.ok:  # otherwise the summary says why
        print(f"\nchecks needing a cooperating server were skipped: "
              f"{checker.why_no_servers.lstrip('; ')}")
    if checker.hint:
        print(f"\nhint: {checker.hint}")
    print("\n" + checker.summary())


async def run(cri: CriClient, args: argparse.Namespace) -> int:
    checker = Checker(cri, args)
    try:
        await checker.run()
    except CriError as e:  # the endpoint itself is unusable: one line, like port-forward
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cri.cancel_calls()  # Ctrl-C: a CRI call in its thread is not waited out
    if args.json:
        print(json.dumps(checker.report(), indent=2))
    else:
        print_table(checker)
    sys.stdout.flush()
    return 0 if checker.ok else 1
