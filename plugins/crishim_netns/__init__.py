"""Lab runtime: sandbox ids are named network namespaces or an explicit id -> path map.

A sandbox id is a named netns (netns_dir/<id>) or an entry of
the config's explicit `sandboxes` map (id -> netns path; "host" for the host's own)."""

from __future__ import annotations

import socket

from crishim.config import Config
from crishim.netns import InProcessUdp, dial_localhost
from crishim.runtime import RuntimePlugin, Sandbox
from crishim.sandboxes import NamedSandboxes


class NamedNetnsRuntime(InProcessUdp, RuntimePlugin):
    name = "netns"

    def __init__(self, config: Config) -> None:
        self.names = NamedSandboxes(config.netns_dir, config.sandboxes)
        self.pod_ip_fallback = config.pod_ip_fallback

    async def resolve(self, sandbox_id: str) -> Sandbox:
        return self.names.resolve(sandbox_id)

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        return await dial_localhost(None if sandbox.host_network else sandbox.netns_path, port,
                                    sandbox.pod_ip if self.pod_ip_fallback else "")


def factory(config: Config) -> NamedNetnsRuntime:
    return NamedNetnsRuntime(config)
