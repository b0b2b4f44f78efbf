"""Negotiating portforward.crishim.dev/v1 and refusing what a session did not negotiate,
on the wire: raw SPDY and HTTP/2 clients, crishim's own client over SPDY over WebSocket,
and through the kubelet/API-server stand-in, which must relay the offer and the answer
unchanged. Against a real `crishim serve` and the UDP servers of the pod netns."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from crishim.client.transports import UdpNotSupported, open_session
from crishim.protocols.datagram import DatagramDecoder, encode_datagram, encode_datagrams
from tests.integration.test_cluster_portforward import (
    CrishimClusterForward,
    kubeconfig_dir,  # noqa: F401 - a fixture
    standin_for,
)
from tests.support import SANDBOX
from tests.support.h2_pf_client import H2Client
from tests.support.podnet import ECHO_PORT, UDP_DNS_PORT, UDP_ECHO_PORT
from tests.support.spdy_pf_client import SpdyPortForwardClient
from tests.support.udp_peers import (
    ANSWER_ADDRESS,
    burst,
    dns_query,
    exchange,
    parse_dns_answer,
)

K8S = "portforward.k8s.io"
CRISHIM = "portforward.crishim.dev/v1"
UDP = {"protocol": "udp"}


def chosen(head: str) -> str:
    m = re.search(r"(?im)^X-Stream-Protocol-Version:\s*(\S+)\s*$", head)
    assert m, head
    return m.group(1)


# --------------------------------------------------------------------------- SPDY


def test_an_upstream_offer_is_answered_as_before_and_udp_streams_are_reset(crishim):
    with SpdyPortForwardClient(crishim.port_forward_url(SANDBOX)) as client:
        assert chosen(client.head) == K8S
        fwd = client.forward(UDP_ECHO_PORT, error_headers=UDP, data_headers=UDP)
        fwd.send(encode_datagram(b"to a tcp session"))
        assert client.wait(lambda: fwd.reset_status is not None
                           and fwd.error_reset_status is not None)
        assert fwd.received == b""
        ok = client.roundtrip(ECHO_PORT, b"tcp still works")  # only those streams refused
        assert bytes(ok.received) == b"tcp still works"


def test_the_server_prefers_the_crishim_version_whatever_the_order(crishim):
    for versions in ((CRISHIM, K8S), (K8S, CRISHIM)):
        url = crishim.port_forward_url(SANDBOX)
        with SpdyPortForwardClient(url, versions=versions) as client:
            assert chosen(client.head) == CRISHIM


def test_udp_pair_on_a_crishim_session_carries_framed_datagrams(crishim):
    url = crishim.port_forward_url(SANDBOX)
    with SpdyPortForwardClient(url, versions=(CRISHIM, K8S)) as client:
        fwd = client.forward(UDP_ECHO_PORT, error_headers=UDP, data_headers=UDP)
        datagrams = [b"", b"a", os.urandom(1472), os.urandom(65507)]
        wire = encode_datagrams(datagrams)
        fwd.send(wire[:1000])  # boundaries are the framing's, not the frames'
        fwd.send(wire[1000:])
        assert client.wait(lambda: len(fwd.received) >= len(wire), timeout=20)
        assert DatagramDecoder().receive_data(bytes(fwd.received)) == datagrams
        fwd.close_write()  # the client ends the flow: the server ends its side too
        assert client.wait(lambda: fwd.finished)
        assert fwd.reset_status is None and fwd.error_text == ""


@pytest.mark.parametrize("error_headers, data_headers", [
    ({"protocol": "sctp"}, {"protocol": "sctp"}),
    ({"protocol": "UDP"}, {"protocol": "UDP"}),
    (UDP, {}),  # the two streams of one pair disagree
])
def test_other_protocols_and_mismatched_pairs_are_reset(crishim, error_headers, data_headers):
    url = crishim.port_forward_url(SANDBOX)
    with SpdyPortForwardClient(url, versions=(CRISHIM, K8S)) as client:
        fwd = client.forward(UDP_ECHO_PORT, error_headers=error_headers,
                             data_headers=data_headers)
        assert client.wait(lambda: fwd.reset_status is not None)
        assert bytes(client.roundtrip(ECHO_PORT, b"ok").received) == b"ok"


# --------------------------------------------------------------------------- HTTP/2


def test_h2_answers_the_version_in_every_response_and_refuses_udp_without_it(crishim):
    async def go():
        client = await H2Client.connect(crishim.port_forward_url(SANDBOX))
        try:
            plain = await client.forward(ECHO_PORT)  # no offer: an upstream-like session
            assert plain.data.headers.get("x-stream-protocol-version") == K8S
            sid = client.open_stream(client.request_headers(
                streamtype="error", port=str(UDP_ECHO_PORT), requestid="u1", protocol="udp",
                **{"x-stream-protocol-version": f"{CRISHIM}, {K8S}"}), end_stream=True)
            await asyncio.wait_for(client.streams[sid].ended.wait(), 10)
            refused = client.streams[sid]
            assert refused.status == 400  # the session is fixed at its first stream
            assert "needs stream protocol" in refused.body().decode()
            assert refused.headers.get("x-stream-protocol-version") == K8S
        finally:
            await client.close()
    asyncio.run(go())


def test_h2_udp_flow_after_the_offer(crishim):
    async def go():
        client = await H2Client.connect(crishim.port_forward_url(SANDBOX))
        try:
            headers = dict(port=str(UDP_ECHO_PORT), requestid="u2", protocol="udp",
                           **{"x-stream-protocol-version": f"{CRISHIM}, {K8S}"})
            error_id = client.open_stream(client.request_headers(streamtype="error", **headers),
                                          end_stream=True)
            data_id = client.open_stream(client.request_headers(streamtype="data", **headers))
            await asyncio.wait_for(client.streams[data_id].responded.wait(), 10)
            for sid in (error_id, data_id):
                assert client.streams[sid].status == 200
                assert client.streams[sid].headers["x-stream-protocol-version"] == CRISHIM
            await client.send(data_id, encode_datagrams([b"one", b"two"]))
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while len(client.streams[data_id].body()) < 10 and loop.time() < end:
                await asyncio.sleep(0.01)
            assert DatagramDecoder().receive_data(client.streams[data_id].body()) == \
                [b"one", b"two"]
            bad = client.open_stream(client.request_headers(
                streamtype="error", port=str(UDP_ECHO_PORT), requestid="u3",
                protocol="quic"), end_stream=True)
            await asyncio.wait_for(client.streams[bad].ended.wait(), 10)
            assert client.streams[bad].status == 400
        finally:
            await client.close()
    asyncio.run(go())


# --------------------------------------------------------------------------- crishim's client


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket", "h2"])
def test_the_client_learns_the_version_and_refuses_udp_without_it(crishim, transport):
    async def go():
        session = await open_session(crishim.port_forward_url(SANDBOX), transport,
                                     ping_interval=0)
        assert await session.negotiate() == CRISHIM and session.supports_udp
        session.close()
        plain = await open_session(crishim.port_forward_url(SANDBOX), transport,
                                   ping_interval=0, offer_udp=False)
        try:
            assert await plain.negotiate() == K8S and not plain.supports_udp
            with pytest.raises(UdpNotSupported, match="does not support UDP port-forward"):
                plain.open_connection_nowait(UDP_ECHO_PORT, asyncio.Protocol, "udp")
            reader, writer = await plain.open_stream(ECHO_PORT)  # TCP as ever
            writer.write(b"tcp")
            assert await asyncio.wait_for(reader.readexactly(3), 10) == b"tcp"
            writer.close()
        finally:
            plain.close()
    asyncio.run(go())


# --------------------------------------------------------------------------- the stand-in


@pytest.mark.parametrize("transport", ["spdy", "spdy-over-websocket"])
def test_udp_through_the_kubelet_stand_in(crishim, kubeconfig_dir, transport):  # noqa: F811
    with standin_for(crishim) as api:
        config = api.write_kubeconfig(os.path.join(kubeconfig_dir, "config"))
        with CrishimClusterForward("--kubeconfig", config, "pod/web", f":{UDP_DNS_PORT}/udp",
                                   f":{UDP_ECHO_PORT}/udp", f":{ECHO_PORT}",
                                   "--transport", transport) as pf:
            pf.wait_ready([ECHO_PORT])
            line = next(line for line in pf.stdout if f"-> {UDP_DNS_PORT}/udp" in line)
            local = int(re.search(r":(\d+) ->", line).group(1))
            answers = exchange(local, [dns_query(7, "through.stand.in")])
            assert parse_dns_answer(answers[0]) == (7, ANSWER_ADDRESS)
            echo_line = next(line for line in pf.stdout if f"-> {UDP_ECHO_PORT}/udp" in line)
            echo_local = int(re.search(r":(\d+) ->", echo_line).group(1))
            unpaced = burst(echo_local, 10000, 512)
            print(unpaced.line(f"stand-in unpaced {transport}"))
            assert unpaced.corrupt == unpaced.duplicates == 0
            assert unpaced.received >= 0.5 * unpaced.sent
            windowed = burst(echo_local, 10000, 512, window=64)
            print(windowed.line(f"stand-in window=64 {transport}"))
            assert (windowed.received, windowed.corrupt, windowed.reordered) == (10000, 0, 0)
        [upgrade] = api.upgrades
        sent = upgrade.forwarded_head.decode("latin-1")
        answer = upgrade.backend_head.decode("latin-1")
        if transport == "spdy":
            # both offers, in order, as crishim's client wrote them; the pick, as crishim wrote it
            assert re.findall(r"(?im)^X-Stream-Protocol-Version:\s*(\S+)", sent) == [CRISHIM, K8S]
            assert upgrade.header("x-stream-protocol-version") is not None
            assert chosen(answer) == CRISHIM
        else:
            offered = re.search(r"(?im)^Sec-WebSocket-Protocol:\s*(.+?)\s*$", sent).group(1)
            assert [p.strip() for p in offered.split(",")] == \
                [f"SPDY/3.1+{CRISHIM}", f"SPDY/3.1+{K8S}"]
            assert re.search(r"(?im)^Sec-WebSocket-Protocol:\s*(.+?)\s*$", answer).group(1) \
                == f"SPDY/3.1+{CRISHIM}"


def test_a_flow_opened_sent_and_ended_in_one_write_delivers_its_datagram(crishim, podnet):
    """SYN_STREAMs, the datagram and the FIN read at once (a DNS-style query, sent and
    done): the end was acted on when the pair completed, before the data read with it,
    and the datagram was dropped (0 of 20 arrived)."""
    from crishim.netns import bind_udp_in_netns

    pod = bind_udp_in_netns(podnet.path, "127.0.0.1", 0)
    pod.settimeout(5)
    port = pod.getsockname()[1]
    count = 20
    try:
        url = crishim.port_forward_url(SANDBOX)
        with SpdyPortForwardClient(url, versions=(CRISHIM, K8S)) as client:
            session = client.session
            for n in range(count):
                headers = {"streamtype": "error", "port": str(port), "requestid": str(n),
                           **UDP}
                error_sid = session.open_stream(headers)
                session.end_stream(error_sid)
                data_sid = session.open_stream(dict(headers, streamtype="data"))
                session.send_data(data_sid, encode_datagram(b"query %d" % n))
                session.end_stream(data_sid)
            client.flush()  # everything in one write
            got = sorted(pod.recv(100) for _ in range(count))
        assert got == sorted(b"query %d" % n for n in range(count))
    finally:
        pod.close()
