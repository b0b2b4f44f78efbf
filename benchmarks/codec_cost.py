"""What each stream protocol's codec costs crishim: per connection opened, per MiB moved.

    python3 -m benchmarks.codec_cost [--connections 2000] [--mib 64] [--rounds 5]

crishim's client and server codecs in one process, as crishim port-forward and crishim
serve drive them: the client opens a connection's error and data streams and sends one
byte; the server decodes that, answers both streams and sends one byte back; the client
decodes the answer. Each step is timed per connection (median over `connections`, after
a warm-up), for HTTP/2 (H2Codec, on the h2 library) and SPDY/3.1 (crishim's own codec),
alternated over `rounds`; HTTP/2's figures are printed as a ratio to SPDY's. This is the
part of a connection's first byte and of a storm's cost per connection that is protocol
handling in Python rather than system calls and wake-ups (benchmarks/README.md).

Then bulk data: `mib` MiB of DATA, framed as the sender frames it, decoded in 1 MiB reads
by the receiver as crishim drives it (crishim serve decodes uploads from its reused read
buffer, `lent`; crishim port-forward decodes downloads from a fresh `bytes` per read and
acknowledges HTTP/2 data per read), for SPDY, SPDY over WebSocket (as crishim's client
frames it, and as kubectl 1.30+ does: a frame per write) and HTTP/2, as ms per MiB and a
ratio to SPDY's: what decoding costs beside the kernel's share of a transfer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import h2.config
import h2.events
import h2.settings

from benchmarks.h2_streams import connect
from crishim.flow import READ_SIZE
from crishim.protocols.h2 import H2Codec, LiteralHeaderEncoder
from crishim.protocols.spdy.connection import SpdyConfig, SpdyConnection
from crishim.protocols.spdy.events import DataReceived as SpdyData
from crishim.protocols.websocket import ByteStreamTunnel
from crishim.stream.portforward_spdy import SEND_FRAME

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


# --------------------------------------------------------------------------- bulk data

Decode = Callable[[memoryview | bytes], int]  # one read in, DATA bytes out


def _spdy_bulk(upload: bool, tunnel: bool, mib: int) -> tuple[Decode, bytes]:
    """A receiver's decode and the wire of `mib` MiB on one stream (serve's and the
    client's SPDY configurations; over WebSocket, masked from the client)."""
    client = SpdyConnection(SpdyConfig(client=True, zero_copy=True, max_send_frame=256 << 10))
    server = SpdyConnection(SpdyConfig(zero_copy=True, max_send_frame=SEND_FRAME))
    server.receive_data(_wire(client))
    client.receive_data(_wire(server))
    sid = client.open_stream({"streamtype": "data"})
    server.receive_data(_wire(client))
    server.reply(sid)
    client.receive_data(_wire(server))
    sender, receiver = (client, server) if upload else (server, client)
    chunk = bytes(range(256)) * 4096
    for _ in range(mib):
        sender.send_data(sid, chunk)
    wire = _wire(sender)
    if tunnel:
        out = ByteStreamTunnel(client=upload)
        out.send(wire)
        wire = b"".join(bytes(b) for b in out.take_output())
        inbound = ByteStreamTunnel(client=not upload)

        def decode_tunnel(data: memoryview | bytes) -> int:
            n = 0
            for event in inbound.receive_data(data):
                for ev in receiver.receive_data(event.data, lent=upload and
                                                type(event.data) is not bytes):
                    if type(ev) is SpdyData:
                        n += len(ev.data)
            return n
        return decode_tunnel, wire

    def decode(data: memoryview | bytes) -> int:
        n = 0
        for ev in receiver.receive_data(data, lent=upload):
            if type(ev) is SpdyData:
                n += len(ev.data)
        return n
    return decode, wire


def _kubectl_tunnel_bulk(upload: bool, mib: int) -> tuple[Decode, bytes]:
    """SPDY over WebSocket as kubectl 1.30+ sends it: client-go's spdystream writes a DATA
    frame of up to 32 KiB in three writes (stream id, flags and length, payload), and its
    tunnel makes each write a masked WebSocket frame of its own. Downloads: as
    spdy-over-websocket (crishim serve frames them)."""
    if not upload:
        return _spdy_bulk(False, True, mib)
    decode, _ = _spdy_bulk(True, True, 0)  # the receiving side, connected
    client = SpdyConnection(SpdyConfig(client=True, zero_copy=True, max_send_frame=32 << 10))
    server = SpdyConnection(SpdyConfig(zero_copy=True, max_send_frame=SEND_FRAME))
    server.receive_data(_wire(client))
    sid = client.open_stream({"streamtype": "data"})  # as the receiver's own client did
    _wire(client)
    chunk = bytes(range(256)) * 128
    for _ in range(mib * 32):
        client.send_data(sid, chunk)
    spdy_wire = _wire(client)
    out = ByteStreamTunnel(client=True)
    pos = 0
    while pos < len(spdy_wire):
        size = int.from_bytes(spdy_wire[pos + 5:pos + 8], "big")
        for piece in (spdy_wire[pos:pos + 4], spdy_wire[pos + 4:pos + 8],
                      spdy_wire[pos + 8:pos + 8 + size]):
            out.send(piece)  # a frame per write
        pos += 8 + size
    return decode, b"".join(bytes(b) for b in out.take_output())


def _h2_bulk(upload: bool, mib: int) -> tuple[Decode, bytes]:
    codes = h2.settings.SettingCodes
    big = {codes.INITIAL_WINDOW_SIZE: (1 << 31) - 1, codes.MAX_FRAME_SIZE: 1 << 20}
    client, server = connect(_h2_codec(True, {**big, codes.ENABLE_PUSH: 0}),
                             _h2_codec(False, big))
    for codec in (client, server):
        codec.max_inbound_frame_size = 1 << 20
        codec.increment_flow_control_window((1 << 31) - 1 - 65535)
    server.receive_data(_wire(client))
    client.receive_data(_wire(server))
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                              (":authority", "x"), (":path", PATH)])
    server.receive_data(_wire(client))
    server.send_headers(sid, [(":status", "200")])
    client.receive_data(_wire(server))
    sender, receiver = (client, server) if upload else (server, client)
    frame = 256 << 10  # serve's MAX_FRAME_SIZE; the client's sends are as big
    chunk = memoryview(bytes(range(256)) * (frame // 256))
    for _ in range(mib * (1 << 20) // frame):
        sender.send_data(sid, chunk)
    wire = _wire(sender)

    def decode(data: memoryview | bytes) -> int:
        n = 0
        for ev in receiver.receive_data(data, lent=upload):
            if isinstance(ev, h2.events.DataReceived):
                n += len(ev.data)
        receiver.acknowledge_received_data(n, sid)  # one WINDOW_UPDATE per read
        receiver.take_output()
        return n
    return decode, wire


BULK = (("spdy", lambda up, mib: _spdy_bulk(up, False, mib)),
        ("spdy-over-websocket", lambda up, mib: _spdy_bulk(up, True, mib)),
        ("kubectl 1.30+ tunnel", _kubectl_tunnel_bulk),
        ("h2", _h2_bulk))


def bulk_ms_per_mib(make: Callable[[bool, int], tuple[Decode, bytes]], upload: bool,
                    mib: int) -> float:
    """The decode alone: the reads' own copies (the kernel's into serve's buffer, the
    client's into a fresh bytes) are the same for every transport and not timed."""
    decode, wire = make(upload, mib)
    reused = bytearray(READ_SIZE)
    got = 0
    elapsed = 0.0
    for pos in range(0, len(wire), READ_SIZE):
        piece = wire[pos:pos + READ_SIZE]
        if upload:  # crishim serve: the loop's read buffer, lent
            reused[:len(piece)] = piece
            read: memoryview | bytes = memoryview(reused)[:len(piece)]
        else:  # crishim port-forward: a fresh bytes per read
            read = piece
        start = time.perf_counter()
        got += decode(read)
        elapsed += time.perf_counter() - start
    if got != mib << 20:
        raise RuntimeError(f"decoded {got} of {mib << 20} bytes")
    return elapsed / mib * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64, help="MiB per bulk transfer")
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

    bulk: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for name, make in BULK:
            for upload in (True, False):
                bulk.setdefault((name, upload), []).append(
                    bulk_ms_per_mib(make, upload, args.mib))
    print(f"\ncodec work per MiB of DATA decoded in 1 MiB reads, ms (median of "
          f"{args.rounds} transfers of {args.mib} MiB):")
    print(f"{'transport':22} {'serve, upload':>14} {'x spdy':>7} {'client, download':>17} "
          f"{'x spdy':>7}")
    base = {up: statistics.median(bulk[("spdy", up)]) for up in (True, False)}
    for name, _ in BULK:
        up, down = (statistics.median(bulk[(name, u)]) for u in (True, False))
        print(f"{name:22} {up:14.3f} {up / base[True]:6.1f}x {down:17.3f} "
              f"{down / base[False]:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
