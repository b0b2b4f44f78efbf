"""What opening one forwarded connection costs each stream protocol's codec, no sockets.

    python3 -m benchmarks.codec_cost [--connections 2000] [--rounds 5]

crishim's client and server codecs in one process, as crishim port-forward and crishim
serve drive them: the client opens a connection's error and data streams and sends one
byte; the server decodes that, answers both streams and sends one byte back; the client
decodes the answer. Each step is timed per connection (median over `connections`, after
a warm-up), for HTTP/2 (H2Codec, on the h2 library) and SPDY/3.1 (crishim's own codec),
alternated over `rounds`; HTTP/2's figures are printed as a ratio to SPDY's. This is the
part of a connection's first byte and of a storm's cost per connection that is protocol
handling in Python rather than system calls and wake-ups (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import h2.config
import h2.settings

from benchmarks.h2_streams import connect
from crishim.protocols.h2 import H2Codec, LiteralHeaderEncoder
from crishim.protocols.spdy.connection import SpdyConfig, SpdyConnection

STEPS = ("client opens", "server decodes", "server answers", "client decodes")
PATH = "/portforward/0123456789abcdef0123456789abcdef"


def _wire(codec: H2Codec | SpdyConnection) -> bytes:
    return b"".join(bytes(p) for p in codec.take_output())


def _h2_codec(client_side: bool, settings: dict[int, int]) -> H2Codec:
    """Configured as crishim port-forward's (client) or crishim serve's (server)."""
    codec = H2Codec(h2.config.H2Configuration(
        client_side=client_side, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False))
    codec.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
    codec.encoder = LiteralHeaderEncoder()
    return codec


def _h2_pair() -> tuple[H2Codec, H2Codec]:
    codes = h2.settings.SettingCodes
    return connect(
        _h2_codec(True, {codes.INITIAL_WINDOW_SIZE: 1 << 24, codes.MAX_FRAME_SIZE: 256 << 10,
                         codes.ENABLE_PUSH: 0}),
        _h2_codec(False, {codes.MAX_CONCURRENT_STREAMS: 1 << 20,
                          codes.INITIAL_WINDOW_SIZE: 1 << 22,
                          codes.MAX_FRAME_SIZE: 256 << 10}))


def h2_connection(client: H2Codec, server: H2Codec, n: int) -> list[float]:
    base = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1:10250"),
            (":path", PATH)]
    t0 = time.perf_counter()
    extra = [("streamtype", "error"), ("port", "8080"), ("requestid", str(n)),
             ("x-stream-protocol-version", "portforward.k8s.io")]
    error_id = client.get_next_available_stream_id()
    client.send_headers(error_id, base + extra, end_stream=True)
    extra[0] = ("streamtype", "data")
    data_id = client.get_next_available_stream_id()
    client.send_headers(data_id, base + extra)
    client.send_data(data_id, b"x")
    wire = _wire(client)
    t1 = time.perf_counter()
    server.receive_data(wire)
    t2 = time.perf_counter()
    for sid in (error_id, data_id):
        server.send_headers(sid, [(":status", "200"),
                                  ("x-stream-protocol-version", "portforward.k8s.io")])
    server.send_data(data_id, b"x")
    server.acknowledge_received_data(1, data_id)
    wire = _wire(server)
    t3 = time.perf_counter()
    client.receive_data(wire)
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def _spdy_pair() -> tuple[SpdyConnection, SpdyConnection]:
    client, server = SpdyConnection(SpdyConfig(client=True)), SpdyConnection(SpdyConfig())
    server.receive_data(_wire(client))
    client.receive_data(_wire(server))
    return client, server


def spdy_connection(client: SpdyConnection, server: SpdyConnection, n: int) -> list[float]:
    t0 = time.perf_counter()
    headers = {"streamtype": "error", "port": "8080", "requestid": str(n)}
    error_id = client.open_stream(headers, fin=True)
    data_id = client.open_stream(dict(headers, streamtype="data"))
    client.send_data(data_id, b"x")
    wire = _wire(client)
    t1 = time.perf_counter()
    server.receive_data(wire)
    t2 = time.perf_counter()
    server.reply(error_id)
    server.reply(data_id)
    server.send_data(data_id, b"x")
    wire = _wire(server)
    t3 = time.perf_counter()
    client.receive_data(wire)
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def measure(pair: Callable[[], tuple], one: Callable[..., list[float]],
            connections: int) -> list[float]:
    """Median microseconds per step over `connections`, after as many to warm up."""
    client, server = pair()
    for n in range(connections):
        one(client, server, n)
    samples = [one(client, server, connections + n) for n in range(connections)]
    return [statistics.median(s[i] for s in samples) * 1e6 for i in range(len(STEPS))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows: dict[str, list[list[float]]] = {"h2": [], "spdy": []}
    for _ in range(args.rounds):
        rows["spdy"].append(measure(_spdy_pair, spdy_connection, args.connections))
        rows["h2"].append(measure(_h2_pair, h2_connection, args.connections))
    med = {k: [statistics.median(r[i] for r in v) for i in range(len(STEPS))]
           for k, v in rows.items()}
    print(f"codec work per forwarded connection, us (median of {args.rounds} rounds of "
          f"{args.connections}):")
    print(f"{'step':16} {'spdy':>8} {'h2':>8} {'h2 / spdy':>10}")
    for i, step in enumerate(STEPS):
        print(f"{step:16} {med['spdy'][i]:8.1f} {med['h2'][i]:8.1f} "
              f"{med['h2'][i] / med['spdy'][i]:9.1f}x")
    total_spdy, total_h2 = sum(med["spdy"]), sum(med["h2"])
    print(f"{'total':16} {total_spdy:8.1f} {total_h2:8.1f} {total_h2 / total_spdy:9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
