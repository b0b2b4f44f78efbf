"""Many forwarded connections on one session: every one works, none harms the others
(the server then holds more than 1,024 descriptors, past select()'s reach)."""

from tests.support.crishim_proc import CrishimProcess
from tests.support.podnet import ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient

COUNT = 1100


def test_1100_concurrent_forwards_on_one_spdy_session(podnet):
    with CrishimProcess("--sandboxes", f"sb={podnet.path}", "--log-level", "warning") as proc:
        with SpdyPortForwardClient(proc.port_forward_url("sb"), timeout=60) as client:
            forwards = [client.forward(ECHO_PORT) for _ in range(COUNT)]
            for i, fwd in enumerate(forwards):
                fwd.send(b"%d\n" % i)
            want = {i: b"%d\n" % i for i in range(COUNT)}
            assert client.wait(lambda: all(f.received == want[i]
                                           for i, f in enumerate(forwards)), timeout=60), \
                [i for i, f in enumerate(forwards) if f.received != want[i]][:10]
            # all open at once; now end them and check each ends cleanly, no error text
            for fwd in forwards:
                fwd.close_write()
            assert client.wait(lambda: all(f.finished() for f in forwards), timeout=60)
            assert [f.error_text for f in forwards if f.error_text] == []
            assert all(f.reset_status is None for f in forwards)
        assert "Traceback" not in proc.log()
