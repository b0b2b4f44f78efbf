"""Stream servers that misbehave, for the client's tests: a loopback (or unix) listener
whose accept loop runs on a thread of its own and hands each connection to `handle`."""

from __future__ import annotations

import socket
import threading


class FakeServer:
    """Accepts on 127.0.0.1 (or `unix_path`) and calls `handle(conn)` for each connection,
    on the accept thread; `accepted` is set once a client connected. `close` stops
    accepting and closes the connections kept in `held`."""

    def __init__(self, backlog: int = 16, unix_path: str | None = None) -> None:
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(unix_path)
            self.port = 0
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.sock.listen(backlog)
        self.accepted = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return  # closed
            self.accepted.set()
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
