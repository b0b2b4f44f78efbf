"""Client data gathered during one transport read is written towards each pod once, at
the end of the outermost read: a WebSocket read carrying several SPDY pieces nests one
batch (each SPDY piece's) inside another (the WebSocket read's)."""

from __future__ import annotations

from crishim.config import Config
from crishim.forward import ForwardContext, SessionBase
from crishim.runtime import Sandbox
from crishim.sandboxes import NamedNetnsRuntime


class Gathered:
    """Stands where a ForwardedConnection with gathered data stands in session.batched."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush_batch(self) -> None:
        self.flushes += 1


def test_nested_batches_write_once_at_the_outermost_end():
    session = SessionBase(ForwardContext(NamedNetnsRuntime(Config(sandboxes={}))),
                          Sandbox("web", host_network=True))
    conn = Gathered()
    session.begin_batch()  # the WebSocket read
    for _ in range(3):  # its SPDY pieces
        session.begin_batch()
        assert session.batching
        if conn not in session.batched:
            session.batched.append(conn)
        session.end_batch()
        assert session.batching and conn.flushes == 0
    session.end_batch()
    assert not session.batching and conn.flushes == 1 and not session.batched
