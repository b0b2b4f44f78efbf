"""What :meth:`SpdyConnection.receive_data` returns: one frozen dataclass per event,
all sharing the :class:`Event` base."""

from __future__ import annotations

from dataclasses import dataclass


class Event:
    """Base class of everything :meth:`SpdyConnection.receive_data` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream with SYN_STREAM."""

    stream_id: int
    associated_id: int
    headers: dict[str, str]
    fin: bool
    unidirectional: bool
    priority: int = 0


@dataclass(frozen=True, slots=True)
class StreamReplied(Event):
    """The peer accepted one of our streams with SYN_REPLY."""

    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass(frozen=True, slots=True)
class HeadersReceived(Event):
    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """A piece of a DATA frame; ``fin`` is set on the last piece of a FIN frame."""

    stream_id: int
    #: A view into the received bytes with ``SpdyConfig.zero_copy`` (valid only while
    #: the events are acted on when the input was lent: see receive_data).
    data: bytes | memoryview
    fin: bool


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The peer reset a stream with RST_STREAM."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged us; the echo is already queued."""

    ping_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """The peer echoed a PING we sent."""

    ping_id: int


@dataclass(frozen=True, slots=True)
class SettingsReceived(Event):
    settings: dict[int, int]


@dataclass(frozen=True, slots=True)
class WindowUpdateReceived(Event):
    """A window grew: informational unless the codec enforces send windows
    (``enforce_send_windows``), when it is the moment to send what waited for it."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class FrameIgnored(Event):
    """A control frame the codec skips (an unknown type, a WINDOW_UPDATE for a stream
    that is gone or beyond the credit DATA sent earns, a RST_STREAM for a stream never
    opened or no longer remembered): reported so that whoever budgets the peer's frames
    can count it."""

    frame_type: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    last_good_stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class StreamError(Event):
    """The codec refused or reset a stream the peer misused; RST_STREAM is queued."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionTerminated(Event):
    """Fatal protocol error; GOAWAY is queued and all further input is ignored."""

    status: int
    reason: str

