"""prepare_socket_path: the directories it makes and the paths it refuses."""

import os
import socket
import stat

import pytest

from crishim.sysutil import MAX_SOCKET_PATH, SocketInUse, prepare_socket_path


def test_made_directories_are_0755_at_most_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        prepare_socket_path(str(tmp_path / "a" / "b" / "crishim.sock"))
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755  # not 0777 under umask 000


def test_a_path_bind_cannot_take_is_refused_before_anything_is_made(tmp_path):
    path = tmp_path / ("d" * MAX_SOCKET_PATH) / "x.sock"
    with pytest.raises(SocketInUse, match=f"at most {MAX_SOCKET_PATH} fit"):
        prepare_socket_path(str(path))
    assert not path.parent.exists()


def test_the_longest_path_that_fits_binds(tmp_path):
    name = "s" * (MAX_SOCKET_PATH - len(os.fsencode(str(tmp_path))) - 1)
    path = str(tmp_path / name)
    assert len(os.fsencode(path)) == MAX_SOCKET_PATH
    prepare_socket_path(path)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # the bound: one byte more and bind() raises


def test_a_nul_in_a_socket_path_is_a_problem_not_a_valueerror():
    """bind() raises ValueError for it, past every handler of OSError: a traceback."""
    from crishim.sysutil import socket_path_problem

    assert "cannot contain a NUL byte" in socket_path_problem("/run/a\0b.sock")
