"""Lab runtime: sandbox ids are named network namespaces or an explicit id -> path map.

A sandbox id is a named netns (netns_dir/<id>) or an entry of
the config's explicit `sandboxes` map (id -> netns path; "host" for the host's own)."""

from __future__ import annotations

import os
import socket

from crishim.config import Config
from crishim.netns import dial_localhost
from crishim.runtime import RuntimePlugin, Sandbox, SandboxGone, SandboxNotFound

HOST = "host"


class NamedNetnsRuntime(RuntimePlugin):
    name = "netns"

    def __init__(self, config: Config) -> None:
        self.netns_dir = config.netns_dir
        self.sandboxes = dict(config.sandboxes)
        self.pod_ip_fallback = config.pod_ip_fallback

    def register(self, sandbox_id: str, netns_path: str) -> None:
        self.sandboxes[sandbox_id] = netns_path

    def path_of(self, sandbox_id: str) -> str | None:
        """The netns path (or HOST) a sandbox id names: its map entry, else netns_dir/<id>;
        None for an id that cannot be a file name there."""
        path = self.sandboxes.get(sandbox_id)
        if path is None and "/" not in sandbox_id and sandbox_id not in ("", ".", ".."):
            path = os.path.join(self.netns_dir, sandbox_id)
        return path

    async def resolve(self, sandbox_id: str) -> Sandbox:
        path = self.path_of(sandbox_id)
        if path is None:
            raise SandboxNotFound(f"sandbox {sandbox_id!r} not found")
        if path == HOST:
            return Sandbox(sandbox_id, host_network=True)
        if not os.path.exists(path):
            if sandbox_id in self.sandboxes:
                raise SandboxGone(f"sandbox {sandbox_id!r}: network namespace {path} is gone")
            raise SandboxNotFound(f"sandbox {sandbox_id!r} not found (no {path})")
        return Sandbox(sandbox_id, netns_path=path)

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        return await dial_localhost(None if sandbox.host_network else sandbox.netns_path, port,
                                    sandbox.pod_ip if self.pod_ip_fallback else "")


def factory(config: Config) -> NamedNetnsRuntime:
    return NamedNetnsRuntime(config)
