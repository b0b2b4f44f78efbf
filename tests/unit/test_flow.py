"""ReadGate, the read-side backpressure of client and server sessions, on a real socket."""

import asyncio
import socket

from crishim.flow import ReadGate


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()


async def _connected() -> tuple[asyncio.Transport, _Recorder, socket.socket]:
    """A transport reading from one end of a socket pair, and the other end to write to."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, protocol = await asyncio.get_running_loop().create_connection(
        _Recorder, sock=ours)
    return transport, protocol, peer


def test_reading_stays_paused_until_the_last_key_lets_go():
    async def main() -> None:
        transport, protocol, peer = await _connected()
        gate = ReadGate()
        gate.pause("pod-a", transport)
        gate.pause("pod-b", transport)
        gate.resume("pod-a", transport)
        assert not transport.is_reading() and gate.paused and gate.holds("pod-b")
        peer.send(b"held back")
        await asyncio.sleep(0.05)
        assert protocol.data == b""  # nothing read while "pod-b" holds the gate
        gate.resume("pod-b", transport)
        assert transport.is_reading() and not gate.paused
        await asyncio.wait_for(protocol.arrived.wait(), 5)
        assert protocol.data == b"held back"
        transport.close()
        peer.close()

    asyncio.run(main())


def test_pausing_twice_with_one_key_needs_one_resume():
    async def main() -> None:
        transport, _, peer = await _connected()
        gate = ReadGate()
        gate.pause("pod", transport)
        gate.pause("pod", transport)
        gate.resume("pod", transport)
        assert transport.is_reading()
        transport.close()
        peer.close()

    asyncio.run(main())


def test_resuming_a_key_that_holds_nothing_leaves_others_paused():
    async def main() -> None:
        transport, _, peer = await _connected()
        gate = ReadGate()
        gate.pause("pod-a", transport)
        gate.resume("pod-b", transport)
        assert not transport.is_reading()
        transport.close()
        peer.close()

    asyncio.run(main())


def test_forget_drops_a_key_without_resuming():
    async def main() -> None:
        transport, _, peer = await _connected()
        gate = ReadGate()
        gate.pause("pod-a", transport)
        gate.forget("pod-a")
        assert not gate.paused and not transport.is_reading()
        transport.close()
        peer.close()

    asyncio.run(main())


def test_resume_on_a_closing_transport_or_none_is_harmless():
    async def main() -> None:
        transport, _, peer = await _connected()
        gate = ReadGate()
        gate.pause("pod", transport)
        transport.close()
        gate.resume("pod", transport)  # no resume_reading on a closing transport
        assert not gate.paused
        gate.pause("early", None)  # a session without its transport yet
        assert gate.holds("early")
        gate.resume("early", None)
        assert not gate.paused
        peer.close()

    asyncio.run(main())


def test_unsent_keeps_what_a_partial_writev_left_in_order():
    from crishim.flow import unsent
    pieces = [b"abc", memoryview(b"defg"), b"hi"]
    for sent in range(10):
        rest = unsent(list(pieces), sent)
        assert b"".join(bytes(p) for p in rest) == b"abcdefghi"[sent:]
        assert all(len(p) for p in rest)
