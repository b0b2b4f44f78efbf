"""crishim check's verdicts where the runtime misbehaves in ways only a fault shows: the
battery's own logic, its connections stubbed (the real-socket runs are in
tests/integration/test_client_check.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crishim.client import check
from crishim.client.cri import CriError


def _checker(timeout: float = 1.0) -> check.Checker:
    args = argparse.Namespace(sandbox="sb", transport="spdy", port=0, size=1,
                              insecure_skip_tls_verify=False, certificate_authority=None,
                              timeout=timeout, netns=None, no_servers=False)
    return check.Checker(None, args)  # type: ignore[arg-type]  # no CRI call is made


class _Writer:
    def write(self, data: bytes) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def _connections(checker: check.Checker, readers: list[asyncio.StreamReader]) -> None:
    """Each connection the checker opens gets the next reader."""
    @contextlib.asynccontextmanager
    async def connection(port: int) -> AsyncIterator[tuple[Any, Any]]:
        yield readers.pop(0), _Writer()

    checker.connection = connection  # type: ignore[method-assign]


def test_a_connection_the_runtime_leaves_open_is_no_clean_eof() -> None:
    """The pod's side reset, the runtime kept the client's connection open: that passed as
    'ended with a clean EOF (no error reported); the session survived'."""
    async def go() -> tuple[str, str]:
        checker = _checker(timeout=0.2)  # --timeout: each read's wait
        checker.peers = argparse.Namespace(ports={"echo": 1}, close=lambda: None)  # type: ignore[assignment]
        hung, echo = asyncio.StreamReader(), asyncio.StreamReader()
        echo.feed_data(b"still there?")
        _connections(checker, [hung, echo])
        return await checker._failing_then_survive(2, b"x")

    result, detail = asyncio.run(go())
    assert result == "fail"
    assert detail.startswith("no EOF and no error within 0.2 s"), detail


@pytest.mark.parametrize("sent, result", [(b"", "warn"), (b"220 hello", "pass")])
def test_connect_says_what_happened_to_the_connection(sent: bytes, result: str) -> None:
    """`connect` said 'accepted and stayed up 1 s' of a connection that ended in 2 ms."""
    async def go() -> tuple[str, str]:
        checker = _checker()
        checker.port = 9
        reader = asyncio.StreamReader()
        if sent:
            reader.feed_data(sent)
        else:
            reader.feed_eof()
        _connections(checker, [reader])
        return await checker.check_connect_user_port()

    got, detail = asyncio.run(go())
    assert got == result, detail
    assert "stayed up" not in detail


def test_the_runtime_gone_mid_check_leaves_the_table(monkeypatch) -> None:
    """A CriError while asking for the UDP check's session (the runtime stopped
    mid-check) escaped run(), and every result was lost."""
    async def gone() -> str:
        raise CriError("the runtime at unix:///x is unavailable: gone")

    async def ran(self: check.Checker, name: str, fn: Any, required: bool = True) -> None:
        self.add(name, "pass", "", 0.0, required)

    async def no_netns(self: check.Checker) -> None:
        pass

    monkeypatch.setattr(check.Checker, "run_check", ran)
    monkeypatch.setattr(check.Checker, "find_netns", no_netns)
    checker = _checker()
    checker.port = 80
    monkeypatch.setattr(checker, "udp_unavailable", gone)
    asyncio.run(checker._run_checks())
    udp = next(r for r in checker.results if r.name == "udp-echo")
    assert udp.result == "skip" and "is unavailable: gone" in udp.detail
    assert [r.name for r in checker.results][-1] == "connect"


@pytest.mark.parametrize("handshake_seconds, blamed", [(0.01, "dial"), (1.2, "netns")])
def test_the_first_data_checks_session_setup_is_not_taken_for_a_dials_wait(handshake_seconds,
                                                                         blamed):
    """Every data check's connection failed in the forwarding after 1.5 s. Where opening a
    session took 0.01 s, that is a dial with no answer; where it took 1.2 s (a slow
    cluster's CRI call and upgrade, which the first data check also waited for), the
    connections were refused at once, as a wrong netns refuses them: the --netns hint."""
    checker = _checker()
    checker.peers = object()  # type: ignore[assignment]  # servers in the netns: any
    checker.netns = "/var/run/netns/elsewhere"
    checker.netns_arg = "/var/run/netns/elsewhere"
    checker.results = [
        check.CheckResult("handshake:spdy", "pass", "upgraded", handshake_seconds, True),
        check.CheckResult("echo-sha256", "fail",
                          "ForwardError: the server reset the connection (RST_STREAM CANCEL)",
                          1.5, True),
        check.CheckResult("concurrent", "fail", "0/20 echoed", 1.5, True),
    ]
    hint = checker.unreached_servers_hint()
    assert ("got no answer" in hint) == (blamed == "dial"), hint
    assert ("--netns PATH" in hint) == (blamed == "netns"), hint
