"""--runtime-endpoint: the forms crictl and gRPC accept, made one gRPC target."""

import os

import pytest

from crishim.client.cri import CriError, normalize_endpoint


@pytest.mark.parametrize("endpoint,target", [
    ("unix:///run/x.sock", "unix:///run/x.sock"),
    ("/run/x.sock", "unix:///run/x.sock"),
    ("unix:/run/x.sock", "unix:///run/x.sock"),  # gRPC's unix:PATH: was /cwd/unix:/run/...
    ("  unix:///run/x.sock  ", "unix:///run/x.sock"),
])
def test_endpoint_forms(endpoint: str, target: str) -> None:
    assert normalize_endpoint(endpoint) == target


def test_a_relative_path_is_from_the_working_directory() -> None:
    assert normalize_endpoint("unix:x.sock") == "unix://" + os.path.abspath("x.sock")
    assert normalize_endpoint("x.sock") == "unix://" + os.path.abspath("x.sock")


@pytest.mark.parametrize("endpoint", ["", "   ", "unix://", "unix:", "tcp://127.0.0.1:1",
                                      "/" + "d" * 120 + "/x.sock"])
def test_what_is_no_unix_socket_is_one_clear_error(endpoint: str) -> None:
    with pytest.raises(CriError, match="runtime endpoint"):
        normalize_endpoint(endpoint)


@pytest.mark.parametrize("raw, expected", [
    ('{"runtimeSpec": {"linux": {"namespaces": [{"type": "network", "path": "/run/netns/a"}]}}}',
     "/run/netns/a"),
    ('{"pid": 7}', "/proc/7/ns/net"),
    # other shapes from a runtime: no path, never AttributeError (a traceback from check)
    ('{"pid": 7, "runtimeSpec": {"linux": []}}', "/proc/7/ns/net"),
    ('{"pid": 7, "runtimeSpec": {"linux": {"namespaces": [1, "x"]}}}', "/proc/7/ns/net"),
    ('{"pid": 7, "runtimeSpec": []}', "/proc/7/ns/net"),
    ("[1]", CriError), ('"text"', CriError), ("[" * 100_000, CriError),
], ids=["spec", "pid", "linux-list", "namespaces-odd", "spec-list", "list", "string",
        "deep"])
def test_netns_from_verbose_info_of_any_shape(raw, expected):
    from crishim.client.cri import netns_from_info

    if expected is CriError:
        with pytest.raises(CriError):
            netns_from_info({"info": raw})
    else:
        assert netns_from_info({"info": raw}) == expected
