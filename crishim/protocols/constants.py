"""Port-forward protocol values that the stream server and the client must agree on,
kept here once instead of copied into each side."""

from __future__ import annotations

__all__ = [
    "DIAL_AT_ONCE",
    "DIAL_ON_DATA",
    "FLOW_CONTROL_WINDOWS",
    "H2_CONNECTION_WINDOW",
    "H2_STREAM_WINDOW",
    "HEADER_CRISHIM_DIAL",
    "HEADER_DIAL",
    "HEADER_FLOW_CONTROL",
    "HEADER_PORT",
    "HEADER_PROTOCOL",
    "HEADER_REQUEST_ID",
    "HEADER_STREAM_TYPE",
    "PORTFORWARD_CRISHIM_V1",
    "PORTFORWARD_PROTOCOL",
    "STREAM_TYPE_DATA",
    "STREAM_TYPE_ERROR",
]

#: The port-forward subprotocol: ``X-Stream-Protocol-Version`` on SPDY, and the suffix of
#: the SPDY-over-WebSocket subprotocol.
PORTFORWARD_PROTOCOL = "portforward.k8s.io"
#: crishim's extension beside it (UDP flows; crishim/protocols/negotiation.py): offered by
#: crishim's client only, so upstream clients never see it.
PORTFORWARD_CRISHIM_V1 = "portforward.crishim.dev/v1"

# Headers of every port-forward stream (SPDY and HTTP/2): each forwarded connection is a
# pair of streams, one per stream type, sharing a request id.
HEADER_STREAM_TYPE = "streamtype"
HEADER_PORT = "port"
HEADER_REQUEST_ID = "requestid"
STREAM_TYPE_DATA = "data"
STREAM_TYPE_ERROR = "error"
# portforward.crishim.dev/v1 only: "tcp" (the default when absent) or "udp", on both streams
HEADER_PROTOCOL = "protocol"
# portforward.crishim.dev/v1 only, on a TCP pair's data stream: the server dials the pod
# when the stream's first DATA frame (an empty one too) or its end comes, not at once,
# and says so with the same header in its reply to the data stream (docs/protocol.md 8.5)
HEADER_DIAL = "dial"
DIAL_ON_DATA = "on-data"
# portforward.crishim.dev/v1 over SPDY only: a client that sends SETTINGS_INITIAL_WINDOW_SIZE
# before its first stream gets SPDY/3.1's flow control (its stream and session windows
# honoured), and every SYN_REPLY of such a session says so with this header
# (docs/protocol.md 8.6); without it the windows are ignored, as spdystream's peers expect
HEADER_FLOW_CONTROL = "flow-control"
FLOW_CONTROL_WINDOWS = "windows"
# the WebSocket channel protocol's form, a whole session opened ahead: its upgrade
# request's Crishim-Dial (on-data or at-once, the default); every WebSocket 101 crishim
# serve sends says how that session dials
HEADER_CRISHIM_DIAL = "Crishim-Dial"
DIAL_AT_ONCE = "at-once"

# HTTP/2 receive windows both ends advertise.
H2_STREAM_WINDOW = 16 * 1024 * 1024  # per stream: a fast link is not throttled
H2_CONNECTION_WINDOW = 256 * 1024 * 1024  # 16 stalled streams before others feel it
