import os
import shutil

import pytest

from tests.crishim_proc import CrishimProcess
from tests.podnet import PodNetwork

SANDBOX = "sb-test"


def missing(what: str) -> None:
    """A tool the tests drive is not installed: a skip on a developer's box, a failure in
    CI (CI=true), where `deploy/install.sh --test` must have provided it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (CI must have it)")
    pytest.skip(f"{what} is not installed")


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("crishim's tests need root: they create network namespaces")


@pytest.fixture(scope="session")
def podnet():
    with PodNetwork() as net:
        yield net


@pytest.fixture(scope="session")
def crishim(podnet):
    """One crishim serving the pod netns as sandbox SANDBOX (and 'gone' -> a missing path)."""
    proc = CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path},gone=/var/run/netns/none",
                          "--stream-creation-timeout", "5s")
    with proc:
        yield proc
    if os.environ.get("CRISHIM_KEEP_LOGS"):
        shutil.copy(proc.log_path, "/tmp/crishim-session.log")
