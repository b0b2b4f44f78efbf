"""A sandbox's netns path that is not a network namespace (the `sandboxes` map, or the
upstream runtime's PodSandboxStatus, can name any file): crishim serve opens nothing but
a namespace file, so a FIFO there cannot stop its one event loop (it did, until a writer
came) and a device is never opened. The connection ends as for a sandbox that is gone."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient


def test_a_fifo_as_a_sandbox_netns_ends_that_connection_and_stalls_nothing(podnet, tmp_path):
    """The path is a namespace when PortForward and the upgrade look (a symbolic link to
    one), a FIFO by the time a connection dials."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    link = str(tmp_path / "netns")
    os.symlink(podnet.path, link)
    try:
        with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path},fifo={link}") as proc:
            with SpdyPortForwardClient(proc.port_forward_url("fifo")) as client:
                os.unlink(link)
                os.symlink(fifo, link)
                fwd = client.forward(ECHO_PORT)
                assert client.wait(fwd.finished, 5)
                assert f"{link} is not a network namespace" in fwd.error_text
            start = time.monotonic()
            with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
                assert bytes(other.roundtrip(ECHO_PORT, b"still served").received) \
                    == b"still served"
            assert time.monotonic() - start < 2
            log = proc.log()
        assert "Traceback" not in log
    finally:
        try:  # an old crishim sits in open() until a writer comes
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_out_of_descriptors_while_opening_a_netns_fails_the_dial_not_the_sandbox(podnet):
    """EMFILE opening the netns is this process's state: that dial fails (DialFailed, not
    fatal to the client), the sandbox is not reported gone, nothing raises past it (the
    second open, through /proc/self/fd, raised OSError past the dial: a traceback each)."""
    import resource

    from crishim.netns import open_netns
    from crishim.runtime import DialFailed

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        for spare in (0, 1):  # the first open, then the second, out of descriptors
            try:
                while True:
                    held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            for _ in range(spare):
                os.close(held.pop())
            try:
                open_netns(podnet.path)
            except DialFailed as e:
                assert "out of resources" in str(e)
            else:
                raise AssertionError("open_netns succeeded without descriptors")
            for fd in held:
                os.close(fd)
            held.clear()
        os.close(open_netns(podnet.path))  # and with descriptors again, it opens
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_sandbox_path_that_is_no_namespace_is_refused_at_port_forward(podnet, tmp_path):
    """A regular file, a directory, a FIFO or a namespace of another type named as a
    sandbox's netns got a URL, and its first connection ended the client's whole session:
    PortForward refuses it now, at once (a FIFO is looked at, not opened)."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path},file=/etc/hostname,"
                        f"dir={tmp_path},fifo={fifo},uts=/proc/self/ns/uts") as proc:
        for sandbox, path in (("file", "/etc/hostname"), ("dir", str(tmp_path)),
                              ("fifo", fifo), ("uts", "/proc/self/ns/uts")):
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                proc.port_forward_url(sandbox)
            assert time.monotonic() - start < 5
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"{path} is not a network namespace" in refused.value.details()
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
            assert bytes(other.roundtrip(ECHO_PORT, b"served").received) == b"served"
        log = proc.log()
    assert "Traceback" not in log
