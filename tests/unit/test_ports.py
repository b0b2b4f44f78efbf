import pytest

from crishim.ports import InvalidPort, check_port, parse_port


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
