"""Sans-IO WebSocket pieces for port-forward (docs/protocol.md §3 and §4). Nothing here
touches a socket: every object takes received bytes and returns events, and queues
outgoing bytes for ``data_to_send()`` / ``take_output()``.

* ``handshake``: the RFC 6455 opening handshake, server and client side.
* ``framing``: ``WebSocketFraming``, RFC 6455 frames after the handshake.
* ``channels``: ``ChannelCodec``, the Kubernetes channel protocol (``v4.channel.k8s.io``,
  ``v4.base64.channel.k8s.io`` or no subprotocol), and ``ByteStreamTunnel``
  (``SPDY/3.1+portforward.k8s.io``: one raw byte stream in binary messages).
* ``events``: what they all report, sharing the :class:`Event` base.

Every public name is available here: ``from crishim.protocols import websocket as ws; ws.X``.
"""

from __future__ import annotations

from .channels import (
    CHANNEL_BASE64,
    CHANNEL_BINARY,
    MAX_MESSAGE_PAYLOAD,
    SPDY_TUNNEL,
    ByteStreamTunnel,
    ChannelCodec,
    max_channel_ports,
)
from .events import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNSUPPORTED_DATA,
    ChannelData,
    ChannelError,
    ChannelEvent,
    Closed,
    Event,
    FrameIgnored,
    FramingEvent,
    Message,
    PingReceived,
    PortPreface,
    ProtocolViolation,
    TunnelData,
    TunnelEvent,
)
from .framing import (
    WebSocketFraming,
    xor_mask,
)
from .handshake import (
    HandshakeError,
    HandshakeResponse,
    accept_handshake,
    client_handshake_request,
    is_websocket_upgrade,
    parse_handshake_response,
    websocket_accept_value,
)

__all__ = [
    "CHANNEL_BASE64",
    "CHANNEL_BINARY",
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_NO_STATUS",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TRY_AGAIN_LATER",
    "CLOSE_UNSUPPORTED_DATA",
    "MAX_MESSAGE_PAYLOAD",
    "SPDY_TUNNEL",
    "ByteStreamTunnel",
    "ChannelCodec",
    "ChannelData",
    "ChannelError",
    "ChannelEvent",
    "Closed",
    "Event",
    "FrameIgnored",
    "FramingEvent",
    "HandshakeError",
    "HandshakeResponse",
    "Message",
    "PingReceived",
    "PortPreface",
    "ProtocolViolation",
    "TunnelData",
    "TunnelEvent",
    "WebSocketFraming",
    "accept_handshake",
    "client_handshake_request",
    "is_websocket_upgrade",
    "max_channel_ports",
    "parse_handshake_response",
    "websocket_accept_value",
    "xor_mask",
]
