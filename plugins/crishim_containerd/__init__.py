"""containerd-style runtime: sandboxes found through the upstream's CRI PodSandboxStatus.

A sandbox id is first looked up in the config's explicit ``sandboxes`` map (lab use);
every other id is asked of the upstream runtime (``upstream_endpoint``) with
``PodSandboxStatus(verbose=true)`` (how its answer is read: crishim.sandboxes). The netns
is entered in process.
"""

from __future__ import annotations

import socket

from crishim.config import Config
from crishim.netns import InProcessDial
from crishim.runtime import DialFailed, RuntimePlugin, Sandbox, SandboxGone
from crishim.sandboxes import CACHE_TTL, NamedSandboxes, UpstreamSandboxes


class ContainerdRuntime(InProcessDial, RuntimePlugin):
    name = "containerd"

    def __init__(self, config: Config, cache_ttl: float = CACHE_TTL) -> None:
        self.names = NamedSandboxes(config.netns_dir, config.sandboxes)
        self.upstream = UpstreamSandboxes(config.upstream_endpoint, cache_ttl)
        self.pod_ip_fallback = config.pod_ip_fallback

    async def resolve(self, sandbox_id: str) -> Sandbox:
        if sandbox_id in self.names:
            return self.names.resolve(sandbox_id)
        return await self.upstream.resolve(sandbox_id)

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        try:
            return await super().dial(sandbox, port)
        except (SandboxGone, DialFailed):
            self.upstream.forget(sandbox.id)  # the next resolve asks the runtime again
            raise

    async def dial_udp(self, sandbox: Sandbox, port: int) -> socket.socket:
        try:
            return await super().dial_udp(sandbox, port)
        except (SandboxGone, DialFailed):
            self.upstream.forget(sandbox.id)  # the next resolve asks the runtime again
            raise

    async def close(self) -> None:
        await self.upstream.close()


def factory(config: Config) -> ContainerdRuntime:
    """Sandboxes found via the upstream's CRI PodSandboxStatus; netns entered in process."""
    return ContainerdRuntime(config)
