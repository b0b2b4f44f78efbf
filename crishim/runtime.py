"""The runtime plugin interface: which sandbox is this, and a socket to port N inside it.

Plugins are registered under the entry-point group ``crishim.runtimes``; each entry
point names a factory ``(Config) -> RuntimePlugin``. Nothing about protocols lives here.
"""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crishim.config import Config

ENTRY_POINT_GROUP = "crishim.runtimes"
# the netns "path" that names the host's own network namespace (the `sandboxes` map, the
# helper protocol); never a real one, which is absolute. config.py spells it "host" too
HOST = "host"


class RuntimeError_(Exception):
    """Base of the errors a plugin raises; the message is shown to the user."""

    #: The gRPC status PortForward answers with (a name of grpc.StatusCode): try later,
    #: unless the error says otherwise (an upstream's verdict on the request).
    status: str = "UNAVAILABLE"


class SandboxNotFound(RuntimeError_):
    """The runtime does not know this sandbox id (gRPC NOT_FOUND)."""


class SandboxGone(RuntimeError_):
    """The sandbox or its network namespace no longer exists: fatal for a session."""


class DialFailed(RuntimeError_):
    """One connection into the sandbox failed (refused, unreachable): ends that connection."""


class DialTimedOut(DialFailed):
    """The connect into the sandbox got no answer in time (a port whose SYNs are dropped),
    said by a plugin whose dial bounds itself (the helper-pod backend's helper, within the
    shim's dial_timeout): counted as a dial_timeout, as crishim's own bound is."""


class DialUnavailable(DialFailed):
    """The runtime's own way into sandboxes is down (the helper-pod backend's helper not
    answering): ends that connection as DialFailed does, but is the node's problem, not
    the pod's, so it is logged as a WARNING (a refused port is INFO)."""


class PluginNotFound(RuntimeError_):
    """No installed runtime plugin has the configured name."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    id: str
    netns_path: str = ""
    host_network: bool = False
    pod_ip: str = ""


def dial_target(sandbox: Sandbox, pod_ip_fallback: bool) -> tuple[str, str]:
    """Where a dial into sandbox goes: its netns path (HOST for a host-network pod) and the
    pod IP to try after localhost ("" unless pod_ip_fallback)."""
    return (HOST if sandbox.host_network else sandbox.netns_path,
            sandbox.pod_ip if pod_ip_fallback else "")


class RuntimePlugin(abc.ABC):
    """Answer two questions: where is this sandbox, and connect me to a port in it (TCP,
    or UDP for crishim's own port-forward extension)."""

    name: str = "?"

    @abc.abstractmethod
    async def resolve(self, sandbox_id: str) -> Sandbox:
        """The live sandbox, or SandboxNotFound / SandboxGone."""

    @abc.abstractmethod
    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        """A connected non-blocking socket to port inside the sandbox, or DialFailed /
        SandboxGone."""

    # whether dial_udp works: the server offers UDP port-forward only if so. Plugins that
    # enter the netns in process get dial, dial_udp and this from crishim.netns.InProcessDial.
    supports_udp: bool = False

    async def dial_udp(self, sandbox: Sandbox, port: int) -> socket.socket:
        """A connected non-blocking UDP socket to port inside the sandbox, or DialFailed /
        SandboxGone (crishim's port-forward extension; never called unless supports_udp)."""
        raise DialFailed(f"runtime plugin {self.name!r} does not forward UDP")

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the plugin holds (connections to helpers, caches)."""


def available_plugins() -> dict[str, str]:
    """Installed plugin names and the object each entry point names."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin(config: Config) -> RuntimePlugin:
    name, _ = config.chosen_runtime()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                factory = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure is the plugin's
                raise PluginNotFound(
                    f"runtime plugin {name!r} ({ep.value}) could not be loaded: "
                    f"{type(e).__name__}: {e}") from e
            plugin: RuntimePlugin = factory(config)
            return plugin
    names = ", ".join(sorted(available_plugins())) or "none"
    raise PluginNotFound(f"runtime plugin {name!r} is not installed (installed: {names})")
