"""`crishim check` against a real `crishim serve`, for every transport."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support import SANDBOX
from tests.support.podnet import HTTP_PORT

TRANSPORTS = ["spdy", "websocket", "spdy-over-websocket", "h2"]
DATA_CHECKS = ["echo-sha256", "upload-sha256", "download-sha256", "half-close", "closed-port",
               "pod-reset", "concurrent", "setup-latency"]


def run_check(crishim, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
         "--runtime-endpoint", f"unix://{crishim.socket}", *args],
        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_check_with_own_servers_in_the_sandbox_passes(crishim, podnet, transport):
    r = run_check(crishim, "--transport", transport, "--netns", podnet.path, "--json",
                  "--size", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["servers"] is True and report["netns"] == podnet.path
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"cri-url", "token-single-use", *(f"handshake:{t}" for t in
                                                             TRANSPORTS), *DATA_CHECKS,
                           "udp-echo"}
    # crishim speaks every transport
    for t in TRANSPORTS:
        assert checks[f"handshake:{t}"]["result"] == "pass", checks[f"handshake:{t}"]
        assert checks[f"handshake:{t}"]["required"] is (t == transport)
        # the session transports answer a session-level ping, timed
        has_ping = re.search(r", ping \d+\.\d\d ms$", checks[f"handshake:{t}"]["detail"])
        assert bool(has_ping) is (t != "websocket"), checks[f"handshake:{t}"]["detail"]
    assert "404" in checks["token-single-use"]["detail"]
    assert "22 chars" in checks["cri-url"]["detail"]
    skipped = set(report["skipped"])
    if transport == "websocket":
        assert skipped == {"upload-sha256", "half-close", "udp-echo"}
        assert "cannot carry UDP" in checks["udp-echo"]["detail"]
    else:
        assert skipped == set()
        assert checks["udp-echo"]["result"] == "pass", checks["udp-echo"]
        assert "65507" in checks["udp-echo"]["detail"]
        assert "sha256 matches" in checks["upload-sha256"]["detail"]
        assert checks["half-close"]["result"] == "pass"
    for name in DATA_CHECKS:
        if name not in skipped:
            assert checks[name]["result"] == "pass", checks[name]
    assert "sha256 matches" in checks["download-sha256"]["detail"]
    # crishim's quiet error policy: a failed connection never ends the session
    for name in ("closed-port", "pod-reset"):
        if transport != "websocket":
            assert "the session survived" in checks[name]["detail"]
    assert "16/16" in checks["concurrent"]["detail"]


def test_check_without_netns_skips_and_says_why(crishim):
    """crishim without an upstream has no PodSandboxStatus: the netns is unknown."""
    r = run_check(crishim, "--port", str(HTTP_PORT), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["servers"] is False
    assert "UNIMPLEMENTED" in report["servers_reason"]
    assert "--netns" in report["servers_reason"]
    assert set(report["skipped"]) == {*DATA_CHECKS, "udp-echo"}
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["connect"]["result"] == "pass"


def test_check_table_output(crishim, podnet):
    r = run_check(crishim, "--netns", podnet.path, "--size", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "TIME", "DETAIL"]
    assert any(line.startswith("echo-sha256") and " PASS " in line for line in lines)
    assert lines[-1] == "all required checks passed"


def test_check_unreachable_endpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", SANDBOX,
                        "--runtime-endpoint", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "cannot reach the runtime" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_unknown_sandbox_fails(crishim):
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--sandbox", "nope",
                        "--runtime-endpoint", crishim.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "sandbox 'nope' not found" in r.stderr
