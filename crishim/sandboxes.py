"""Where a sandbox is: the lookups the runtime plugins share.

- NamedSandboxes: a named netns (netns_dir/<id>) or an entry of an explicit id -> path
  map ("host" for the host's own netns);
- UpstreamSandboxes: the upstream runtime's CRI PodSandboxStatus(verbose=true), as
  containerd answers it:
  - the netns path is ``runtimeSpec.linux.namespaces[type=network].path`` in the JSON under
    ``info["info"]``, else ``/proc/<pid>/ns/net``;
  - ``status.linux.namespaces.options.network == NODE``: a host-network pod, dialled
    from the host;
  - ``netNamespaceClosed`` or a NOTREADY sandbox: gone; NOT_FOUND upstream: not found;
  - ``status.network.ip`` is the pod IP (used only with ``pod_ip_fallback``).
  Answers are cached a few seconds, and a cached answer is used only after checking that
  its netns (or, for host-network pods, its pause process) still exists.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from crishim.config import Config
from crishim.cri import api_pb2, netns_path_from_spec
from crishim.cri.service import upstream_target
from crishim.netns import InProcessDial, not_a_netns
from crishim.ports import ip_or_empty, netns_path_problem
from crishim.runtime import (
    HOST,
    RuntimeError_,
    RuntimePlugin,
    Sandbox,
    SandboxGone,
    SandboxNotFound,
)

CACHE_TTL = 3.0
CACHE_SIZE = 4096
STATUS_TIMEOUT = 10.0


class UpstreamUnavailable(RuntimeError_):
    """The upstream runtime could not answer PodSandboxStatus (not a verdict on the sandbox)."""

    def __init__(self, message: str, status: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.status = status


#: The upstream's verdicts on a request, which PortForward answers with as they are.
_VERDICTS = frozenset({"INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED",
                       "FAILED_PRECONDITION"})
#: An upstream that could answer later: PortForward says so with UNAVAILABLE.
_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED",
                        "ABORTED"})


def status_for_upstream(code: grpc.StatusCode) -> str:
    """PortForward's status for an upstream PodSandboxStatus that failed with code (other than
    NOT_FOUND): its verdicts on the request as they are, UNAVAILABLE for what may pass, and
    UNKNOWN for the rest (an upstream without PodSandboxStatus, its INTERNAL: the code named
    PodSandboxStatus's failure, and UNIMPLEMENTED would tell the kubelet PortForward is)."""
    if code.name in _VERDICTS:
        return code.name
    return "UNAVAILABLE" if code.name in _TRANSIENT else "UNKNOWN"


class NamedSandboxes:
    """Sandbox ids that are netns names under netns_dir, or keys of an explicit map."""

    def __init__(self, netns_dir: str, sandboxes: Mapping[str, str]) -> None:
        self.netns_dir = netns_dir
        self.sandboxes = dict(sandboxes)

    def __contains__(self, sandbox_id: str) -> bool:
        """True for an id of the explicit map (netns_dir names are not listed)."""
        return sandbox_id in self.sandboxes

    def path_of(self, sandbox_id: str) -> str | None:
        """The netns path (or HOST) a sandbox id names: its map entry, else netns_dir/<id>;
        None for an id that cannot be a file name there."""
        path = self.sandboxes.get(sandbox_id)
        if path is None and "/" not in sandbox_id and sandbox_id not in ("", ".", ".."):
            path = os.path.join(self.netns_dir, sandbox_id)
        return path

    def resolve(self, sandbox_id: str) -> Sandbox:
        path = self.path_of(sandbox_id)
        if path is None:
            raise SandboxNotFound(f"sandbox {sandbox_id!r} not found")
        if path == HOST:
            return Sandbox(sandbox_id, host_network=True)
        if not os.path.exists(path):
            if sandbox_id in self.sandboxes:
                raise SandboxGone(f"sandbox {sandbox_id!r}: network namespace {path} is gone")
            raise SandboxNotFound(f"sandbox {sandbox_id!r} not found (no {path})")
        if not_a_netns(path):  # it got a URL, and its first connection ended the session
            if sandbox_id in self.sandboxes:
                raise SandboxGone(f"sandbox {sandbox_id!r}: {path} is not a network namespace")
            raise SandboxNotFound(f"sandbox {sandbox_id!r} not found ({path} is not a network "
                                  "namespace)")
        return Sandbox(sandbox_id, netns_path=path)


class NamedNetnsRuntime(InProcessDial, RuntimePlugin):
    """Sandboxes that are named netns (or entries of the `sandboxes` map, plus any
    `extra`), dialled in process: the netns plugin, and the demo with its own sandbox."""

    name = "netns"

    def __init__(self, config: Config, extra: Mapping[str, str] | None = None) -> None:
        self.names = NamedSandboxes(config.netns_dir, {**config.sandboxes, **(extra or {})})
        self.pod_ip_fallback = config.pod_ip_fallback

    async def resolve(self, sandbox_id: str) -> Sandbox:
        return self.names.resolve(sandbox_id)


@dataclass(frozen=True, slots=True)
class _Entry:
    sandbox: Sandbox
    expires: float
    #: A path whose existence proves the sandbox still lives: its netns file, or
    #: /proc/<pid> of its pause process for a host-network pod ("" = cannot tell).
    alive_path: str
    alive_ino: int


def sandbox_from_status(sandbox_id: str,
                        response: api_pb2.PodSandboxStatusResponse) -> tuple[Sandbox, str]:
    """The Sandbox a verbose PodSandboxStatus describes, and the path that proves it lives.

    Raises SandboxGone for a stopped sandbox or a closed netns."""
    status = response.status
    raw = response.info.get("info", "")
    try:
        info = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # RecursionError: JSON nested ~100,000 deep
        info = {}
    if not isinstance(info, dict):
        info = {}
    if status.state == api_pb2.SANDBOX_NOTREADY:
        raise SandboxGone(f"sandbox {sandbox_id} is not ready (stopped)")
    if info.get("netNamespaceClosed") is True:
        raise SandboxGone(f"sandbox {sandbox_id}: its network namespace is closed")
    pod_ip = ip_or_empty(status.network.ip)
    pid = info.get("pid")
    pid = pid if isinstance(pid, int) and pid > 0 else 0
    if status.linux.namespaces.options.network == api_pb2.NODE:
        return (Sandbox(sandbox_id, host_network=True, pod_ip=pod_ip),
                f"/proc/{pid}" if pid else "")
    path = netns_path_from_spec(info)
    if not path and pid:
        path = f"/proc/{pid}/ns/net"
    if not path:
        raise SandboxGone(f"sandbox {sandbox_id}: the runtime reports neither a network "
                          "namespace path nor a pid")
    problem = netns_path_problem(path)
    if problem:
        raise SandboxGone(f"sandbox {sandbox_id}: the runtime's network namespace path "
                          f"{problem}")
    return Sandbox(sandbox_id, netns_path=path, pod_ip=pod_ip), path


def _inode(path: str) -> int:
    """The inode behind path, -1 when it is gone, 0 when this process may not look (an
    unprivileged shim dialling through the helper): then the runtime's word stands."""
    try:
        return os.stat(path).st_ino
    except PermissionError:
        return 0
    except OSError:
        return -1


STATUS_METHOD = "/runtime.v1.RuntimeService/PodSandboxStatus"
_StatusCall = grpc.aio.UnaryUnaryMultiCallable[api_pb2.PodSandboxStatusRequest,
                                               "api_pb2.PodSandboxStatusResponse | None"]


def _serialize(request: api_pb2.PodSandboxStatusRequest) -> bytes:
    return request.SerializeToString()


def _parse_status(raw: bytes) -> api_pb2.PodSandboxStatusResponse | None:
    """The answer, or None for bytes that are not one: the generated stub's FromString
    raised, and grpc logged that with a traceback before failing the call."""
    try:
        return api_pb2.PodSandboxStatusResponse.FromString(raw)
    except DecodeError:
        return None


class UpstreamSandboxes:
    """Sandboxes the upstream runtime knows, asked with a verbose PodSandboxStatus."""

    def __init__(self, endpoint: str, cache_ttl: float = CACHE_TTL) -> None:
        self.endpoint = endpoint
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._channel: grpc.aio.Channel | None = None
        self._call: _StatusCall | None = None

    async def resolve(self, sandbox_id: str) -> Sandbox:
        cached = self._cached(sandbox_id)
        if cached is not None:
            return cached
        response = await self._status(sandbox_id)
        sandbox, alive_path = sandbox_from_status(sandbox_id, response)
        alive_ino = _inode(alive_path) if alive_path else 0
        if alive_ino < 0:
            raise SandboxGone(f"sandbox {sandbox_id}: {alive_path} no longer exists")
        self._remember(_Entry(sandbox, time.monotonic() + self.cache_ttl, alive_path,
                              alive_ino))
        return sandbox

    def _cached(self, sandbox_id: str) -> Sandbox | None:
        entry = self._cache.get(sandbox_id)
        if entry is None:
            return None
        # never serve a dead sandbox: the netns (or pause process) must still be the same
        if time.monotonic() >= entry.expires or (
                entry.alive_path and _inode(entry.alive_path) != entry.alive_ino):
            del self._cache[sandbox_id]
            return None
        return entry.sandbox

    def _remember(self, entry: _Entry) -> None:
        self._cache[entry.sandbox.id] = entry
        self._cache.move_to_end(entry.sandbox.id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def forget(self, sandbox_id: str) -> None:
        """Drop a cached answer: the next resolve asks the runtime again."""
        self._cache.pop(sandbox_id, None)

    async def _status(self, sandbox_id: str) -> api_pb2.PodSandboxStatusResponse:
        if not self.endpoint:
            raise SandboxNotFound(f"sandbox {sandbox_id!r} is not in the sandboxes map and no "
                                  "upstream_endpoint is configured to ask")
        call = self._upstream()
        try:
            response = await call(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                timeout=STATUS_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise SandboxNotFound(f"sandbox {sandbox_id!r} not found: {e.details()}") from None
            raise UpstreamUnavailable(f"PodSandboxStatus({sandbox_id}) at {self.endpoint}: "
                                      f"{e.code().name}: {e.details()}",
                                      status_for_upstream(e.code())) from None
        if not isinstance(response, api_pb2.PodSandboxStatusResponse):  # _parse_status
            raise UpstreamUnavailable(f"PodSandboxStatus({sandbox_id}) at {self.endpoint}: "
                                      "an answer that is not a PodSandboxStatusResponse")
        return response

    def _upstream(self) -> _StatusCall:
        if self._call is None:
            self._channel = grpc.aio.insecure_channel(
                upstream_target(self.endpoint),
                options=[("grpc.max_receive_message_length", 16 << 20)])
            self._call = self._channel.unary_unary(
                STATUS_METHOD, request_serializer=_serialize, response_deserializer=_parse_status)
        return self._call

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = self._call = None
        self._cache.clear()
