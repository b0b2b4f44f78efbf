"""What one more forwarded connection costs an HTTP/2 session that already carries many.

    python3 -m benchmarks.h2_streams [--live 0,100,500,2000] [--new 40] [--rounds 5]

Drives crishim's H2Codec as client and server in one process (no sockets, so only the
codec's own work is timed): `live` connections (two streams each, as crishim's client
opens them) are opened, then `new` more, and the server's receive of their HEADERS is
timed. The client writes its headers as crishim's does (LiteralHeaderEncoder). Each count
is run with the codec as shipped, with h2's stock stream count (`H2Connection._open_streams`,
which walks every held stream at every open) and with h2's stock handling of received
headers (hpack's decoder and h2's validation, which H2Codec replaces), alternated in one
run; the figures are medians of `rounds`, and each row shows its ratio to the same code
with no live connections and to the codec as shipped. crishim serve allows
max_connections_per_session (4096 by default) connections per HTTP/2 session, as per
SPDY session.
"""

from __future__ import annotations

import argparse
import statistics
import time

import h2.config
import h2.connection
import h2.settings
import hpack

from crishim.protocols.h2 import H2Codec, LiteralHeaderEncoder

BASE = [(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1:10250"),
        (":path", "/portforward/0123456789abcdef0123456789abcdef")]


class StockCount(H2Codec):
    """The codec with h2's own stream count: the baseline."""

    _open_streams = h2.connection.H2Connection._open_streams


class StockHeaders(H2Codec):
    """The codec with hpack's decoder and h2's own inbound header validation."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.config.validate_inbound_headers = True
        self.config.header_encoding = "utf-8"
        self._check_headers = False
        self._decode_as = None
        limit = self.decoder.max_header_list_size
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = limit


def _out(codec: H2Codec) -> bytes:
    return b"".join(bytes(p) for p in codec.take_output())


def _session(cls: type[H2Codec], streams: int) -> tuple[H2Codec, H2Codec]:
    client = cls(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                           validate_outbound_headers=False))
    server = cls(h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                           validate_inbound_headers=True,
                                           validate_outbound_headers=False))
    server.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: streams})
    client.encoder = LiteralHeaderEncoder()
    return connect(client, server)


def connect(client: H2Codec, server: H2Codec) -> tuple[H2Codec, H2Codec]:
    """The two codecs past the preface and both SETTINGS exchanges."""
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(2):
        server.receive_data(_out(client))
        client.receive_data(_out(server))
    return client, server


def _connection(client: H2Codec, n: int) -> bytes:
    for kind, end in (("error", True), ("data", False)):
        client.send_headers(client.get_next_available_stream_id(), BASE + [
            ("streamtype", kind), ("port", "8080"), ("requestid", str(n))], end_stream=end)
    return _out(client)


def new_connection_us(cls: type[H2Codec], live: int, new: int) -> float:
    client, server = _session(cls, 2 * (live + new))
    for n in range(live):
        server.receive_data(_connection(client, n))
    wires = [_connection(client, live + n) for n in range(new)]
    start = time.perf_counter()
    for wire in wires:
        server.receive_data(wire)
    return (time.perf_counter() - start) / new * 1e6


CODECS = (("crishim", H2Codec), ("stock h2 stream count", StockCount),
          ("stock h2 headers", StockHeaders))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", default="0,100,500,2000")
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    counts = [int(c) for c in args.live.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for live in counts:
            for name, cls in CODECS:
                results.setdefault((name, live), []).append(
                    new_connection_us(cls, live, args.new))
    print(f"server receive of one new connection's two HEADERS, median of {args.rounds}:")
    print(f"{'codec':24} {'live':>6} {'us':>8} {'x none live':>12} {'x crishim':>10}")
    for name, _ in CODECS:
        zero = statistics.median(results[(name, counts[0])])
        for live in counts:
            us = statistics.median(results[(name, live)])
            ours = statistics.median(results[("crishim", live)])
            print(f"{name:24} {live:6d} {us:8.0f} {us / zero:11.2f}x {us / ours:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
