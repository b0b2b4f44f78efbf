import pytest

from crishim.ports import InvalidPort, check_port, ip_or_empty, netns_path_problem, parse_port


@pytest.mark.parametrize("text,port", [("1", 1), ("80", 80), ("08080", 8080), ("65535", 65535)])
def test_ascii_ports_parse(text, port):
    assert parse_port(text) == port


@pytest.mark.parametrize("text", ["", "0", "65536", "²", "٨٠", "８０", "+80", " 80", "80 ",
                                  "0x50", "000080", "1_0", "8" * 10000])
def test_anything_else_is_invalid_port_with_a_short_message(text):
    with pytest.raises(InvalidPort) as e:
        parse_port(text)
    assert isinstance(e.value, ValueError) and len(str(e.value)) < 100


def test_numeric_ports_are_checked():
    assert check_port(443) == 443
    with pytest.raises(InvalidPort):
        check_port(70000)


@pytest.mark.parametrize("text,ip", [("10.1.2.3", "10.1.2.3"), ("fd00::1", "fd00::1"),
                                     ("", ""), ("a\0b", ""), ("example.com", ""),
                                     ("ü" * 70, ""), ("10.1.2.3 ", "")])
def test_only_ip_addresses_are_pod_ips(text, ip):
    assert ip_or_empty(text) == ip


def test_netns_paths_must_be_absolute_and_free_of_nul():
    assert netns_path_problem("/run/netns/cni-1") == ""
    assert "NUL" in netns_path_problem("/run/netns/a\0b")
    assert "not an absolute path" in netns_path_problem("run/netns/x")
    assert "not an absolute path" in netns_path_problem("")
