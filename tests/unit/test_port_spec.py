"""`crishim port-forward` port specs, with the /udp extension."""

import pytest

from crishim.client.portforward import (
    NamedPort,
    PortSpec,
    UsageError,
    parse_port_spec,
    parse_port_specs,
    refuse_repeated_local_ports,
)


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
    ("٨٠٨٠", "local port '٨٠٨٠' is not a number"),  # Arabic-Indic digits: ASCII only
    ("8080:８０", "remote port '８０' is not a number"),  # fullwidth
    ("²", "local port '²' is not a number"),  # isdigit(), but int() refuses it
    ("1" * 5000, r"local port 11111111111… is not in 0\.\.65535"),  # int() refuses it too
])
def test_invalid_specs(text, message):
    with pytest.raises(UsageError, match=message):
        parse_port_spec(text)


def test_output_names_udp_ports():
    assert parse_port_spec("5353:53/udp").remote_text == "53/udp"
    assert parse_port_spec("8080").remote_text == "8080"


def test_leading_zeros_are_the_same_port():
    assert parse_port_spec("0000000080:08080") == PortSpec(80, 8080)


@pytest.mark.parametrize("texts, message", [
    (["28083:8080", "28083:8080"], "'28083:8080' and '28083:8080': local port 28083 is given "
                                   "twice"),
    (["5000", "5000:80/tcp"], "local port 5000 is given twice"),
    (["53/udp", "53:5353/udp"], "local port 53/udp is given twice"),
])
def test_a_local_port_given_twice_is_refused(texts, message):
    with pytest.raises(UsageError, match=message):
        parse_port_specs(texts)


def test_the_same_number_for_tcp_and_udp_and_free_ports_twice_are_fine():
    assert parse_port_specs(["53", "53/udp", ":80", "0:80"]) == [
        PortSpec(53, 53), PortSpec(53, 53, "udp"), PortSpec(0, 80), PortSpec(0, 80)]



@pytest.mark.parametrize("text, spec", [
    ("http", PortSpec(0, 0, "tcp", NamedPort("http", None, local_is_remote=True))),
    ("http:http", PortSpec(0, 0, "tcp", NamedPort("http", None, local_is_remote=True))),
    ("8080:http", PortSpec(8080, 0, "tcp", NamedPort("http"))),
    (":http", PortSpec(0, 0, "tcp", NamedPort("http"))),
    ("5353:dns/udp", PortSpec(5353, 0, "udp", NamedPort("dns", "udp"))),
    ("dns/tcp", PortSpec(0, 0, "tcp", NamedPort("dns", "tcp", local_is_remote=True))),
    ("٨٠٨٠", PortSpec(0, 0, "tcp", NamedPort("٨٠٨٠", None, local_is_remote=True))),
    ("8080:80", PortSpec(8080, 80)),
])
def test_with_kubeconfig_a_remote_port_may_be_a_name(text, spec):
    assert parse_port_spec(text, names=True) == spec


@pytest.mark.parametrize("text, message", [
    ("http:80", "local port 'http' is not a number"),  # a local port is a number
    ("web:http", "local port 'web' is not a number"),
    ("+80", "local port '\\+80' is not a number"),  # a number to kubectl, never a name
    ("8080:", "remote port '' is not a number"),
])
def test_with_kubeconfig_the_local_port_stays_a_number(text, message):
    with pytest.raises(UsageError, match=message):
        parse_port_spec(text, names=True)


@pytest.mark.parametrize("text", ["http", "8080:http", ":dns/udp", "web-2"])
def test_without_kubeconfig_a_name_says_it_needs_kubeconfig(text):
    with pytest.raises(UsageError, match="is not a number \\(a named port needs "
                                         "--kubeconfig"):
        parse_port_spec(text)


def test_a_local_port_a_name_gives_is_checked_once_resolved():
    texts = ["http", "80:8080"]
    assert parse_port_specs(texts, names=True)[1] == PortSpec(80, 8080)  # 'http': not yet
    with pytest.raises(UsageError, match="'http' and '80:8080': local port 80 is given "
                                         "twice"):
        refuse_repeated_local_ports(texts, [PortSpec(80, 80), PortSpec(80, 8080)])
