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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No crishim server of the run may have logged a traceback: what clients send (the
    hostile tests included) ends a stream or a session with a logged reason, never that."""
    with_tracebacks = []
    for path in CrishimProcess.logs:
        try:
            with open(path, "rb") as f:
                if b"Traceback" in f.read():
                    with_tracebacks.append(path)
        except FileNotFoundError:
            continue
    if with_tracebacks:
        print(f"\ncrishim logged a traceback in {len(with_tracebacks)} server log(s): "
              + ", ".join(with_tracebacks))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
