"""What the codecs may keep of their input without copying it."""

from __future__ import annotations

from typing import TypeGuard


def immutable(data: object) -> TypeGuard[bytes | memoryview]:
    """`bytes`, or a memoryview of `bytes`: nobody can change it under a view handed out,
    so a codec may keep it (or views of it) as it is; anything else (a bytearray, a view
    of a buffer its owner reuses) is copied first."""
    return type(data) is bytes or (type(data) is memoryview and type(data.obj) is bytes)
