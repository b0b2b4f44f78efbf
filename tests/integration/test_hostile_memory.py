"""Memory after a burst: hundreds of concurrent sessions grow RSS; once they close, RSS
returns close to where it was (cycles collected, freed heap given back by malloc_trim)."""

from __future__ import annotations

import time

from tests.support import SANDBOX, status_mib
from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

SESSIONS = 300


def _rss_mib(pid: int) -> float:
    return status_mib(pid)


def test_rss_returns_near_its_level_after_a_burst_of_sessions(podnet):
    with CrishimProcess("--sandboxes", f"{SANDBOX}={podnet.path}", "--max-tokens", "1000",
                        "--memory-release-interval", "1s") as proc:
        pid = proc.proc.pid
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as warm:
            assert bytes(warm.roundtrip(ECHO_PORT, b"warm").received) == b"warm"
        time.sleep(0.5)
        before = _rss_mib(pid)
        clients = []
        try:
            for _ in range(SESSIONS):
                client = SpdyPortForwardClient(proc.port_forward_url(SANDBOX))
                fwd = client.forward(ECHO_PORT)
                fwd.send(b"x" * 1000)
                clients.append((client, fwd))
            for client, fwd in clients:
                assert client.wait(lambda f=fwd: len(f.received) == 1000, 20)
            peak = _rss_mib(pid)
        finally:
            for client, _ in clients:
                client.close()
        clients.clear()
        grown = peak - before
        assert grown > 10, f"the burst grew RSS only {grown:.1f} MiB: nothing to measure"
        bound = before + 0.4 * grown + 4
        deadline = time.monotonic() + 30
        after = _rss_mib(pid)
        while after > bound and time.monotonic() < deadline:
            time.sleep(0.25)
            after = _rss_mib(pid)
        print(f"RSS before {before:.0f} MiB, peak {peak:.0f} MiB, after {after:.0f} MiB")
        assert after <= bound, (before, peak, after)
        with SpdyPortForwardClient(proc.port_forward_url(SANDBOX)) as other:
            assert bytes(other.roundtrip(ECHO_PORT, b"after").received) == b"after"
        log = proc.log()
    assert "released memory after a burst" in log
    assert "Traceback" not in log
