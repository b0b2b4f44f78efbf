"""StreamPairs' count of bytes held for pairs that have not completed: exact, given back
however a pair goes (a sum over every pending pair was computed per frame near the limit:
a frame cost a walk of thousands of pairs, 75-180 ms of loop for 990 frames)."""

from __future__ import annotations

import asyncio

from crishim.stream.pairing import StreamPairs


def _headers(kind: str, request_id: str) -> dict[str, str]:
    return {"streamtype": kind, "port": "80", "requestid": request_id}


def test_held_bytes_are_given_back_however_a_pair_goes():
    async def main() -> None:
        timed_out = []
        pairs = StreamPairs(0.05, timed_out.append)
        completes = pairs.add(1, _headers("data", "a"))
        pairs.hold(completes, b"x" * 100)
        resets = pairs.add(3, _headers("data", "b"))
        pairs.hold(resets, b"y" * 50)
        times_out = pairs.add(5, _headers("data", "c"))
        pairs.hold(times_out, b"z" * 25)
        assert pairs.held_bytes == 175
        done = pairs.add(2, _headers("error", "a"))  # completes: no longer pending
        assert done is completes and bytes(done.held) == b"x" * 100
        assert pairs.held_bytes == 75
        pairs.forget(resets)
        assert pairs.held_bytes == 25
        await asyncio.sleep(0.1)
        assert timed_out == [times_out] and pairs.held_bytes == 0
        cleared = pairs.add(7, _headers("data", "d"))
        pairs.hold(cleared, b"w" * 10)
        assert pairs.held_bytes == 10
        pairs.clear()
        assert pairs.held_bytes == 0 and not pairs.pending

    asyncio.run(main())
