"""Stream pairing for the transports that carry a forwarded connection as two streams
(SPDY/3.1 and HTTP/2): an error stream and a data stream sharing a `requestid`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container, Mapping

from crishim.ports import InvalidPort, parse_port, shown
from crishim.protocols.constants import (
    HEADER_PORT,
    HEADER_REQUEST_ID,
    HEADER_STREAM_TYPE,
    PORTFORWARD_PROTOCOL,
    STREAM_TYPE_DATA,
    STREAM_TYPE_ERROR,
)
from crishim.protocols.negotiation import (
    TCP,
    StreamProtocolRefused,
    dials_on_data,
    stream_protocol,
)
from crishim.stream.admission import Refused

# longest requestid kept (SPDY and HTTP/2 alike): client-go's are decimal counters,
# crishim's the same; a longer one was held per pending pair and quoted in every line
MAX_REQUEST_ID = 128


class PendingPair:
    """A forwarded connection's error and data streams while they gather."""

    __slots__ = ("request_id", "port", "protocol", "data_id", "error_id", "timer", "held",
                 "held_length", "held_end", "on_data", "counted")

    def __init__(self, request_id: str, port: int, protocol: str = TCP) -> None:
        self.request_id = request_id
        self.port = port
        self.protocol = protocol  # tcp, or udp (portforward.crishim.dev/v1)
        self.data_id = 0
        self.error_id = 0
        self.timer: asyncio.TimerHandle | None = None
        # what the client sent on the data stream before the pair completed, kept as one
        # buffer however it was framed (None: no data frame came)
        self.held: bytearray | None = None
        self.held_length = 0  # its flow-controlled length (padding too): acknowledged later
        self.held_end = False  # the client ended the data stream too
        self.on_data = False  # its data stream asked for dial: on-data (a TCP pair only)
        self.counted = 0  # of held, the bytes StreamPairs.held_bytes counts (hold())

    @property
    def complete(self) -> bool:
        return bool(self.data_id and self.error_id)


def shown_request_id(request_id: str) -> str:
    """A requestid as messages show it: as it is when it is printable ASCII without spaces
    (client-go's are numbers), else quoted and escaped (it is the client's text)."""
    if request_id.isascii() and request_id.isprintable() and " " not in request_id:
        return request_id
    return shown(request_id, 2 * MAX_REQUEST_ID)


class StreamPairs:
    """Pairs each forwarded connection's error and data streams by `requestid`, as SPDY
    and HTTP/2 carry them alike, and times out pairs that never complete."""

    def __init__(self, timeout: float, on_timeout: Callable[[PendingPair], None],
                 max_pending: int = 4096) -> None:
        self.timeout = timeout
        self.on_timeout = on_timeout
        # pairs waiting for their other stream (~1 KiB each, for up to `timeout`): no more
        # than the connections the session may hold, max_connections_per_session; a
        # client opening only error streams held 8,200 (HTTP/2) or 10,000 (SPDY) a session
        self.max_pending = max_pending
        self.pending: dict[str, PendingPair] = {}
        self.by_stream: dict[int, PendingPair] = {}
        # bytes held through hold() by the pending pairs, exact: given back as a pair is
        # forgotten (completed, timed out, reset, refused, cleared)
        self.held_bytes = 0

    def add(self, stream_id: int, headers: Mapping[str, str],
            live: Container[str] = (), version: str = PORTFORWARD_PROTOCOL) -> PendingPair:
        """File one stream with its pair, or raise Refused(400): bad headers (a protocol
        the session's negotiated version does not carry, too), or a second stream of one
        type for a request; only that stream is refused. A complete pair (both ids set)
        is no longer pending: the caller opens its connection or flow."""
        stream_type = headers.get(HEADER_STREAM_TYPE, "")
        if stream_type not in (STREAM_TYPE_DATA, STREAM_TYPE_ERROR):
            raise Refused(400, f"unknown streamtype {shown(stream_type, 64)}: expected data or "
                               "error")
        try:
            port = parse_port(headers.get(HEADER_PORT, ""))
        except InvalidPort as e:
            raise Refused(400, str(e)) from None
        try:
            protocol = stream_protocol(headers, version)
            on_data = dials_on_data(headers, version)
        except StreamProtocolRefused as e:
            raise Refused(400, str(e)) from None
        request_id = headers.get(HEADER_REQUEST_ID)
        if request_id is not None and len(request_id) > MAX_REQUEST_ID:
            raise Refused(400, f"a requestid of {len(request_id)} characters (at most "
                               f"{MAX_REQUEST_ID})")
        if request_id is None:  # very old clients: ids derived from stream ids
            request_id = str(stream_id if stream_type == STREAM_TYPE_ERROR else stream_id - 2)
        shown_id = shown_request_id(request_id)
        if request_id in live:
            raise Refused(400, f"a second {stream_type} stream for request {shown_id}, "
                               "whose connection is live")
        pair = self.pending.get(request_id)
        if pair is None:
            if len(self.pending) >= self.max_pending:
                raise Refused(429, f"{self.max_pending} stream pairs already wait for their "
                                   "other stream (max_connections_per_session)")
            pair = PendingPair(request_id, port, protocol)
        slot = "data_id" if stream_type == STREAM_TYPE_DATA else "error_id"
        if getattr(pair, slot):
            raise Refused(400, f"a second {stream_type} stream for request {shown_id}")
        if pair.port != port:
            raise Refused(400, f"port {port} differs from port {pair.port} of the other "
                               f"stream of request {shown_id}")
        if pair.protocol != protocol:
            raise Refused(400, f"protocol {protocol} differs from protocol {pair.protocol} of "
                               f"the other stream of request {shown_id}")
        if request_id not in self.pending:
            self.pending[request_id] = pair
            pair.timer = asyncio.get_running_loop().call_later(
                self.timeout, self._timed_out, pair)
        setattr(pair, slot, stream_id)
        if stream_type == STREAM_TYPE_DATA:
            pair.on_data = on_data and protocol == TCP
        self.by_stream[stream_id] = pair
        if pair.complete:
            self.forget(pair)
        return pair

    def timeout_message(self, pair: PendingPair) -> str:
        missing = "data" if not pair.data_id else "error"
        return (f"timed out waiting for the {missing} stream of request "
                f"{shown_request_id(pair.request_id)} (stream_creation_timeout "
                f"{self.timeout:g}s)")

    def _timed_out(self, pair: PendingPair) -> None:
        if self.pending.get(pair.request_id) is pair:
            self.forget(pair)
            self.on_timeout(pair)

    def hold(self, pair: PendingPair, data: bytes | memoryview) -> None:
        """Keep data for a pending pair (copied: it may be a view into the read), counted
        in held_bytes until the pair is forgotten."""
        if pair.held is None:
            pair.held = bytearray()
        pair.held += data
        pair.counted += len(data)
        self.held_bytes += len(data)

    def forget(self, pair: PendingPair) -> None:
        self.held_bytes -= pair.counted
        pair.counted = 0
        self.pending.pop(pair.request_id, None)
        for stream_id in (pair.data_id, pair.error_id):
            self.by_stream.pop(stream_id, None)
        if pair.timer is not None:
            pair.timer.cancel()

    def clear(self) -> None:
        for pair in list(self.pending.values()):
            self.forget(pair)
