"""crishim's check of received HTTP/2 header blocks (protocols/h2.py header_block_problem)
gives h2's own inbound validation's verdict, one pass instead of h2's generator chain:
held to h2's `validate_headers` on generated blocks, requests, responses and trailers."""

from __future__ import annotations

import h2.config
import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers
from hpack import HeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crishim.protocols.h2 import CompressionError, H2Codec, header_block_problem

NAMES = [b":method", b":scheme", b":authority", b":path", b":status", b":protocol",
         b":custom", b":", b"", b"host", b"te", b"connection", b"upgrade", b"keep-alive",
         b"proxy-connection", b"transfer-encoding", b"x-ok", b"X-Upper", b"a:b", b"sp ace",
         b"\x00", b"\x7f", b"\xc3\xa9", b"port", b"content-length"]
VALUES = [b"", b"GET", b"POST", b"CONNECT", b"trailers", b"TRAILERS", b"gzip", b" lead",
          b"trail ", b"\tx", b"a\r\nb", b"x\x00", b"\t", b"h", b"example.com", b"other.com",
          b"200", b"/", b"websocket", b"\xff"]
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"example.com"),
           (b":path", b"/portforward/x")]
RESPONSE = [(b":status", b"200")]

names = st.one_of(st.sampled_from(NAMES), st.binary(max_size=4))
values = st.one_of(st.sampled_from(VALUES), st.binary(max_size=4))
headers = st.lists(st.tuples(names, values), max_size=6)
modes = st.sampled_from(["request", "response", "trailer-in", "trailer-out"])


def h2_verdict(block: list[tuple[bytes, bytes]], mode: str) -> bool:
    """True when h2 (as its server or client validates what it receives) refuses it."""
    flags = HeaderValidationFlags(
        is_client=mode in ("response", "trailer-in"), is_trailer=mode.startswith("trailer"),
        is_response_header=mode == "response", is_push_promise=False)
    try:
        list(validate_headers([HeaderTuple(n, v) for n, v in block], flags))
    except ProtocolError:
        return True
    return False


def ours(block: list[tuple[bytes, bytes]], mode: str) -> bool:
    return header_block_problem(block, response=mode == "response",
                                trailer=mode.startswith("trailer")) is not None


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([[], REQUEST, RESPONSE]), extra=headers, at=st.integers(0, 4),
       mode=modes)
def test_verdict_matches_h2_on_generated_blocks(base, extra, at, mode):
    block = list(base)
    block[at:at] = extra
    assert ours(block, mode) == h2_verdict(block, mode), (block, mode)


@pytest.mark.parametrize("block, mode, problem", [
    (REQUEST, "request", None),
    (REQUEST + [(b"port", b"8080"), (b"te", b"Trailers")], "request", None),
    (REQUEST + [(b"Port", b"8080")], "request", "malformed header name"),
    (REQUEST + [(b"port", b" 8080")], "request", "malformed value"),
    (REQUEST + [(b"connection", b"close")], "request", "connection-specific"),
    (REQUEST + [(b"te", b"gzip")], "request", "TE header"),
    (REQUEST[1:], "request", "without :method"),
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"")],
     "request", "an empty :path"),
    (REQUEST + [(b":path", b"/again")], "request", "duplicate pseudo-header"),
    ([(b"port", b"1")] + REQUEST, "request", "after a regular one"),
    (REQUEST[:2] + [(b":path", b"/")], "request", "neither :authority nor Host"),
    (REQUEST + [(b"host", b"other")], "request", "differ"),
    (RESPONSE, "response", None),
    (RESPONSE + [(b":path", b"/")], "response", "request pseudo-header"),
    ([(b"x", b"1")], "trailer-in", None),
    (RESPONSE, "trailer-out", "in trailers"),
])
def test_each_rule_names_what_is_wrong(block, mode, problem):
    found = header_block_problem(block, response=mode == "response",
                                 trailer=mode.startswith("trailer"))
    assert (found is None) if problem is None else (problem in found), found
    assert (found is not None) == h2_verdict(block, mode)


def _pair() -> tuple[H2Codec, H2Codec]:
    client = H2Codec(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = H2Codec(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(b"".join(bytes(p) for p in client.take_output()))
    client.receive_data(b"".join(bytes(p) for p in server.take_output()))
    return client, server


def test_codec_hands_over_decoded_headers_and_refuses_malformed_ones_with_goaway():
    client, server = _pair()
    client.send_headers(1, [(k.decode(), v.decode()) for k, v in REQUEST] + [("port", "80")])
    events = server.receive_data(b"".join(bytes(p) for p in client.take_output()))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert dict(request.headers)["port"] == "80" and dict(request.headers)[":method"] == "POST"

    for extra, problem in (((b"Port", b"80"), "malformed header name"),
                           ((b"port", b"\xff"), "not utf-8")):
        client, server = _pair()
        client.config.validate_outbound_headers = False
        client.config.normalize_outbound_headers = False
        client.send_headers(1, REQUEST + [extra])
        with pytest.raises(ProtocolError, match=problem):
            server.receive_data(b"".join(bytes(p) for p in client.take_output()))
        goaway = b"".join(bytes(p) for p in server.take_output())
        assert goaway[3] == 0x7 and int.from_bytes(goaway[-4:], "big") == 1  # PROTOCOL_ERROR


# --- LiteralHeaderDecoder: hpack's decoder with a fast path for plain literal blocks -----

field_names = st.one_of(st.sampled_from([b":method", b":path", b"port", b"requestid", b""]),
                        st.binary(max_size=140))
fields = st.lists(st.tuples(field_names, st.binary(max_size=140), st.booleans()), max_size=5)


def _outcome(decoder, block: bytes):
    try:
        return [(type(h).__name__, h[0], h[1]) for h in decoder.decode(block, raw=True)]
    except CompressionError as e:  # crishim's decoder: hpack's error, for COMPRESSION_ERROR
        return f"CompressionError({type(e.__cause__).__name__})"
    except Exception as e:  # noqa: BLE001 - the kind of failure is what is compared
        return type(e).__name__


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.tuples(fields, st.sampled_from(["literal", "hpack", "hpack-raw"])),
                       min_size=1, max_size=4),
       cut=st.integers(0, 3), garbage=st.binary(max_size=6), limit=st.sampled_from([80, 65536]))
def test_literal_decoder_decodes_as_hpack_does(blocks, cut, garbage, limit):
    """Blocks from LiteralHeaderEncoder, from hpack's own encoder (Huffman, indexing:
    decoded by hpack after the fast path declines) and damaged ones, in sequence (the
    dynamic table carries over): the same headers, types, or failure as hpack's (a
    CompressionError from hpack's error, but for a list over the size h2 answers itself)."""
    import hpack

    from crishim.protocols.h2 import LiteralHeaderDecoder, LiteralHeaderEncoder
    ours_dec, stock_dec = LiteralHeaderDecoder(), hpack.Decoder()
    ours_dec.max_header_list_size = stock_dec.max_header_list_size = limit
    literal, stock = LiteralHeaderEncoder(), hpack.Encoder()
    for i, (block_fields, how) in enumerate(blocks):
        headers = [hpack.NeverIndexedHeaderTuple(n, v) if never else hpack.HeaderTuple(n, v)
                   for n, v, never in block_fields]
        if how == "literal":
            block = literal.encode(headers)
        else:
            block = stock.encode(headers, huffman=how == "hpack")
        if i == len(blocks) - 1 and cut:  # the last block damaged: cut short, or extended
            block = block[:-cut] if cut < 3 else block + garbage
        got, want = _outcome(ours_dec, block), _outcome(stock_dec, block)
        if isinstance(want, str) and want != "OversizedHeaderListError":
            want = f"CompressionError({want})"  # a block that cannot be decoded: RFC 9113 4.3
        assert got == want, (block, got, want)
        if isinstance(want, str):
            break
