"""WINDOW_UPDATEs a peer may send without being charged, for the SPDY and HTTP/2 codecs."""

from __future__ import annotations

ALLOWANCE = 16  # free before any DATA was sent (a connection window raised at the start)
CAP = 1 << 16  # credit saved up at most


class WindowUpdateCredit:
    """A peer returns window for DATA it received: at most two WINDOW_UPDATEs (the
    stream's and the connection's) per DATA frame sent to it. `spend` says whether one
    is within that credit; one past it is for the codec's budget hook to charge (h2
    ignores those for closed streams, and increments of 1 cost the same work as any:
    millions a second were free)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = ALLOWANCE

    def earn(self, frames: int) -> None:
        """`frames` DATA frames sent."""
        if self.left < CAP:
            self.left += 2 * frames

    def spend(self) -> bool:
        """One WINDOW_UPDATE received: True while it is within the credit."""
        if self.left > 0:
            self.left -= 1
            return True
        return False
