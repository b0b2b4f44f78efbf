"""Client-side checks shared by the end-to-end tests: each talks to one of the pod
servers of tests/support/podnet.py through whatever local port a forward gives."""

from __future__ import annotations

import hashlib
import socket
import threading

from tests.support.podnet import HTTP_BODY, source_bytes

MiB = 1 << 20


def connect(port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_line(s: socket.socket) -> bytes:
    """One answer line, read to its newline (or the end): it may come in pieces."""
    answer = b""
    while not answer.endswith(b"\n"):
        piece = s.recv(4096)
        if not piece:
            break
        answer += piece
    return answer


def http_request(s: socket.socket) -> bytes:
    """One GET on an open connection (keep-alive: may be called again)."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n")
    data = b""
    while not data.endswith(HTTP_BODY):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def http_get(port: int, host: str = "127.0.0.1") -> bytes:
    with connect(port, host) as s:
        return http_request(s)


def upload_sha(port: int, size: int) -> tuple[str, str]:
    """Send size bytes to the sink; returns (what the pod hashed, what we sent)."""
    payload = source_bytes(size)
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = recv_all(s).decode()
    count, digest = answer.split()
    assert int(count) == size, answer
    return digest, hashlib.sha256(payload).hexdigest()


def download_sha(port: int, size: int) -> tuple[str, str]:
    with connect(port) as s:
        s.sendall(b"%d\n" % size)
        h = hashlib.sha256()
        n = 0
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            h.update(data)
            n += len(data)
    assert n == size, (n, size)
    return h.hexdigest(), hashlib.sha256(source_bytes(size)).hexdigest()


def echo_half_close(port: int, payload: bytes) -> bytes:
    """Send, shut down writing, and still read the whole answer."""
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def concurrent_echoes(port: int, count: int, size: int = 4096) -> list[bool]:
    """count connections open at once, each echoing its own payload."""
    results = [False] * count
    socks = [connect(port) for _ in range(count)]
    payloads = [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(count)]

    def run(i: int) -> None:
        s = socks[i]
        try:
            s.sendall(payloads[i])
            s.shutdown(socket.SHUT_WR)
            results[i] = recv_all(s) == payloads[i]
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def reset_by_pod(port: int, first: bytes = b"hello") -> bytes:
    """Send first, read to the end: what came back, b'' when the connection was ended
    without an answer (EOF or a reset: the pod reset it, or nothing listens there)."""
    with connect(port, timeout=20) as s:
        s.sendall(first)
        try:
            return recv_all(s)
        except ConnectionResetError:
            return b""
