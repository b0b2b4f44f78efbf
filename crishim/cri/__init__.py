"""CRI runtime.v1 messages (generated: api_pb2, api_pb2_grpc) and what both sides read
out of them."""

from __future__ import annotations

from typing import Any


def netns_path_from_spec(info: dict[str, Any]) -> str:
    """runtimeSpec.linux.namespaces[type=network].path of a verbose PodSandboxStatus's
    decoded info, "" where it has none or any level is not the shape the OCI spec gives
    it (a list for `linux` raised AttributeError: UNKNOWN and a traceback per
    PortForward in serve, a traceback from check)."""
    spec = info.get("runtimeSpec")
    linux = spec.get("linux") if isinstance(spec, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for ns in namespaces if isinstance(namespaces, list) else []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return path if isinstance(path, str) else ""
    return ""
