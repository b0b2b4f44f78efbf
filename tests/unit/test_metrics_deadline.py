"""The metrics endpoint's scrapes end METRICS_TIMEOUT after they connect, however they
trickle: a socket timeout alone dropped only silent clients, and 8 clients sending a byte
every few seconds held every slot (scrapes were refused) for as long as they liked."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from crishim import metrics
from crishim.tokens import TokenStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trickling_clients_are_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "METRICS_TIMEOUT", 1.0)
    port = _free_port()
    metrics.Metrics(TokenStore()).serve(f"127.0.0.1:{port}")
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
               for _ in range(metrics.METRICS_CONNECTIONS)]
    try:
        for c in clients:
            c.sendall(b"G")
        cut = []
        deadline = time.monotonic() + 4
        while len(cut) < len(clients) and time.monotonic() < deadline:
            time.sleep(0.25)  # a byte every 0.25 s: never silent for the socket timeout
            for c in clients:
                if c in cut:
                    continue
                try:
                    c.sendall(b"E")
                    c.settimeout(0.01)
                    if c.recv(100) == b"":
                        cut.append(c)
                except TimeoutError:
                    pass
                except OSError:
                    cut.append(c)
        assert len(cut) == len(clients)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"crishim_build_info" in body  # the slots are free again
    finally:
        for c in clients:
            c.close()
