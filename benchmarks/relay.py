"""Two plain relays in a port-forward's places: its three TCP hops and nothing else.

    python -m benchmarks.relay --to-ports P1,P2,.. [--netns PATH]
        prints the ports it listens on, one per target, in the same order

A relay accepts on 127.0.0.1 and, per connection, dials its listener's target port on
127.0.0.1 (inside the netns at PATH, if given) and copies bytes both ways: a thread per
direction, blocking recv_into/sendall with a 1 MiB buffer (or, with --splice, splice(2)
through a 1 MiB pipe: the bytes never enter the process), half-close passed on. No framing,
no event loop, no Python per byte. A port-forward moves each byte over three TCP hops (the
user's socket to the client, the client to the stream server, the server to the pod) where
direct TCP uses one; benchmarks.portforward chains two relays in the client's and the
server's places (the second dials into the sandbox netns) and measures the chain like every
path, as the reference for what those hops alone allow on this machine.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import sys
import threading
from collections.abc import Callable

from crishim.netns import open_netns, socket_in_netns

CHUNK = 1 << 20
Mover = Callable[[socket.socket, socket.socket], None]


def _copy(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while n := src.recv_into(buf):
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _splice(src: socket.socket, dst: socket.socket) -> None:
    """The same through a pipe with splice(2): the bytes never enter this process."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
        while n := os.splice(src.fileno(), w, CHUNK):
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)


def dial(port: int, netns: str | None) -> socket.socket:
    """A blocking connection to 127.0.0.1:port, made inside the netns at that path (if
    given); benchmarks.portforward's direct path uses it too."""
    if netns is None:
        s = socket.socket()
    else:
        fd = open_netns(netns)
        try:
            s = socket_in_netns(fd, socket.AF_INET)
        finally:
            os.close(fd)
        s.setblocking(True)
    s.connect(("127.0.0.1", port))
    return s


def _relay(client: socket.socket, port: int, netns: str | None, move: Mover) -> None:
    try:
        upstream = dial(port, netns)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=move, args=(upstream, client), daemon=True)
    back.start()
    move(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _accept(listener: socket.socket, port: int, netns: str | None, move: Mover) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, port, netns, move), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to-ports", required=True, help="comma-separated ports to dial")
    ap.add_argument("--netns", help="dial inside the netns at this path")
    ap.add_argument("--splice", action="store_true",
                    help="move bytes with splice(2) through a pipe instead of copying them")
    args = ap.parse_args()
    move = _splice if args.splice else _copy
    targets = [int(p) for p in args.to_ports.split(",")]
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in targets]
    print(" ".join(str(s.getsockname()[1]) for s in listeners), flush=True)
    threads = [threading.Thread(target=_accept, args=(s, p, args.netns, move), daemon=True)
               for s, p in zip(listeners, targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
