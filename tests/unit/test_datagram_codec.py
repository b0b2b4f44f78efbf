"""The length-prefixed datagram framing of a forwarded UDP flow (crishim/protocols/datagram.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crishim.protocols.datagram import (
    MAX_DATAGRAM,
    MAX_UDP_PAYLOAD,
    DatagramDecoder,
    encode_datagram,
    encode_datagrams,
)


def test_a_datagram_is_a_two_byte_big_endian_length_then_its_bytes():
    assert encode_datagram(b"abc") == b"\x00\x03abc"
    assert encode_datagram(b"") == b"\x00\x00"
    assert encode_datagram(b"x" * 0x1234)[:2] == b"\x12\x34"


def test_the_largest_udp_payloads_fit_and_larger_is_a_local_error():
    assert len(encode_datagram(b"\0" * MAX_UDP_PAYLOAD)) == MAX_UDP_PAYLOAD + 2
    assert len(encode_datagram(b"\0" * MAX_DATAGRAM)) == MAX_DATAGRAM + 2
    with pytest.raises(ValueError, match="does not fit"):
        encode_datagram(b"\0" * (MAX_DATAGRAM + 1))


def test_empty_datagrams_are_kept():
    decoder = DatagramDecoder()
    assert decoder.receive_data(encode_datagrams([b"", b"a", b""])) == [b"", b"a", b""]
    assert decoder.datagrams == 3


@given(st.lists(st.binary(max_size=3000), max_size=30), st.lists(st.integers(1, 5000),
                                                                  max_size=40))
def test_boundaries_survive_any_split_of_the_stream(datagrams, cuts):
    wire = encode_datagrams(datagrams)
    decoder = DatagramDecoder()
    out, pos = [], 0
    for cut in cuts:
        out += decoder.receive_data(wire[pos:pos + cut])
        pos += cut
    out += decoder.receive_data(wire[pos:])
    assert out == datagrams
    assert decoder.buffered == 0 and decoder.truncated() is None and decoder.error is None


def test_byte_by_byte_holds_at_most_one_partial_datagram():
    wire = encode_datagrams([b"x" * 70, b"y" * 5])
    decoder = DatagramDecoder()
    out = []
    for i in range(len(wire)):
        out += decoder.receive_data(wire[i:i + 1])
        assert decoder.buffered <= 72
    assert out == [b"x" * 70, b"y" * 5]


def test_an_oversized_length_sets_error_and_never_raises():
    decoder = DatagramDecoder(max_datagram=MAX_UDP_PAYLOAD)
    out = decoder.receive_data(encode_datagram(b"ok") + b"\xff\xff" + b"z" * 10)
    assert out == [b"ok"]
    assert "65535 bytes" in decoder.error and "65507" in decoder.error
    assert decoder.receive_data(encode_datagram(b"later")) == []  # inert afterwards
    assert decoder.truncated() is None


@given(st.binary(max_size=2000))
def test_arbitrary_peer_bytes_never_raise(data):
    decoder = DatagramDecoder(max_datagram=512)
    decoder.receive_data(data)
    assert decoder.buffered <= 514
    decoder.truncated()


def test_truncation_at_the_end_of_the_stream_is_described():
    decoder = DatagramDecoder()
    decoder.receive_data(b"\x00")
    assert "length" in decoder.truncated()
    decoder = DatagramDecoder()
    decoder.receive_data(b"\x00\x05ab")
    assert decoder.truncated() == "the stream ended inside a datagram: 2 of 5 bytes"


def test_memoryview_and_bytearray_input():
    wire = encode_datagrams([b"one", b"two"])
    decoder = DatagramDecoder()
    assert decoder.receive_data(memoryview(wire)[:4]) == []
    assert decoder.receive_data(bytearray(wire[4:])) == [b"one", b"two"]


def test_a_largest_datagram_a_byte_at_a_time_is_kept_without_rejoining():
    """65,509 one-byte pieces: each was joined with the part held (bytes(buf)), a copy
    of up to 64 KiB per byte, 2 GB in all; now kept as it comes, joined once."""
    decoder = DatagramDecoder(MAX_UDP_PAYLOAD)
    wire = encode_datagram(b"y" * MAX_UDP_PAYLOAD) + encode_datagram(b"next")
    out = []
    for i in range(len(wire)):
        out += decoder.receive_data(wire[i:i + 1])
    assert out == [b"y" * MAX_UDP_PAYLOAD, b"next"] and decoder.buffered == 0
