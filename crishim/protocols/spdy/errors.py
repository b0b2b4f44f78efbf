"""Errors raised to the local user of a SPDY connection."""

from __future__ import annotations


class SpdyError(Exception):
    """Base class for errors raised to the local user of a session."""


class StreamClosedError(SpdyError):
    """The stream cannot carry what the caller tried to send on it."""


class SessionClosedError(SpdyError):
    """The session no longer accepts new streams (terminated, GOAWAY, ids exhausted)."""


class HeaderBlockError(SpdyError):
    """An inflated header block is malformed; the zlib context is still intact."""


class CompressionError(SpdyError):
    """A header block could not be inflated; the zlib context is unusable."""

