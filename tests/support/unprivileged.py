"""Run this Python as uid 65534 (nobody) with no capabilities:

    python3 -m tests.support.unprivileged -m pytest -q tests/unit

The interpreter may live under a directory nobody cannot enter (pyenv under /root), so
its prefix is bind-mounted at a readable path in a private mount namespace first (the
same trick the helper-pod tests use for an unprivileged `crishim serve`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.support.helper_proc import unprivileged_argv


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:  # already unprivileged: just run
        os.execv(sys.executable, [sys.executable, *argv])
    mount_dir = tempfile.mkdtemp(prefix="crishim-pyroot-")
    os.chmod(mount_dir, 0o755)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HOME="/tmp")
    env.pop("PYTHONPATH", None)
    cmd = unprivileged_argv(argv, mount_dir)
    try:
        return subprocess.call(cmd, env=env)
    finally:
        os.rmdir(mount_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
