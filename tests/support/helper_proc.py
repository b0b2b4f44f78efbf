"""Run `crishim helper` (as root) and an unprivileged `crishim serve` for the helper-pod tests.

The unprivileged shim runs as uid/gid 65534 (nobody) with every capability dropped
(setpriv). This machine's Python lives under /root (mode 0700), which nobody may not
enter, so the shim is started in a private mount namespace where the Python prefix is
bind-mounted onto a world-readable directory; that mount namespace is the only thing the
shim gets that a plain `su nobody` would not, and it is gone when the shim exits.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.support.crishim_proc import CrishimProcess

NOBODY = 65534


def unprivileged_argv(python_args: list[str], mount_dir: str) -> list[str]:
    """argv that runs `python python_args...` as nobody with no capabilities."""
    prefix = os.path.realpath(sys.prefix)
    exe = os.path.relpath(os.path.realpath(sys.executable), prefix)
    inner = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all", "env",
             f"LD_LIBRARY_PATH={mount_dir}/lib", os.path.join(mount_dir, exe), *python_args]
    script = (f"mount --bind {shlex.quote(prefix)} {shlex.quote(mount_dir)} && exec "
              + shlex.join(inner))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


class UnprivilegedCrishim(CrishimProcess):
    """`crishim serve` as nobody, without CAP_SYS_ADMIN or any other capability."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args, env=env)
        os.chmod(self.dir, 0o755)
        os.chown(self.dir, NOBODY, NOBODY)  # the CRI socket is created in here
        self.mount_dir = tempfile.mkdtemp(prefix="crishim-pyroot-")
        os.chmod(self.mount_dir, 0o755)

    def start(self, wait: bool = True) -> UnprivilegedCrishim:
        env = dict(os.environ, **(self.env or {}))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self._log = open(self.log_path, "wb")
        argv = unprivileged_argv(["-m", "crishim", "serve", "--socket", self.socket,
                                  "--log-level", "debug", *self.args], self.mount_dir)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd="/")
        if wait:
            self.wait_ready()
        return self

    def status(self) -> dict[str, str]:
        """/proc/<pid>/status of the shim, as name -> value."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        rc = super().stop(sig, timeout)
        try:
            os.rmdir(self.mount_dir)
        except OSError:
            pass
        return rc


class HelperProcess:
    """`crishim helper` as a root subprocess; can be killed and started again."""

    def __init__(self, socket_path: str, mode: str = "fd", group: str = str(NOBODY),
                 *args: str) -> None:
        self.socket = socket_path
        self.mode = mode
        self.group = group
        self.args = list(args)  # more `crishim helper` flags
        self.dir = tempfile.mkdtemp(prefix="crishim-helper-")
        self.log_path = os.path.join(self.dir, "helper.log")
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 20.0) -> HelperProcess:
        self._log = open(self.log_path, "ab")
        seen = self._log.tell()  # a restart appends: look only at this run's lines
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crishim", "helper", "--socket", self.socket, "--mode",
             self.mode, "--group", self.group, "--log-level", "debug", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helper exited {self.proc.returncode}:\n{self.log()}")
            if "serving" in self.log()[seen:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"helper not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """Die as a crash would: SIGKILL, socket file left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HelperProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
