"""Prometheus metrics (off unless metrics_address is set): sessions and forwarded
connections by transport, bytes each way, failures by reason, tokens, netns dial latency."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from crishim import __version__
from crishim.config import host_port
from crishim.tokens import TokenStore

log = logging.getLogger("crishim.metrics")

FAILURE_KINDS = ("dial_refused", "dial_unavailable", "dial_timeout", "pod_reset",
                 "sandbox_gone", "plugin_error", "creation_timeout", "limit", "other")


class _TokenCollector:
    """Token counts read from the store at scrape time: nothing added to the hot path."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = CounterMetricFamily("crishim_tokens", "Stream URL tokens by event",
                                     labels=["event"])
        for event in ("issued", "redeemed", "expired", "refused"):
            family.add_metric([event], getattr(self.tokens, event))
        yield family
        yield GaugeMetricFamily("crishim_tokens_outstanding",
                                "Stream URLs issued and neither redeemed nor expired "
                                "(at most max_tokens)", value=len(self.tokens))


class Metrics:
    def __init__(self, tokens: TokenStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Counter("crishim_sessions", "Streaming sessions started",
                                ["transport"], registry=r)
        self.sessions_active = Gauge("crishim_sessions_active", "Live streaming sessions",
                                     ["transport"], registry=r)
        self.connections = Counter("crishim_forwarded_connections",
                                   "Forwarded connections started", ["transport"], registry=r)
        self.connections_active = Gauge("crishim_forwarded_connections_active",
                                        "Live forwarded connections", ["transport"],
                                        registry=r)
        self.bytes = Counter("crishim_forwarded_bytes", "Bytes forwarded, by direction",
                             ["transport", "direction"], registry=r)
        self.failures = Counter("crishim_forward_failures",
                                "Forwarded connections that failed, by reason",
                                ["reason"], registry=r)
        self.dial = Histogram("crishim_netns_dial_seconds",
                              "Time to connect to a port inside a sandbox", registry=r,
                              buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025,
                                       .05, .1, .25, 1, 5))
        r.register(_TokenCollector(tokens))
        # crishim's own version stays visible when Version answers for the upstream
        Gauge("crishim_build_info", "crishim's version (always 1)", ["version"],
              registry=r).labels(__version__).set(1)

    def serve(self, address: str) -> None:
        host, port = host_port(address, "metrics_address")
        _MetricsServer.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = make_server(host, port, make_wsgi_app(self.registry), _MetricsServer,
                                 handler_class=_QuietHandler)
        except OSError as e:  # in use, not an address of this host, a name that won't resolve
            raise OSError(f"metrics_address {address}: cannot listen: {e.strerror or e}"
                          ) from None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s/metrics", address)

    # --- hooks called by the stream server and the forwarding core ----------------------
    def session_started(self, transport: str) -> None:
        self.sessions.labels(transport).inc()
        self.sessions_active.labels(transport).inc()

    def session_ended(self, transport: str) -> None:
        self.sessions_active.labels(transport).dec()

    def connection_started(self, transport: str) -> None:
        self.connections.labels(transport).inc()
        self.connections_active.labels(transport).inc()

    def connection_ended(self, transport: str, up: int, down: int) -> None:
        self.connections_active.labels(transport).dec()
        self.bytes.labels(transport, "to_pod").inc(up)
        self.bytes.labels(transport, "from_pod").inc(down)

    def failure(self, kind: str) -> None:
        self.failures.labels(kind if kind in FAILURE_KINDS else "other").inc()

    def dial_seconds(self, seconds: float) -> None:
        self.dial.observe(seconds)


# Scrapes served at once, and how long one may take to send its request: the endpoint
# costs crishim a thread and a descriptor per connection (prometheus_client's own server
# keeps both for as long as a client holds the connection open, without limit)
METRICS_CONNECTIONS = 8
METRICS_TIMEOUT = 10.0


class _DeadlineReader(io.RawIOBase):
    """A scrape's socket, read with what is left of its deadline as the timeout of each
    read: however the client trickles, reading its request ends at the deadline (no
    thread or timer of its own)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the scrape's request took longer than its deadline")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    """A scrape has METRICS_TIMEOUT from its connect to its whole request: a socket
    timeout alone dropped only a silent client (8 clients sending a byte every 5 s held
    every slot for good)."""

    timeout = METRICS_TIMEOUT  # a socket timeout: a silent client is dropped

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # makefile's: held open it would keep the socket from closing
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, time.monotonic() + METRICS_TIMEOUT))

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not logged


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, at most METRICS_CONNECTIONS at once: past them a connection
    is closed at once (the scraper retries at its next interval)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a scraper's dropped or silent connection (socket timeout): not crishim's fault,
        # and socketserver's default prints a traceback
        log.debug("metrics: connection from %s ended early", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
