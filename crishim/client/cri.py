"""The CRI calls the client side needs: PortForward (the streaming URL) and
PodSandboxStatus (the sandbox's netns, for `crishim check`), with errors a person can act on."""

from __future__ import annotations

import json
import os

import grpc

from crishim.cri import api_pb2, api_pb2_grpc

DEFAULT_ENDPOINT = "unix:///run/crishim/crishim.sock"


class CriError(Exception):
    """A CRI call failed; the message says what to do about it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def default_endpoint() -> str:
    return os.environ.get("CONTAINER_RUNTIME_ENDPOINT") or DEFAULT_ENDPOINT


def normalize_endpoint(endpoint: str) -> str:
    """`unix:///PATH` or a bare path -> the gRPC target `unix:///PATH`."""
    endpoint = endpoint.strip()
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif "://" in endpoint:
        raise CriError(f"runtime endpoint {endpoint!r}: only unix:///PATH (or a bare path) "
                       "is supported")
    else:
        path = endpoint
    if not path.startswith("/"):
        path = os.path.abspath(path)
    return "unix://" + path


class CriClient:
    """A RuntimeService client over the runtime's unix socket."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.target = normalize_endpoint(endpoint)
        self.path = self.target[len("unix://"):]
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target)
        self._stub = api_pb2_grpc.RuntimeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, method: str, e: grpc.RpcError, sandbox_id: str = "") -> CriError:
        code = e.code()
        details = e.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            if not os.path.exists(self.path):
                why = f"no socket at {self.path}"
            else:
                why = details
            return CriError(f"cannot reach the runtime at {self.target}: {why}", code)
        if code == grpc.StatusCode.NOT_FOUND and sandbox_id:
            return CriError(f"sandbox {sandbox_id!r} not found: {details}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CriError(f"{method} at {self.target} timed out after {self.timeout:g}s",
                            code)
        return CriError(f"{method} failed ({code.name}): {details}", code)

    def port_forward(self, sandbox_id: str, ports: list[int] | tuple[int, ...] = ()) -> str:
        """The streaming URL for sandbox_id (ports bind it for the WebSocket protocol)."""
        request = api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id, port=list(ports))
        try:
            return self._stub.PortForward(request, timeout=self.timeout,
                                          wait_for_ready=False).url
        except grpc.RpcError as e:
            raise self._error("PortForward", e, sandbox_id) from None

    def sandbox_netns(self, sandbox_id: str) -> str:
        """The sandbox's network namespace path from PodSandboxStatus(verbose) info, as
        containerd and CRI-O report it; CriError (code UNIMPLEMENTED etc.) if unknown."""
        request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)
        try:
            response = self._stub.PodSandboxStatus(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error("PodSandboxStatus", e, sandbox_id) from None
        return netns_from_info(dict(response.info))


def netns_from_info(info: dict[str, str]) -> str:
    """runtimeSpec.linux.namespaces[type=network].path, else /proc/<pid>/ns/net."""
    raw = info.get("info")
    if not raw:
        raise CriError("PodSandboxStatus verbose info has no 'info' entry")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise CriError(f"PodSandboxStatus verbose info is not JSON: {e}") from None
    spec = data.get("runtimeSpec") or {}
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return ns["path"]
    pid = data.get("pid")
    if isinstance(pid, int) and pid > 0:
        return f"/proc/{pid}/ns/net"
    raise CriError("PodSandboxStatus verbose info names no network namespace (host network?)")
