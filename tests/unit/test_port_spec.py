"""`crishim port-forward` port specs, with the /udp extension."""

import pytest

from crishim.client.portforward import PortSpec, UsageError, parse_port_spec


@pytest.mark.parametrize("text, spec", [
    ("5000", PortSpec(5000, 5000)),
    ("6000:5000", PortSpec(6000, 5000)),
    (":5000", PortSpec(0, 5000)),
    ("5000/tcp", PortSpec(5000, 5000, "tcp")),
    ("5353:53/udp", PortSpec(5353, 53, "udp")),
    (":53/udp", PortSpec(0, 53, "udp")),
    ("53/udp", PortSpec(53, 53, "udp")),
])
def test_valid_specs(text, spec):
    assert parse_port_spec(text) == spec


@pytest.mark.parametrize("text, message", [
    ("53/sctp", "protocol 'sctp' is not tcp or udp"),
    ("53/", "protocol '' is not tcp or udp"),
    ("1:2:3/udp", "expected"),
    ("53/udp/udp", "expected"),
    ("x:53/udp", "local port 'x'"),
    (":0/udp", "remote port 0"),
])
def test_invalid_specs(text, message):
    with pytest.raises(UsageError, match=message):
        parse_port_spec(text)


def test_output_names_udp_ports():
    assert parse_port_spec("5353:53/udp").remote_text == "53/udp"
    assert parse_port_spec("8080").remote_text == "8080"
