"""Where the helper plugin's shim asks the helper about a sandbox path: when it may not
look, and when its own view says the path is no namespace (the shim's mounts need not
follow the host's: a netns bind mount it does not see looks like an empty file)."""

import asyncio

import pytest
from crishim_helperpod import HelperPodRuntime

from crishim.config import load
from crishim.runtime import SandboxGone


def _plugin(answer: bool) -> tuple[HelperPodRuntime, list[str]]:
    plugin = HelperPodRuntime(load(overrides={"sandboxes": "sb=/etc/hostname"}))
    asked: list[str] = []

    async def exists(path: str) -> bool:
        asked.append(path)
        return answer

    plugin.exists = exists  # type: ignore[method-assign]
    return plugin, asked


def test_a_path_the_shim_sees_as_no_namespace_is_the_helpers_to_judge():
    plugin, asked = _plugin(True)
    sandbox = asyncio.run(plugin.resolve("sb"))
    assert asked == ["/etc/hostname"] and sandbox.netns_path == "/etc/hostname"


def test_the_helpers_no_is_the_shims_refusal():
    plugin, asked = _plugin(False)
    with pytest.raises(SandboxGone, match="is not a network namespace"):
        asyncio.run(plugin.resolve("sb"))
    assert asked == ["/etc/hostname"]
