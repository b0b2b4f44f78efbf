"""One crishim process: the CRI gRPC service and the stream server on one event loop.

grpc.aio runs on uvloop: on a loop other than asyncio's default it polls its completion
queue from a helper thread and hands results to the loop, so both servers share one
loop and one token store without locks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2

from crishim import __version__
from crishim.budget import FloodLimits
from crishim.config import Config, ConfigError
from crishim.cri.service import (
    CriHandler,
    CriService,
    HealthHandler,
    cri_refusal_log,
    upstream_target,
)
from crishim.forward import ForwardContext
from crishim.memory import MemoryReleaser, freeze_startup_objects, keep_heap_for_reads
from crishim.runtime import RuntimePlugin, load_plugin
from crishim.stream.server import StreamServer
from crishim.sysutil import prepare_socket_path, raise_nofile_limit, stop_on_signals
from crishim.tokens import TokenStore

if TYPE_CHECKING:
    from crishim.metrics import Metrics

log = logging.getLogger("crishim")

# CRI messages (ListContainers, ListImages on a busy node) outgrow gRPC's 4 MiB default;
# the kubelet's CRI client takes at most 16 MiB (k8s.io/cri-client maxMsgSize), so no
# answer it can use is larger, and a request larger than that is refused from its length
# prefix on (at 64 MiB, concurrent oversized calls held 845 MiB before they were refused)
_MESSAGE_LIMITS = [("grpc.max_receive_message_length", 16 << 20),
                   ("grpc.max_send_message_length", 16 << 20)]


# descriptors crishim holds itself (listeners, the gRPC server and its channel, logs,
# epoll, the token store's timers) and a few refusals in flight, beyond max_unadmitted
OWN_FDS = 64
# how often expired tokens are dropped (and counted) without a CRI call or a redeem
TOKEN_COLLECT_INTERVAL = 5.0
MIN_FD_BUDGET = 16  # descriptors for sessions and connections below which serve refuses to start


@dataclass(frozen=True)
class FdBudget:
    max_unadmitted: int  # connections without a token at once
    reserved: int  # descriptors kept from sessions: those and crishim's own
    budget: int  # descriptors for sessions and forwarded connections
    per_session: int  # forwarded connections one session may hold


def fd_budget(cfg: Config, nofile: int) -> FdBudget:
    """How RLIMIT_NOFILE's descriptors are shared; ConfigError where sessions would get
    fewer than MIN_FD_BUDGET (a server that refuses every session)."""
    # the connections without a token come out of the reserve too (and crishim's own
    # listeners, gRPC and log descriptors): kept free beyond them, or a full budget
    # plus slow request heads used every descriptor and new clients were reset unheard
    # and they may take at most a quarter of the descriptors (the default 256 and a
    # limit of 300 left 2 descriptors for sessions)
    max_unadmitted = min(cfg.max_unadmitted, max(16, nofile // 4))
    # so do the CRI socket's connections: 21,000 idle ones took every descriptor
    reserved = max(cfg.reserved_fds, max_unadmitted + cfg.max_cri_connections + OWN_FDS)
    if nofile - reserved < MIN_FD_BUDGET:
        raise ConfigError(
            f"reserved_fds: {reserved} reserved of RLIMIT_NOFILE {nofile} leaves "
            f"{max(0, nofile - reserved)} descriptors for sessions and forwarded "
            f"connections (at least {MIN_FD_BUDGET}): lower reserved_fds or "
            "max_unadmitted, or raise the limit (ulimit -n, LimitNOFILE=)")
    budget = nofile - reserved
    # no one session may hold more than half of what all may: others keep their share
    per_session = min(cfg.max_connections_per_session,
                      max(1, min(cfg.max_connections, budget) // 2))
    return FdBudget(max_unadmitted, reserved, budget, per_session)


class Crishim:
    def __init__(self, config: Config, plugin: RuntimePlugin | None = None) -> None:
        self.config = config
        self.plugin = plugin
        self.tokens = TokenStore(ttl=config.token_ttl, max_outstanding=config.max_tokens)
        self.metrics: Metrics | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.cri_handler: CriHandler | None = None
        self.health_handler: HealthHandler | None = None
        self._drain_cut = asyncio.Event()  # a second signal while stopping
        self.stream: StreamServer | None = None
        self.upstream: grpc.aio.Channel | None = None
        self.health: Any = None  # a grpc_health.v1.health.aio.HealthServicer (no stubs)
        self._token_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        cfg = self.config
        if self.plugin is None:
            name, why = cfg.chosen_runtime()
            log.info("runtime plugin %s: %s", name, why)
            self.plugin = load_plugin(cfg)
        # the CRI socket's path first: a live crishim there (or a path no socket can take)
        # refuses the start before anything listens
        prepare_socket_path(cfg.socket)
        if cfg.metrics_address:
            from crishim.metrics import Metrics

            self.metrics = Metrics(self.tokens)
            self.metrics.serve(cfg.metrics_address)
        keep_heap_for_reads()
        nofile = raise_nofile_limit()
        fds = fd_budget(cfg, nofile)
        self.max_unadmitted = fds.max_unadmitted
        if fds.max_unadmitted < cfg.max_unadmitted:
            log.warning("max_unadmitted %d is lowered to %d: a quarter of RLIMIT_NOFILE %d",
                        cfg.max_unadmitted, fds.max_unadmitted, nofile)
        if fds.reserved > cfg.reserved_fds:
            log.info("reserved_fds %d is raised to %d: max_unadmitted (%d) connections, "
                     "max_cri_connections (%d) and crishim's own descriptors come out of it",
                     cfg.reserved_fds, fds.reserved, fds.max_unadmitted,
                     cfg.max_cri_connections)
        log.info("RLIMIT_NOFILE %d: %d descriptors for sessions and forwarded connections, "
                 "at most %d forwarded connections, %d per session", nofile, fds.budget,
                 min(cfg.max_connections, fds.budget), fds.per_session)
        flood = FloodLimits(**{f.name: getattr(cfg, f.name)
                               for f in dataclasses.fields(FloodLimits)})
        ctx = ForwardContext(self.plugin, cfg.error_policy, cfg.buffer_size, self.metrics,
                             max_per_session=fds.per_session,
                             max_connections=cfg.max_connections, fd_budget=fds.budget,
                             flood=flood, udp=cfg.enable_udp_portforward,
                             udp_idle_timeout=cfg.udp_flow_idle_timeout,
                             dial_timeout=cfg.dial_timeout)
        self.stream = StreamServer(
            self.tokens, ctx, host=cfg.stream_server_address, port=cfg.stream_server_port,
            url_host=cfg.stream_url_host, creation_timeout=cfg.stream_creation_timeout,
            idle_timeout=cfg.stream_idle_timeout, max_sessions=cfg.max_sessions,
            request_timeout=cfg.stream_request_timeout, max_unadmitted=self.max_unadmitted,
            memory=MemoryReleaser(cfg.memory_release_sessions, cfg.memory_release_interval),
            ssl_context=self._ssl_context())
        try:
            await self.stream.start()
        except OSError as e:  # "[Errno 99] error while attempting to bind on address ..."
            # a gaierror's errno is getaddrinfo's (-2, which os.strerror calls unknown), its
            # strerror the reason; a bind's strerror is the loop's whole sentence
            why = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
            raise OSError(f"stream_server_address {cfg.stream_server_address}:"
                          f"{cfg.stream_server_port}: cannot listen: {why}") from None
        await self._start_grpc(self.plugin, self.stream)
        self._collect_tokens()
        log.info("crishim %s serving CRI on %s, streams on %s (runtime plugin %s; Version "
                 "answered by %s)", __version__, cfg.socket, self.stream.base_url,
                 self.plugin.name, self._version_answerer())

    async def _start_grpc(self, plugin: RuntimePlugin, stream: StreamServer) -> None:
        """The CRI service (PortForward here, every other call passed upstream) and gRPC
        health on the unix socket, which only root and the socket's group may use."""
        cfg = self.config
        if cfg.upstream_endpoint:
            self.upstream = grpc.aio.insecure_channel(upstream_target(cfg.upstream_endpoint),
                                                      options=_MESSAGE_LIMITS)
        refusals = cri_refusal_log(cfg.log_lines_per_second)
        service = CriService(plugin, self.tokens, stream.url_for,
                             max_sandbox_id_length=cfg.max_sandbox_id_length,
                             max_ports=cfg.max_port_forward_ports,
                             draining=lambda: stream.draining,
                             max_request_bytes=cfg.max_request_bytes,
                             refusal_log=refusals)
        # calls in progress are bounded: each may hold a partly received message (up to
        # the 16 MiB limit) and, passed through, its upstream call (~32 KiB idle); one
        # connection may hold a quarter of them, so one client cannot take every slot
        # from the kubelet's connection
        server = grpc.aio.server(
            options=[*_MESSAGE_LIMITS,
                     ("grpc.max_concurrent_streams", max(1, cfg.max_cri_calls // 4)),
                     ("grpc.max_allowed_incoming_connections", cfg.max_cri_connections),
                     ("grpc.max_connection_idle_ms", max(1, int(cfg.cri_idle_timeout * 1000)))],
            maximum_concurrent_rpcs=cfg.max_cri_calls)
        self.cri_handler = CriHandler(service, self.upstream, cfg.upstream_version)
        server.add_generic_rpc_handlers((self.cri_handler,))
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # no aio in stubs
        self.health_handler = HealthHandler(self.health, refusals)
        server.add_generic_rpc_handlers((self.health_handler,))
        # the socket is made by add_insecure_port (the bind) and never wider than 0660:
        # with the umask set only around start(), a process umask of 0 left it 0777
        # until the chmod below
        old_umask = os.umask(0o117)
        try:
            try:  # grpcio 1.6x raises RuntimeError where older ones returned 0
                bound = server.add_insecure_port("unix://" + cfg.socket)
            except RuntimeError:
                bound = 0
            if bound == 0:
                raise OSError(f"socket {cfg.socket}: cannot listen there")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(cfg.socket, 0o660)
        self.grpc_server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("runtime.v1.RuntimeService",
                              health_pb2.HealthCheckResponse.SERVING)

    def _collect_tokens(self) -> None:
        """Expired tokens dropped every TOKEN_COLLECT_INTERVAL (or token_ttl, if less)."""
        self.tokens.collect()
        self._token_timer = asyncio.get_running_loop().call_later(
            max(0.1, min(TOKEN_COLLECT_INTERVAL, self.config.token_ttl)), self._collect_tokens)

    def _version_answerer(self) -> str:
        cfg = self.config
        if not cfg.upstream_endpoint:
            return "crishim"
        if cfg.upstream_version:
            return f"the upstream {cfg.upstream_endpoint}"
        return "crishim (upstream_version off)"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self.config.enable_tls_streaming or self.config.tls_cert_file):
            return None
        from crishim.stream import tls

        return tls.server_context(self.config)

    def cut_drain(self, sig: signal.Signals) -> None:
        """Another signal while draining (a second Ctrl-C): live sessions are closed now,
        not at drain_timeout."""
        if self.stream is not None and not self.stream.drain_cut:
            log.info("%s received again: closing live sessions now", sig.name)
            self.stream.drain_cut = True
        self._drain_cut.set()  # and the CRI calls in progress get 1 s

    async def _stop_grpc(self, grace: float) -> None:
        """grpc's stop with `grace` for the calls in progress, cut to 1 s by a second
        signal meanwhile (grpc takes the shorter grace of a later call)."""
        assert self.grpc_server is not None
        stopping = asyncio.ensure_future(self.grpc_server.stop(grace))
        cut = asyncio.ensure_future(self._drain_cut.wait())
        try:
            await asyncio.wait({stopping, cut}, return_when=asyncio.FIRST_COMPLETED)
            if not stopping.done():
                await self.grpc_server.stop(1.0)
            await stopping
        finally:
            cut.cancel()

    async def stop(self, drain: float | None = None) -> None:
        deadline = self.config.drain_timeout if drain is None else drain
        if self._token_timer is not None:
            self._token_timer.cancel()
            self._token_timer = None
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        if self.stream is not None:
            await self.stream.drain(deadline)
            reloader = getattr(self.stream.ssl_context, "crishim_reloader", None)
            if reloader is not None:
                reloader.stop()  # its timer would otherwise outlive the server
        if self.grpc_server is not None:
            # CRI calls were served through the stream drain; now new ones are refused,
            # and those in progress (a PullImage, an ExecSync) get what is left of the
            # drain, at least 1 s (or 1 s after a second signal); the event streams end
            if self.cri_handler is not None:
                self.cri_handler.end_streams()
            if self.health_handler is not None:
                self.health_handler.end_watches()
            left = deadline - (time.monotonic() - started)
            await self._stop_grpc(1.0 if self._drain_cut.is_set() else max(1.0, left))
        if self.upstream is not None:
            await self.upstream.close(None)
        if self.plugin is not None:
            await self.plugin.close()
        try:
            os.unlink(self.config.socket)
        except FileNotFoundError:
            pass


async def run_until_signalled(app: Crishim,
                              on_started: Callable[[], Awaitable[None]] | None = None) -> None:
    stop = stop_on_signals(again=app.cut_drain)
    await app.start()
    freeze_startup_objects()  # long pauses of the cyclic collector: memory.py
    try:
        if on_started is not None:
            await on_started()
        await stop.wait()
        log.info("signal received: draining (up to %gs; another signal closes live "
                 "sessions now)", app.config.drain_timeout)
    finally:
        await app.stop()
    log.info("crishim stopped")
