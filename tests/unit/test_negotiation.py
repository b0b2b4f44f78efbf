"""Stream protocol negotiation: the crishim version beside portforward.k8s.io."""

import pytest

from crishim.protocols.constants import PORTFORWARD_CRISHIM_V1, PORTFORWARD_PROTOCOL
from crishim.protocols.negotiation import (
    StreamProtocolRefused,
    carries_udp,
    choose_version,
    client_offer,
    server_versions,
    stream_protocol,
    version_of_subprotocol,
    websocket_subprotocol,
)


def test_the_crishim_name_cannot_be_taken_for_an_upstream_one():
    assert PORTFORWARD_CRISHIM_V1 == "portforward.crishim.dev/v1"
    assert not PORTFORWARD_CRISHIM_V1.endswith(".k8s.io")


def test_server_prefers_the_crishim_version_whatever_the_client_order():
    assert choose_version(client_offer()) == PORTFORWARD_CRISHIM_V1
    assert choose_version(list(reversed(client_offer()))) == PORTFORWARD_CRISHIM_V1


def test_upstream_clients_negotiate_what_they_always_did():
    assert choose_version([PORTFORWARD_PROTOCOL]) == PORTFORWARD_PROTOCOL
    assert choose_version(["v4.channel.k8s.io"]) is None


def test_a_server_without_udp_picks_the_upstream_version():
    assert choose_version(client_offer(), server_versions(udp=False)) == PORTFORWARD_PROTOCOL
    assert choose_version(client_offer(), server_versions(udp=True)) == PORTFORWARD_CRISHIM_V1


def test_websocket_subprotocols_carry_the_version():
    assert websocket_subprotocol(PORTFORWARD_PROTOCOL) == "SPDY/3.1+portforward.k8s.io"
    assert version_of_subprotocol("SPDY/3.1+portforward.crishim.dev/v1") == PORTFORWARD_CRISHIM_V1
    assert version_of_subprotocol("v4.channel.k8s.io") is None


def test_stream_protocol_tcp_is_the_default_everywhere():
    assert stream_protocol({}, PORTFORWARD_PROTOCOL) == "tcp"
    assert stream_protocol({"protocol": "tcp"}, PORTFORWARD_PROTOCOL) == "tcp"
    assert stream_protocol({"protocol": "udp"}, PORTFORWARD_CRISHIM_V1) == "udp"
    assert carries_udp(PORTFORWARD_CRISHIM_V1) and not carries_udp(PORTFORWARD_PROTOCOL)


def test_udp_on_a_session_that_did_not_negotiate_it_is_refused():
    with pytest.raises(StreamProtocolRefused, match="needs stream protocol"):
        stream_protocol({"protocol": "udp"}, PORTFORWARD_PROTOCOL)
    with pytest.raises(StreamProtocolRefused, match="needs stream protocol"):
        stream_protocol({"protocol": "udp"}, None)


@pytest.mark.parametrize("value", ["sctp", "UDP", "", "udp "])
def test_other_protocol_values_are_refused(value):
    with pytest.raises(StreamProtocolRefused, match="expected tcp or udp"):
        stream_protocol({"protocol": value}, PORTFORWARD_CRISHIM_V1)
