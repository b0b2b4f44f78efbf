"""crishim's own CRI PortForward while crishim stops: no URL that could not be redeemed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from crishim.cri import api_pb2
from crishim.cri.service import CriService
from crishim.runtime import Sandbox
from crishim.tokens import TokenStore


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


class _SlowPlugin:
    """A lookup during which the drain begins (the upstream's PodSandboxStatus can take
    up to 10 s)."""

    name = "slow"

    def __init__(self, state: dict[str, bool]) -> None:
        self.state = state

    async def resolve(self, sandbox_id: str) -> Sandbox:
        await asyncio.sleep(0)
        self.state["draining"] = True  # SIGTERM meanwhile
        return Sandbox(sandbox_id, "/run/netns/x")


def test_a_drain_that_begins_during_the_lookup_issues_no_url() -> None:
    """The drain was checked before the plugin's lookup only: a SIGTERM during it still
    issued a URL the draining server then refused."""
    state = {"draining": False}
    tokens = TokenStore(ttl=30, max_outstanding=10)
    service = CriService(_SlowPlugin(state), tokens, lambda t: f"http://h/portforward/{t}",
                         draining=lambda: state["draining"])  # type: ignore[arg-type]
    context: Any = _Context()

    async def go() -> None:
        try:
            await service.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="sb"),
                                      context)
        except _Aborted:
            pass

    asyncio.run(go())
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert context.details.startswith("crishim is shutting down")
    assert len(tokens) == 0
