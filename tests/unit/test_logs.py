"""crishim.logs: what reaches the log from libraries, and in what shape."""

from __future__ import annotations

import logging


def test_grpc_encoding_errors_become_short_warnings_at_a_bounded_rate():
    """grpc's Cython layer logs ERROR with a traceback for each metadata value that is not
    UTF-8: peer input. The filter makes each one warning line without the traceback, at
    most `burst` per period, and names how many it suppressed in the next line."""
    import io

    from crishim.logs import PeerEncodingErrors

    logger = logging.getLogger("test.cygrpc.encoding")
    logger.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.handlers[:] = [handler]
    peer_filter = PeerEncodingErrors(burst=3, period=3600)
    logger.addFilter(peer_filter)
    try:
        for _ in range(5):
            try:
                b"\xff\xfe".decode()
            except UnicodeDecodeError:
                logger.exception("Invalid encoding on %s", b"\xff\xfe")
        logger.error("something else entirely")
        lines = out.getvalue().splitlines()
        assert lines[:3] == ["WARNING a gRPC metadata value that is not UTF-8 was refused: "
                             "b'\\xff\\xfe'"] * 3
        assert lines[3] == "ERROR something else entirely"
        assert len(lines) == 4 and "Traceback" not in out.getvalue()
        peer_filter._window_start -= 3600  # the next period
        logger.error("Invalid encoding on %s", b"\x80")
        assert out.getvalue().splitlines()[-1].endswith("b'\\x80' (2 more suppressed)")
    finally:
        logger.removeFilter(peer_filter)
