"""What a forwarded TCP connection (crishim/forward.py) and a UDP flow
(crishim/forward_udp.py) share: the plugin's dial, bounded and counted alike, how a
failure ends one, and its one end line."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from crishim.logs import traceback_once
from crishim.runtime import DialFailed, DialTimedOut, DialUnavailable, SandboxGone

if TYPE_CHECKING:
    from crishim.forward import Channel, ForwardContext, SessionBase
    from crishim.runtime import Sandbox

log = logging.getLogger("crishim.forward")


class Forwarded:
    """What a forwarded TCP connection and a UDP flow share: the plugin's dial (bounded by
    dial_timeout, counted in ctx.dialling, timed in dial_seconds), how a failure ends it,
    its one end line and counters, and the calls every transport makes alike. A subclass
    adds its socket: _plugin_dial, _connected, _finish."""

    #: after the port in the end line, and the log fields naming the protocol
    port_suffix = ""
    protocol_fields: dict[str, str] = {}

    def __init__(self, ctx: ForwardContext, session: SessionBase, sandbox: Sandbox,
                 port: int, channel: Channel, transport_name: str = "?") -> None:
        self.ctx = ctx
        self.session = session
        self.sandbox = sandbox
        self.port = port
        self.channel = channel
        self.transport_name = transport_name
        self.bytes_up = 0  # client -> pod
        self.bytes_down = 0  # pod -> client
        self.reason = ""
        self.admitted = False
        self._done = False
        self._task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.admitted = True
        self.ctx.live_connections += 1
        self._task = asyncio.get_running_loop().create_task(self._dial())

    def refuse(self, reason: str) -> None:
        """Never dialled: a limit was reached. Ends only this one."""
        self._fail(reason, "limit")

    def client_reset(self) -> None:
        """The client reset the data stream: it is done with this one."""
        if not self._done:
            self.reason = self.reason or "reset by client"
            self._finish()

    def close(self, reason: str, error: str | None = None) -> None:
        """End from the session's side (session closing, creation timeout, drain)."""
        if not self._done:
            self.reason = reason
            self._finish(error=error, abort=True)

    async def _plugin_dial(self) -> socket.socket:
        raise NotImplementedError

    def _dial_what(self) -> str:
        """How a reason names the dialled port."""
        return f"connect to port {self.port}"

    async def _connected(self, sock: socket.socket) -> None:
        """The plugin's socket, dialled while this one is still live: forward over it."""
        raise NotImplementedError

    async def _dial(self) -> None:
        t0 = time.perf_counter()
        self.ctx.dialling += 1
        deadline = asyncio.timeout(self.ctx.dial_timeout)
        try:
            async with deadline:
                sock = await self._plugin_dial()
        except SandboxGone as e:
            self._fail(str(e), "sandbox_gone", fatal=True)
            return
        except DialTimedOut as e:
            self._fail(str(e), "dial_timeout")
            return
        except DialUnavailable as e:
            self._fail(str(e), "dial_unavailable", level=logging.WARNING)
            return
        except DialFailed as e:
            self._fail(str(e), "dial_refused")
            return
        except Exception as e:
            if isinstance(e, TimeoutError) and deadline.expired():
                # dial_timeout: the plugin's dial was cancelled (and closed what it opened)
                self._fail(f"{self._dial_what()}: no answer after "
                           f"{self.ctx.dial_timeout:g} s", "dial_timeout")
                return
            # a plugin bug must end one connection, not the server
            self._plugin_failed(e)
            self._fail(f"runtime plugin error: {e}", "plugin_error")
            return
        finally:
            self.ctx.dialling -= 1
        if self.ctx.metrics is not None:
            self.ctx.metrics.dial_seconds(time.perf_counter() - t0)
        if self._done:
            sock.close()
            return
        await self._connected(sock)

    def _plugin_failed(self, e: Exception) -> None:
        """One ERROR line for a dial the plugin failed with an unexpected exception, within
        the session's connection lines; the traceback with the first of its type."""
        msg = "forward sandbox=%s port=%d%s: runtime plugin %s failed to dial: %s: %s"
        args = (self.sandbox.id, self.port, self.port_suffix, self.ctx.plugin.name,
                type(e).__name__, e)
        first = traceback_once(e)  # a plugin bug hit by every dial wrote a traceback each
        if first is None:
            self.session.connection_log.log(logging.ERROR, msg, *args)
            return
        log.error(msg + " (traceback shown once per exception type)", *args, exc_info=first)

    def _fail(self, reason: str, kind: str = "other", fatal: bool = False,
              level: int | None = None) -> None:
        """End this one: reset the data stream; the error stream carries the reason only
        when fatal (or the verbose policy), since any text ends the client's session. The
        end line is a WARNING when fatal, else INFO unless `level` says otherwise."""
        if self._done:
            return
        self.reason = reason
        show = fatal or self.ctx.verbose_errors
        if self.ctx.metrics is not None:
            self.ctx.metrics.failure(kind)
        if level is None:
            level = logging.WARNING if fatal else logging.INFO
        self._finish(error=reason if show else None, abort=True, level=level)

    def _finish(self, error: str | None = None, abort: bool = False,
                level: int = logging.INFO) -> None:
        raise NotImplementedError

    def _end_counts(self) -> dict[str, int]:
        """Counters the end line gives besides the bytes each way."""
        return {}

    def _report_end(self, level: int) -> None:
        """The one line per forwarded connection or flow, and its counters."""
        if log.isEnabledFor(level):
            reason = self.reason or "closed"
            counts = self._end_counts()
            self.session.connection_log.log(
                level, f"forward sandbox=%s port=%d{self.port_suffix} transport=%s ended: "
                "up=%d down=%d " + "".join(f"{name}=%d " for name in counts) + "reason=%s",
                self.sandbox.id, self.port, self.transport_name, self.bytes_up,
                self.bytes_down, *counts.values(), reason,
                extra={"fields": {"sandbox": self.sandbox.id, "port": self.port,
                                  **self.protocol_fields, "transport": self.transport_name,
                                  "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                                  **counts, "reason": reason}})
        if self.ctx.metrics is not None:
            self.ctx.metrics.connection_ended(self.transport_name, self.bytes_up,
                                              self.bytes_down)
