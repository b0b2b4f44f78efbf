import os
import shutil

import pytest

from tests.support import SANDBOX
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import PodNetwork

if os.geteuid() != 0:
    raise pytest.UsageError("crishim's integration tests need root: they create network "
                            "namespaces (tests/unit runs as any user)")


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
