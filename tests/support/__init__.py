"""Helpers shared by the test layers: real peers, processes and stand-ins, no tests."""

import asyncio
import os
from collections.abc import Callable

import pytest

SANDBOX = "sb-test"  # the sandbox id the integration `crishim` fixture serves


def missing(what: str) -> None:
    """A tool the tests drive is not installed: a skip on a developer's box, a failure in
    CI (CI=true), where `deploy/install.sh --test` must have provided it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (CI must have it)")
    pytest.skip(f"{what} is not installed")


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll every 10 ms until predicate() is true; fail the test after timeout seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def status_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/<pid>/status in MiB: VmRSS now, VmHWM the peak."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RecordingChannel:
    """A forwarded connection's client side as a session's transport would carry it (the
    forwarding core's Channel), for tests of the core alone: what the pod sent and how
    the connection ended."""

    def __init__(self) -> None:
        self.down = bytearray()
        self.ended: str | None = None
        self.aborted = False

    def send(self, data: bytes) -> None:
        self.down += data

    def send_eof(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def finish(self, error: str | None) -> None:
        self.ended = error or ""
