"""The stand-in's kernel relay for established upgrades, in its own process if asked.

``SpliceRelay`` relays one established connection pair as the kubelet's Go proxy does
(Go's TCPConn.ReadFrom splices TCP to TCP on Linux). ``KubeStandIn(relay_process=True)``
runs its relays in a process of their own, ``python -m tests.support.splice_relay FD``,
as the API server and the kubelet are processes of their own: the benchmarks use it so
that the relay neither shares a GIL with the process that drives the transfers nor hides
its CPU in that process's figure (three alternated runs each way moved kubectl 1.27's
ratios only within the host's noise; the relay is 22-29 % of a core of its own). The
process receives each pair as two descriptors over the unix socket FD (SCM_RIGHTS) and
ends, shutting its relays down, when that socket closes.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import threading


class SpliceRelay:
    """A thread per direction moves bytes socket -> pipe -> socket with splice(2), EOF
    becomes shutdown(SHUT_WR) on the other side, and the pair is closed once both
    directions have ended."""

    CHUNK = 1 << 20

    def __init__(self, client_fd: int, backend_fd: int) -> None:
        self.socks = [socket.socket(fileno=client_fd), socket.socket(fileno=backend_fd)]
        for sock in self.socks:
            sock.setblocking(True)
        self._lock = threading.Lock()
        self._open = 2
        self.threads = [threading.Thread(target=self._pump, args=(0, 1), daemon=True),
                        threading.Thread(target=self._pump, args=(1, 0), daemon=True)]
        for t in self.threads:
            t.start()

    def _pump(self, src: int, dst: int) -> None:
        rfd, wfd = os.pipe()
        try:  # as Go's splice pipes: a splice moves up to CHUNK, not the default 64 KiB
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, self.CHUNK)
        except OSError:
            pass  # a smaller pipe works, in more calls (Go ignores this error too)
        src_fd, dst_fd = self.socks[src].fileno(), self.socks[dst].fileno()
        failed = False
        try:
            while True:
                n = os.splice(src_fd, wfd, self.CHUNK)
                if n == 0:
                    break
                while n:
                    n -= os.splice(rfd, dst_fd, n)
        except OSError:
            failed = True  # a reset on one side: the other side is torn down too
        finally:
            os.close(rfd)
            os.close(wfd)
        try:
            self.socks[dst].shutdown(socket.SHUT_RDWR if failed else socket.SHUT_WR)
            if failed:
                self.socks[src].shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            for sock in self.socks:
                sock.close()

    def shutdown(self) -> None:
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(control: socket.socket) -> None:
    """Relay each descriptor pair received on ``control`` until it closes."""
    relays: list[SpliceRelay] = []
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, 16, 2)
        except OSError:
            break
        if not msg and not fds:
            break  # the stand-in stopped
        if len(fds) == 2:
            relays.append(SpliceRelay(*fds))
        else:
            for fd in fds:
                os.close(fd)
    for relay in relays:
        relay.shutdown()
    for relay in relays:
        for t in relay.threads:
            t.join(timeout=5)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
