"""Run `crishim serve` as a real subprocess and talk to it over its real unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crishim.cri import api_pb2, api_pb2_grpc


class CrishimProcess:
    #: every server log of this test run: the integration layer fails the run if any of
    #: them holds a traceback (peer input must never produce one)
    logs: list[str] = []

    def __init__(self, *args: str, socket_path: str | None = None,
                 env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="crishim-test-")
        self.socket = socket_path or os.path.join(self.dir, "crishim.sock")
        self.args = list(args)
        self.env = env
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) for the server process
        self.log_path = os.path.join(self.dir, "crishim.log")
        CrishimProcess.logs.append(self.log_path)
        self.proc: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None

    def start(self, wait: bool = True) -> CrishimProcess:
        env = dict(os.environ, **(self.env or {}))
        self._log = open(self.log_path, "wb")
        # the limit is set by prlimit(1), which then execs crishim (same pid), not by a
        # preexec_fn: that makes subprocess fork this gRPC-using process, and gRPC's fork
        # handler restarts its poller in the child, which dies on the epoll descriptor
        # close_fds closed (SIGABRT before exec, "epoll_wait error: Bad file descriptor";
        # grpc/grpc#43055)
        limit = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--"] \
            if self.nofile else []
        self.proc = subprocess.Popen(
            [*limit, sys.executable, "-m", "crishim", "serve", "--socket", self.socket,
             "--log-level", "debug", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crishim exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    # health, not Version: with an upstream, Version is the upstream's answer
                    health_pb2_grpc.HealthStub(self.channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"crishim not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel("unix://" + self.socket)
        return self._channel

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(self.channel)

    def port_forward_url(self, sandbox_id: str, ports: list[int] = ()) -> str:
        return self.runtime.PortForward(
            api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id, port=list(ports)),
            timeout=10).url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> CrishimProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
