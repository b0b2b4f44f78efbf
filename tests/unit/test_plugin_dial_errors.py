"""A plugin bug hit by every dial ends each connection it hits with one ERROR line; its
traceback is written once per exception type, not once per connection."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from crishim.config import Config
from crishim.forward import ForwardContext, SessionBase
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime
from tests.support import RecordingChannel, until


class PluginBug(Exception):
    """Raised by the broken plugin's dial (a type no other test raises)."""


class OtherPluginBug(Exception):
    pass


class BrokenPlugin(NamedNetnsRuntime):
    def __init__(self) -> None:
        super().__init__(Config(sandboxes={}))
        self.raises: list[type[Exception]] = []

    async def dial(self, sandbox: Sandbox, port: int) -> socket.socket:
        raise self.raises.pop(0)("no socket today")


def test_a_plugin_bug_logs_a_line_per_connection_and_its_traceback_once_per_type(
        caplog: pytest.LogCaptureFixture) -> None:
    plugin = BrokenPlugin()
    plugin.raises = [PluginBug, PluginBug, PluginBug, OtherPluginBug]

    async def main() -> None:
        session = SessionBase(ForwardContext(plugin), Sandbox("web", host_network=True))
        channels = [RecordingChannel() for _ in plugin.raises]
        conns = [session.open_connection(8080, channel) for channel in channels]
        await until(lambda: all(conn.done for conn in conns), 2.0)
        assert all(channel.aborted and channel.ended == "" for channel in channels)
        assert {conn.reason for conn in conns} == {"runtime plugin error: no socket today"}

    with caplog.at_level(logging.INFO, logger="crishim.forward"):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4, [r.getMessage() for r in errors]
    assert all("runtime plugin netns failed to dial" in r.getMessage() for r in errors)
    traced = [r.exc_info[0] for r in errors if r.exc_info]
    assert traced == [PluginBug, OtherPluginBug]
    assert "PluginBug: no socket today" in errors[1].getMessage()
