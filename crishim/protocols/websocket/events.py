"""What the WebSocket objects report: one frozen dataclass per event, all sharing the
:class:`Event` base, and the RFC 6455 close codes they carry."""

from __future__ import annotations

from dataclasses import dataclass

# RFC 6455 section 7.4.1 close codes used here.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 7.4.2 (IANA registry): the server is overloaded


class Event:
    """Base class of everything the framing, channel and tunnel objects return."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Message(Event):
    """One whole WebSocket message. Text messages arrive UTF-8 encoded. A message of
    64 KiB or more that came whole in one received `bytes` is a memoryview into it (no
    copy)."""

    data: bytes | memoryview
    binary: bool


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The WebSocket is finished: the close handshake completed, the peer broke the
    protocol (``code`` is what we sent), or the transport ended (1006). Flush
    ``data_to_send()`` and close the transport."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged; the pong is already queued."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameIgnored(Event):
    """A frame that carries nothing to act on: a pong, or an empty data frame that ends no
    message with data in it. Reported so that whoever budgets the peer's frames can count
    it (each costs a frame's parsing and nothing else)."""

    kind: str


@dataclass(frozen=True, slots=True)
class TunnelData(Event):
    """The next piece of the tunnelled byte stream: bytes, or a view into received bytes
    (immutable, so as safe to keep)."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """The peer broke the channel protocol; a close frame with ``code`` is queued and a
    ``Closed`` event follows."""

    reason: str
    code: int = CLOSE_PROTOCOL_ERROR




@dataclass(frozen=True, slots=True)
class ChannelData(Event):
    """Bytes on port ``index``'s data channel (channel ``2 * index``)."""

    index: int
    data: bytes | memoryview  # a view into the message for large binary payloads


@dataclass(frozen=True, slots=True)
class ChannelError(Event):
    """Error text the server wrote on port ``index``'s error channel (client side)."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class PortPreface(Event):
    """The server's first message on a channel: the port it belongs to (client side)."""

    index: int
    port: int
    error_channel: bool




FramingEvent = (Message | Closed | PingReceived | FrameIgnored | TunnelData
                | ProtocolViolation)
ChannelEvent = (ChannelData | ChannelError | PortPreface | ProtocolViolation | Closed
                | PingReceived | FrameIgnored)
TunnelEvent = TunnelData | ProtocolViolation | Closed | PingReceived | FrameIgnored
