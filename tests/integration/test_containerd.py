"""crishim in front of a real containerd: the drop-in CRI proxy and the containerd plugin.

A real containerd (tests/support/containerd_env.py), a real `crishim serve --runtime containerd
--upstream-endpoint <containerd socket>` subprocess, real gRPC over both unix sockets,
real pod sandboxes with real netns, real kubectl 1.27 and crishim's own SPDY codec as
clients. Without the prerequisites these tests skip (fail when CI is set).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from crishim.client.podservers import serve_udp_echo
from crishim.config import Config
from crishim.cri import api_pb2, api_pb2_grpc
from crishim.netns import create_named_netns, delete_named_netns, listen_in_netns
from crishim.runtime import DialFailed, Sandbox, SandboxGone, SandboxNotFound
from tests.support import missing, peers
from tests.support.containerd_env import ContainerdEnv, ContainerdUnavailable, skip_or_fail
from tests.support.crishim_proc import CrishimProcess
from tests.support.spdy_pf_client import SpdyPortForwardClient
from tests.support.standin import KubeStandIn, free_port, run_kubectl_port_forward

KUBECTL_127 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"
ECHO_PORT = 7000
SINK_PORT = 7001  # reads to EOF, answers "<count> <sha256>\n"
CLOSED_PORT = 7999
RUNTIME = "/runtime.v1.RuntimeService/"
IMAGES = "/runtime.v1.ImageService/"


# ----------------------------------------------------------------------------- servers


class NetnsServers:
    """TCP servers inside any netns path, on one asyncio loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="netns-servers")
        self._thread.start()
        self._servers: list[asyncio.AbstractServer] = []
        self._handlers: set[asyncio.Task] = set()

    def serve(self, netns_path: str | None, host: str, port: int, kind: str) -> None:
        serve_one = {"echo": self._echo, "sink": self._sink}[kind]

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            self._handlers.add(task)
            try:
                await serve_one(reader, writer)
            finally:
                self._handlers.discard(task)

        async def start() -> None:
            if netns_path:
                sock = listen_in_netns(netns_path, host, port)
            else:
                sock = socket.create_server((host, port))
            self._servers.append(await asyncio.start_server(handler, sock=sock))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def udp_echo(self, netns_path: str) -> int:
        """A UDP echo inside the netns (closed with the TCP servers); its port."""
        echo, port = asyncio.run_coroutine_threadsafe(serve_udp_echo(netns_path),
                                                      self.loop).result(10)
        self._servers.append(echo)  # type: ignore[arg-type]  # only closed, like a server
        return port

    @staticmethod
    async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(100_000):
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, count = hashlib.sha256(), 0
        try:
            for _ in range(1_000_000):
                data = await reader.read(1 << 16)
                if not data:
                    break
                digest.update(data)
                count += len(data)
            writer.write(f"{count} {digest.hexdigest()}\n".encode())
            await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def sandbox_config(name: str, env: ContainerdEnv, host_network: bool = False
                   ) -> api_pb2.PodSandboxConfig:
    uid = str(uuid.uuid4())
    log_dir = env.dir / "pods" / f"default_{name}_{uid}"
    log_dir.mkdir(parents=True, exist_ok=True)
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="default", uid=uid),
        hostname="" if host_network else name, log_directory=str(log_dir))
    if host_network:
        config.linux.security_context.namespace_options.network = api_pb2.NODE
    return config


def raw_call(channel: grpc.Channel, method: str, request: bytes, timeout: float = 30,
             metadata=None) -> bytes:
    """A unary call without decoding the answer: the bytes as they came off the wire."""
    return channel.unary_unary(method)(request, timeout=timeout, metadata=metadata)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ctrd() -> Iterator[ContainerdEnv]:
    try:
        env = ContainerdEnv()
        env.start()
    except ContainerdUnavailable as e:
        skip_or_fail(e.reason)
    yield env
    env.close()


@pytest.fixture(scope="session")
def shim(ctrd: ContainerdEnv) -> Iterator[CrishimProcess]:
    proc = CrishimProcess("--runtime", "containerd", "--upstream-endpoint", str(ctrd.socket),
                          "--stream-creation-timeout", "5s")
    with proc:
        yield proc
    if os.environ.get("CRISHIM_KEEP_LOGS"):
        Path("/tmp/crishim-containerd.log").write_text(proc.log())


@pytest.fixture(scope="session")
def servers() -> Iterator[NetnsServers]:
    s = NetnsServers()
    yield s
    s.close()


@pytest.fixture(scope="session")
def pod(ctrd: ContainerdEnv, shim: CrishimProcess, servers: NetnsServers
        ) -> Iterator[tuple[str, str]]:
    """A sandbox run through crishim, echo and sink servers inside its netns."""
    sandbox_id = shim.runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=sandbox_config("web", ctrd)), timeout=60
    ).pod_sandbox_id
    netns = ctrd.netns_path(sandbox_id)
    servers.serve(netns, "127.0.0.1", ECHO_PORT, "echo")
    servers.serve(netns, "127.0.0.1", SINK_PORT, "sink")
    yield sandbox_id, netns
    ctrd.stop_and_remove(sandbox_id)


@pytest.fixture
def upstream_channel(ctrd: ContainerdEnv) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(ctrd.endpoint) as channel:
        yield channel


# ----------------------------------------------------------------------------- CRI proxy


def test_version_through_the_proxy_is_containerds(shim: CrishimProcess,
                                                  ctrd: ContainerdEnv) -> None:
    """The default (upstream_version on): a kubelet reports containerd://1.6.x."""
    via_shim = shim.runtime.Version(api_pb2.VersionRequest(version="0.1.0"), timeout=10)
    direct = ctrd.version()
    assert direct.runtime_name == "containerd"
    assert (via_shim.runtime_name, via_shim.runtime_version, via_shim.runtime_api_version) \
        == (direct.runtime_name, direct.runtime_version, direct.runtime_api_version)


def test_version_is_crishims_with_upstream_version_off(ctrd: ContainerdEnv) -> None:
    with CrishimProcess("--upstream-endpoint", str(ctrd.socket),
                        "--no-upstream-version") as proc:
        ours = proc.runtime.Version(api_pb2.VersionRequest(version="0.1.0"), timeout=10)
    assert (ours.runtime_name, ours.version, ours.runtime_api_version) == ("crishim", "0.1.0",
                                                                           "v1")


def test_upstream_alone_is_a_drop_in(ctrd: ContainerdEnv, pod: tuple[str, str]) -> None:
    """`crishim serve --upstream-endpoint SOCK`, no --runtime: sandboxes resolve through
    containerd (the netns plugin would answer NOT_FOUND for every one of them)."""
    with CrishimProcess("--upstream-endpoint", str(ctrd.socket)) as proc:
        with SpdyPortForwardClient(proc.port_forward_url(pod[0])) as client:
            echo = client.roundtrip(ECHO_PORT, b"drop-in")
        version = proc.runtime.Version(api_pb2.VersionRequest(version="0.1.0"), timeout=10)
        log = proc.log()
    assert echo.received == b"drop-in"
    assert version.runtime_name == "containerd"
    assert "runtime plugin containerd: upstream_endpoint is set" in log
    assert "Version answered by the upstream" in log


def test_sandbox_lifecycle_through_crishim(shim: CrishimProcess, ctrd: ContainerdEnv,
                                           upstream_channel: grpc.Channel) -> None:
    runtime = shim.runtime
    sandbox_id = runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=sandbox_config("life", ctrd)), timeout=60
    ).pod_sandbox_id
    listed = {s.id: s for s in runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(),
                                                      timeout=10).items}
    assert listed[sandbox_id].state == api_pb2.SANDBOX_READY
    assert listed[sandbox_id].metadata.name == "life"

    # the proxy passes the upstream's bytes through: identical to asking containerd
    request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                              verbose=True).SerializeToString()
    via_shim = raw_call(shim.channel, RUNTIME + "PodSandboxStatus", request)
    direct = raw_call(upstream_channel, RUNTIME + "PodSandboxStatus", request)
    assert via_shim == direct
    status = api_pb2.PodSandboxStatusResponse.FromString(via_shim)
    assert status.status.id == sandbox_id and "runtimeSpec" in status.info["info"]

    runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                           timeout=60)
    stopped = runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                       timeout=10)
    assert stopped.status.state == api_pb2.SANDBOX_NOTREADY
    runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                             timeout=60)
    assert sandbox_id not in {s.id for s in ctrd.list_sandboxes()}


def test_list_images_through_crishim_is_byte_identical(shim: CrishimProcess,
                                                       upstream_channel: grpc.Channel) -> None:
    request = api_pb2.ListImagesRequest().SerializeToString()
    via_shim = raw_call(shim.channel, IMAGES + "ListImages", request)
    assert via_shim == raw_call(upstream_channel, IMAGES + "ListImages", request)
    images = api_pb2_grpc.ImageServiceStub(shim.channel).ListImages(api_pb2.ListImagesRequest(),
                                                                    timeout=10).images
    assert "localhost/crishim/pause:test" in [t for image in images for t in image.repo_tags]


def test_upstream_error_status_passes_through_unchanged(shim: CrishimProcess,
                                                        ctrd: ContainerdEnv) -> None:
    request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id="no-such-sandbox")
    via_shim = rpc_error(shim.runtime.PodSandboxStatus, request, timeout=10)
    direct = rpc_error(ctrd.runtime.PodSandboxStatus, request, timeout=10)
    assert via_shim.code() == direct.code() == grpc.StatusCode.NOT_FOUND
    assert via_shim.details() == direct.details()
    assert "not found" in via_shim.details()
    # containerd answers at once: the relay must not turn that into INTERNAL now and then
    for _ in range(50):
        again = rpc_error(shim.runtime.PodSandboxStatus, request, timeout=10)
        assert (again.code(), again.details()) == (direct.code(), direct.details())


def test_deadline_reaches_containerd(shim: CrishimProcess, ctrd: ContainerdEnv) -> None:
    """RunPodSandbox takes containerd tens of ms here. With a deadline shorter than that the
    caller gets DEADLINE_EXCEEDED, and containerd, given the remaining deadline by crishim,
    abandons the sandbox half-way: had crishim dropped the deadline, the pod would come up.
    The deadline shrinks until one call reaches containerd and expires there. A call that
    expires before it reaches containerd, or that containerd finishes just inside its share
    of the deadline (the answer then arrives too late for the caller), is not the case under
    test: the sandbox it made is removed and a shorter deadline is tried. A machine fast
    enough to finish inside every deadline tried is reported, not passed."""
    for timeout in (0.05, 0.03, 0.02, 0.012, 0.008, 0.005):
        name = f"deadline-{uuid.uuid4().hex[:8]}"
        try:
            reply = shim.runtime.RunPodSandbox(
                api_pb2.RunPodSandboxRequest(config=sandbox_config(name, ctrd)),
                timeout=timeout)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
            time.sleep(0.2)  # containerd's log line may trail the caller's deadline
            if f"RunPodSandbox for &PodSandboxMetadata{{Name:{name}" not in ctrd.log_grep(name):
                continue  # expired before it reached containerd
            outcome = _sandbox_outcome(ctrd, name)
            if outcome is None:
                break  # containerd abandoned it: the case under test
            ctrd.stop_and_remove(outcome)  # finished just inside its share: shorter
            continue
        ctrd.stop_and_remove(reply.pod_sandbox_id)  # containerd was faster: shorter
    else:
        pytest.fail("containerd finished RunPodSandbox inside every deadline tried")
    assert "failed, error" in ctrd.log_grep(name), ctrd.log_grep(name)
    time.sleep(0.5)
    ready = [s for s in ctrd.list_sandboxes()
             if s.metadata.name == name and s.state == api_pb2.SANDBOX_READY]
    assert ready == []
    # and the connection is fine afterwards
    shim.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)


def _sandbox_outcome(ctrd: ContainerdEnv, name: str) -> str | None:
    """Wait for containerd to log how RunPodSandbox for `name` ended: the sandbox id it
    returned, or None when it failed (the test fails if neither is logged in 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = ctrd.log_grep(name)
        if "failed, error" in lines:
            return None
        made = re.search(r'returns sandbox id \\?"([0-9a-f]{64})', lines)
        if made:
            return made.group(1)
        time.sleep(0.05)
    pytest.fail(f"containerd logged no outcome for {name}: {ctrd.log_grep(name)}")


def test_get_container_events_answer_passes_through(shim: CrishimProcess,
                                                    ctrd: ContainerdEnv) -> None:
    """containerd 1.6 does not implement GetContainerEvents (1.7 added it): the streaming
    pass-through must hand back exactly its UNIMPLEMENTED. (Event relaying itself is
    pinned against an upstream of the test's own in test_cri_proxy.py.)"""
    via_shim = rpc_error(lambda: list(shim.runtime.GetContainerEvents(
        api_pb2.GetEventsRequest(), timeout=10)))
    direct = rpc_error(lambda: list(ctrd.runtime.GetContainerEvents(
        api_pb2.GetEventsRequest(), timeout=10)))
    assert via_shim.code() == direct.code()
    assert via_shim.details() == direct.details()


def _pb_len(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (for CRI messages crishim has no classes for:
    the proxy never decodes them, and neither does this test beyond the wire format)."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_exec_and_attach_return_containerds_own_url(shim: CrishimProcess, ctrd: ContainerdEnv
                                                    ) -> None:
    """A container is created and started through crishim with methods crishim has no
    message classes for (CreateContainer, StartContainer: raw bytes both ways); then
    Exec and Attach through crishim return containerd's own stream URLs."""
    config = sandbox_config("exec", ctrd)
    sandbox_id = shim.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config),
                                            timeout=60).pod_sandbox_id
    try:
        container_config = (_pb_len(1, _pb_len(1, b"sleeper"))  # metadata.name
                            + _pb_len(2, _pb_len(1, b"localhost/crishim/pause:test"))  # image
                            + _pb_len(11, b"sleeper.log"))  # log_path
        create = (_pb_len(1, sandbox_id.encode()) + _pb_len(2, container_config)
                  + _pb_len(3, config.SerializeToString()))
        answer = raw_call(shim.channel, RUNTIME + "CreateContainer", create, timeout=60)
        assert answer[:1] == b"\x0a" and answer[1] == len(answer) - 2  # field 1, one string
        container_id = answer[2:].decode()
        raw_call(shim.channel, RUNTIME + "StartContainer", _pb_len(1, container_id.encode()),
                 timeout=60)

        upstream_stream = urlsplit(ctrd.runtime.PortForward(
            api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id), timeout=10).url).netloc
        ours = urlsplit(shim.port_forward_url(sandbox_id)).netloc
        exec_url = shim.runtime.Exec(api_pb2.ExecRequest(
            container_id=container_id, cmd=["/pause"], stdout=True), timeout=10).url
        attach_url = shim.runtime.Attach(api_pb2.AttachRequest(
            container_id=container_id, stdout=True), timeout=10).url
        for url, kind in ((exec_url, "exec"), (attach_url, "attach")):
            parts = urlsplit(url)
            assert parts.netloc == upstream_stream != ours, (url, ours)
            assert parts.path.startswith(f"/{kind}/")

        # and an error from containerd comes back unchanged, not rewritten by crishim
        request = api_pb2.ExecRequest(container_id="no-such-container", cmd=["true"],
                                      stdout=True)
        via_shim = rpc_error(shim.runtime.Exec, request, timeout=10)
        direct = rpc_error(ctrd.runtime.Exec, request, timeout=10)
        assert (via_shim.code(), via_shim.details()) == (direct.code(), direct.details())
        assert via_shim.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ctrd.stop_and_remove(sandbox_id)  # removes the container with it


# ----------------------------------------------------------------------------- port-forward


def test_port_forward_url_is_crishims(shim: CrishimProcess, pod: tuple[str, str]) -> None:
    url = shim.port_forward_url(pod[0])
    assert "/portforward/" in url
    direct = api_pb2_grpc.RuntimeServiceStub(shim.channel)
    err = rpc_error(direct.PortForward, api_pb2.PortForwardRequest(pod_sandbox_id="nope"),
                    timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_port_forward_with_crishim_spdy_client(shim: CrishimProcess,
                                               pod: tuple[str, str]) -> None:
    payload = os.urandom(3 << 20)
    with SpdyPortForwardClient(shim.port_forward_url(pod[0])) as client:
        echo = client.roundtrip(ECHO_PORT, b"hello containerd pod")
        assert bytes(echo.received) == b"hello containerd pod"
        assert echo.error_text == "" and echo.data_fin

        sink = client.roundtrip(SINK_PORT, payload)
        assert sink.received.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"

        refused = client.roundtrip(CLOSED_PORT, b"x")
        assert refused.reset_status is not None and refused.error_text == ""
        # a refused port ends that connection only
        again = client.roundtrip(ECHO_PORT, b"still here")
        assert bytes(again.received) == b"still here"


def test_port_forward_with_kubectl_127(shim: CrishimProcess, pod: tuple[str, str]) -> None:
    if not os.access(KUBECTL_127, os.X_OK):
        missing(KUBECTL_127)
    sandbox_id, _ = pod
    payload = os.urandom(2 << 20)
    with KubeStandIn({"web": sandbox_id}, shim.port_forward_url) as standin:
        local = free_port()
        with run_kubectl_port_forward(KUBECTL_127, standin.server_url, "web",
                                      [f"{local}:{SINK_PORT}"]) as pf:
            with socket.create_connection(("127.0.0.1", pf.local_ports[SINK_PORT]),
                                          timeout=20) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                answer = peers.recv_line(conn)
            assert answer.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"
            assert pf.returncode is None, pf.output()
    assert standin.port_forward_calls == [(sandbox_id, [])]


def test_host_network_sandbox_is_dialled_from_the_host(shim: CrishimProcess,
                                                       ctrd: ContainerdEnv,
                                                       servers: NetnsServers) -> None:
    port = free_port()
    servers.serve(None, "127.0.0.1", port, "echo")
    sandbox_id = shim.runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=sandbox_config("hostnet", ctrd, host_network=True)),
        timeout=60).pod_sandbox_id
    try:
        with SpdyPortForwardClient(shim.port_forward_url(sandbox_id)) as client:
            fwd = client.roundtrip(port, b"on the host")
            assert bytes(fwd.received) == b"on the host"
    finally:
        ctrd.stop_and_remove(sandbox_id)


def test_stopped_sandbox_is_gone_and_other_sessions_carry_on(
        shim: CrishimProcess, ctrd: ContainerdEnv, pod: tuple[str, str],
        servers: NetnsServers) -> None:
    doomed = shim.runtime.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=sandbox_config("doomed", ctrd)), timeout=60
    ).pod_sandbox_id
    try:
        servers.serve(ctrd.netns_path(doomed), "127.0.0.1", ECHO_PORT, "echo")
        with SpdyPortForwardClient(shim.port_forward_url(doomed)) as old_session, \
                SpdyPortForwardClient(shim.port_forward_url(pod[0])) as other:
            assert bytes(old_session.roundtrip(ECHO_PORT, b"alive").received) == b"alive"
            shim.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=doomed),
                                        timeout=60)
            # at once (well within the plugin's cache lifetime): no new URL for it
            err = rpc_error(shim.runtime.PortForward,
                            api_pb2.PortForwardRequest(pod_sandbox_id=doomed), timeout=10)
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert doomed in err.details()

            # the live session learns it in words: a fatal condition, not a quiet reset
            # (the echo server's socket still holds the netns; crishim must not use it)
            fwd = old_session.roundtrip(ECHO_PORT, b"anyone?")
            assert fwd.received == b""
            assert "no longer exists" in fwd.error_text or "gone" in fwd.error_text, \
                fwd.error_text

            assert bytes(other.roundtrip(ECHO_PORT, b"unharmed").received) == b"unharmed"
    finally:
        ctrd.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=doomed),
                                      timeout=60)


def test_crishim_plugins_lists_containerd() -> None:
    out = subprocess.run([sys.executable, "-m", "crishim", "plugins"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("containerd "))
    assert "crishim_containerd:factory" in line and "PodSandboxStatus" in line


# ----------------------------------------------------------------------------- the plugin


def _plugin(ctrd: ContainerdEnv | None = None, **settings):
    from crishim_containerd import ContainerdRuntime

    upstream = str(ctrd.socket) if ctrd is not None else ""
    return ContainerdRuntime(Config(upstream_endpoint=upstream, **settings))


def test_plugin_resolves_netns_pod_ip_and_unknown_ids(ctrd: ContainerdEnv,
                                                      pod: tuple[str, str]) -> None:
    sandbox_id, netns = pod

    async def go() -> None:
        plugin = _plugin(ctrd)
        try:
            sandbox = await plugin.resolve(sandbox_id)
            assert sandbox == Sandbox(sandbox_id, netns_path=netns, pod_ip="127.0.0.1")
            with pytest.raises(SandboxNotFound):
                await plugin.resolve("no-such-sandbox")
            sock = await plugin.dial(sandbox, ECHO_PORT)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"direct")
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 10) == b"direct"
            sock.close()
        finally:
            await plugin.close()

    asyncio.run(go())


def test_plugin_cache_never_serves_a_stopped_sandbox(ctrd: ContainerdEnv) -> None:
    sandbox_id = ctrd.run_pod_sandbox("cached")

    async def go() -> None:
        plugin = _plugin(ctrd)
        plugin.upstream.cache_ttl = 3600.0  # only liveness may evict it
        try:
            first = await plugin.resolve(sandbox_id)
            assert await plugin.resolve(sandbox_id) is first  # served from the cache
            ctrd.runtime.StopPodSandbox(
                api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=60)
            with pytest.raises(SandboxGone):
                await plugin.resolve(sandbox_id)
            with pytest.raises(SandboxGone):
                await plugin.dial(first, ECHO_PORT)
        finally:
            await plugin.close()

    try:
        asyncio.run(go())
    finally:
        ctrd.stop_and_remove(sandbox_id)


def test_plugin_delegates_mapped_ids_to_named_netns(ctrd: ContainerdEnv, podnet) -> None:
    async def go() -> None:
        plugin = _plugin(ctrd, sandboxes={"lab": podnet.path, "hostlab": "host"})
        try:
            assert await plugin.resolve("lab") == Sandbox("lab", netns_path=podnet.path)
            assert (await plugin.resolve("hostlab")).host_network
        finally:
            await plugin.close()

    asyncio.run(go())


def test_plugin_without_upstream_says_what_is_missing() -> None:
    async def go() -> None:
        plugin = _plugin(None)
        with pytest.raises(SandboxNotFound, match="upstream_endpoint"):
            await plugin.resolve("abc")

    asyncio.run(go())


@pytest.fixture
def pod_ip_netns() -> Iterator[str]:
    """A netns of the test's own whose only non-loopback address is 192.0.2.10 (TEST-NET-1)
    on a veth whose both ends stay inside it."""
    from pyroute2 import NetNS

    name = f"crishim-podip-{os.getpid()}"
    delete_named_netns(name)
    path = create_named_netns(name)
    try:
        with NetNS(name) as ns:
            ns.link("add", ifname="pod0", kind="veth", peer="pod1")
            index = ns.link_lookup(ifname="pod0")[0]
            ns.addr("add", index=index, address="192.0.2.10", prefixlen=24)
            for ifname in ("pod0", "pod1"):
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
        yield path
    finally:
        delete_named_netns(name)


def test_pod_ip_fallback_reaches_a_server_not_on_localhost(pod_ip_netns: str,
                                                           servers: NetnsServers) -> None:
    servers.serve(pod_ip_netns, "192.0.2.10", ECHO_PORT, "echo")
    sandbox = Sandbox("podip", netns_path=pod_ip_netns, pod_ip="192.0.2.10")

    async def go() -> None:
        off = _plugin(None)
        with pytest.raises(DialFailed, match="127.0.0.1"):
            await off.dial(sandbox, ECHO_PORT)
        on = _plugin(None, pod_ip_fallback=True)
        sock = await on.dial(sandbox, ECHO_PORT)
        try:
            assert sock.getpeername() == ("192.0.2.10", ECHO_PORT)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, b"via pod ip")
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 10) == b"via pod ip"
        finally:
            sock.close()

    asyncio.run(go())


def test_sandbox_from_status_reads_containerd_fields() -> None:
    from crishim.sandboxes import sandbox_from_status

    def response(info: str, state=api_pb2.SANDBOX_READY, network=api_pb2.POD, ip="10.1.2.3"):
        r = api_pb2.PodSandboxStatusResponse(info={"info": info} if info else {})
        r.status.state = state
        r.status.network.ip = ip
        r.status.linux.namespaces.options.network = network
        return r

    spec = ('{"pid": 42, "runtimeSpec": {"linux": {"namespaces": [{"type": "pid"}, '
            '{"type": "network", "path": "/run/netns/cni-1"}]}}}')
    assert sandbox_from_status("a", response(spec)) == (
        Sandbox("a", netns_path="/run/netns/cni-1", pod_ip="10.1.2.3"), "/run/netns/cni-1")
    assert sandbox_from_status("a", response('{"pid": 42}'))[0].netns_path == "/proc/42/ns/net"
    host = sandbox_from_status("a", response('{"pid": 42}', network=api_pb2.NODE))[0]
    assert host.host_network and not host.netns_path
    with pytest.raises(SandboxGone, match="closed"):
        sandbox_from_status("a", response('{"pid": 42, "netNamespaceClosed": true}'))
    with pytest.raises(SandboxGone, match="not ready"):
        sandbox_from_status("a", response(spec, state=api_pb2.SANDBOX_NOTREADY))
    with pytest.raises(SandboxGone):
        sandbox_from_status("a", response("not json"))
    # an upstream's answer of another shape is no path, not an exception of ours
    for odd in ('{"pid": 42, "runtimeSpec": {"linux": []}}',
                '{"pid": 42, "runtimeSpec": {"linux": {"namespaces": {"type": "network"}}}}',
                '{"pid": 42, "runtimeSpec": {"linux": {"namespaces": '
                '[{"type": "network", "path": ["x"]}]}}}'):
        assert sandbox_from_status("a", response(odd))[0].netns_path == "/proc/42/ns/net"
    # a path with a NUL made stat() raise ValueError (UNKNOWN and a grpc traceback per
    # PortForward); a relative one would be read in crishim's working directory
    for path, words in (("/run/netns/a\\u0000b", "contains a NUL byte"),
                        ("netns/cni-1", "is not an absolute path")):
        odd = ('{"pid": 42, "runtimeSpec": {"linux": {"namespaces": '
               f'[{{"type": "network", "path": "{path}"}}]}}}}}}')
        with pytest.raises(SandboxGone, match=words):
            sandbox_from_status("a", response(odd))
    # a pod IP that is no IP address is none: the fallback dialled it (TypeError per
    # connection for a NUL)
    for ip in ("a\0b", "pod.example"):
        assert sandbox_from_status("a", response(spec, ip=ip))[0].pod_ip == ""
    with pytest.raises(SandboxGone):  # nested too deep to read: as no answer at all
        sandbox_from_status("a", response('{"pid": 42, "runtimeSpec": '
                                          + "[" * 100_000 + "]" * 100_000 + "}"))


# ----------------------------------------------------------------------------- containerd's own


def test_crishim_channel_client_asks_containerd_for_no_session_ahead(
        ctrd: ContainerdEnv, pod: tuple[str, str]) -> None:
    """containerd's own stream server does not say how it dials (no Crishim-Dial in its
    101): crishim port-forward's channel connections fetch only the next URL ahead, never
    open a session that containerd would dial at once."""
    from crishim.client.cri import CriClient
    from crishim.client.portforward import cri_opener

    async def main() -> None:
        cri = CriClient(ctrd.endpoint)
        opener = cri_opener(cri, pod[0])
        try:
            for payload in (b"one", b"two"):
                session = await opener("websocket", [ECHO_PORT], 0)
                assert session.dial == ""
                reader, writer = await session.open_stream(ECHO_PORT)
                writer.write(payload)
                assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
                session.close()
                assert not opener.opens_ahead
                deadline = time.monotonic() + 5
                while not any(f.done() for _, f in opener._spares.values()):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                _, spare = opener._spares[(ECHO_PORT,)]
                assert isinstance(spare.result(), str)  # a URL, not a session
        finally:
            opener.close()
            cri.close()

    asyncio.run(main())


def test_containerd_own_stream_server_behaviour(ctrd: ContainerdEnv,
                                                pod: tuple[str, str]) -> None:
    """What containerd 1.6's own stream server does with the same client (a baseline; the
    observations are printed for the notes)."""
    sandbox_id, _ = pod
    url = ctrd.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id),
                                   timeout=10).url
    with SpdyPortForwardClient(url) as client:
        t0 = time.monotonic()
        echo = client.roundtrip(ECHO_PORT, b"hello")
        echo_time = time.monotonic() - t0
        refused = client.roundtrip(CLOSED_PORT, b"x")
        print(f"containerd echo: {bytes(echo.received)!r} fin={echo.data_fin} "
              f"reset={echo.reset_status} error={echo.error_text!r} ({echo_time:.2f}s)")
        print(f"containerd refused port: data={bytes(refused.received)!r} "
              f"fin={refused.data_fin} reset={refused.reset_status} "
              f"error={refused.error_text!r} session_closed={client.closed}")
        assert bytes(echo.received) == b"hello"
        # containerd writes the refusal as text: client-go would end the whole session
        assert str(CLOSED_PORT) in refused.error_text
    # containerd does not pass the client's half-close on to the pod: the sink, which
    # answers at EOF, never sees one; containerd closes both ways 1 s after the FIN
    url = ctrd.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=sandbox_id),
                                   timeout=10).url
    with SpdyPortForwardClient(url) as client:
        sink = client.roundtrip(SINK_PORT, b"count me")
        print(f"containerd sink after half-close: {bytes(sink.received)!r} "
              f"fin={sink.data_fin} error={sink.error_text!r}")
        assert sink.received == b"" and sink.data_fin


# ----------------------------------------------------------------------------- crishim's client


class CrishimPortForward:
    """`crishim port-forward SANDBOX 0:PORT... --runtime-endpoint SOCK` as a subprocess."""

    def __init__(self, endpoint: str, sandbox_id: str, ports: list[int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crishim", "port-forward", sandbox_id,
             *[f"0:{p}" for p in ports], "--runtime-endpoint", endpoint,
             "--address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.local: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while set(self.local) != set(ports):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.output()
            time.sleep(0.05)

    def _read(self) -> None:
        import re

        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            if m:
                self.local[int(m.group(2))] = int(m.group(1))

    def output(self) -> str:
        return "".join(self.lines)

    def sink(self, port: int, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.local[port]), timeout=20) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            for _ in range(10_000):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return answer

    def echo(self, port: int, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.local[port]), timeout=20) as conn:
            conn.sendall(payload)
            answer = b""
            for _ in range(10_000):
                if len(answer) >= len(payload):
                    break
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return answer

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(10)
        self._reader.join(5)
        return code


def _sink_answer(payload: bytes) -> bytes:
    return f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_crishim_client_through_crishim_survives_a_refused_port(
        shim: CrishimProcess, pod: tuple[str, str]) -> None:
    payload = os.urandom(1 << 20)
    pf = CrishimPortForward("unix://" + shim.socket, pod[0], [SINK_PORT, CLOSED_PORT])
    try:
        assert pf.sink(SINK_PORT, payload) == _sink_answer(payload)
        try:  # refused: that connection only ends (a reset if "x" was still unread, as kubectl)
            assert pf.sink(CLOSED_PORT, b"x") == b""
        except OSError as e:  # the reset, seen by the read or already by our shutdown
            assert e.errno in (errno.ECONNRESET, errno.ENOTCONN), e
        time.sleep(0.3)
        assert pf.proc.poll() is None, pf.output()
        assert pf.sink(SINK_PORT, payload) == _sink_answer(payload)
    finally:
        pf.close()


def test_crishim_client_against_containerd_own_stream_server(
        ctrd: ContainerdEnv, pod: tuple[str, str]) -> None:
    """Baseline: containerd 1.6 writes a refused port as text on the error stream, which
    (as with client-go) ends the user's whole port-forward session."""
    payload = os.urandom(256 << 10)
    pf = CrishimPortForward(ctrd.endpoint, pod[0], [ECHO_PORT, CLOSED_PORT])
    try:
        assert pf.echo(ECHO_PORT, payload) == payload
        pf.sink(CLOSED_PORT, b"x")
        code = pf.proc.wait(20)
    finally:
        pf.close()
    print("crishim port-forward against containerd, refused port:\n" + pf.output())
    assert code == 1
    assert "connection refused" in pf.output()


def _udp_exchange(port: int, payload: bytes) -> bytes:
    from tests.support.udp_peers import exchange

    return exchange(port, [payload])[0]


def _udp_port_forward(endpoint: str, sandbox_id: str, *specs: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "crishim", "port-forward", sandbox_id, *specs,
         "--runtime-endpoint", endpoint, "--address", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_udp_against_containerd_own_stream_server_is_one_line_and_tcp_works(
        ctrd: ContainerdEnv, pod: tuple[str, str]) -> None:
    """containerd's stream server picks portforward.k8s.io: the /udp spec is refused at
    once with one line, never sent as a stream it would dial as TCP; TCP carries on."""
    udp_local, tcp_local = free_port(), free_port()
    proc = _udp_port_forward(ctrd.endpoint, pod[0], f"{udp_local}:53/udp",
                             f"{tcp_local}:{ECHO_PORT}")
    try:
        assert proc.stdout.readline().startswith(
            f"Forwarding from 127.0.0.1:{tcp_local} -> {ECHO_PORT}")
        with socket.create_connection(("127.0.0.1", tcp_local), timeout=20) as conn:
            conn.sendall(b"tcp through containerd")
            assert conn.recv(100) == b"tcp through containerd"
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
    stderr = proc.stderr.read().splitlines()
    assert len(stderr) == 1, stderr
    assert stderr[0].startswith("error: the container runtime does not support UDP "
                                "port-forward (its stream server negotiated "
                                "portforward.k8s.io")
    assert stderr[0].endswith("not forwarding 53/udp")


def test_udp_through_crishim_in_front_of_containerd(shim: CrishimProcess, pod: tuple[str, str],
                                                    servers: NetnsServers) -> None:
    """The containerd plugin enters the pod's netns in process: UDP flows work there."""
    port = servers.udp_echo(pod[1])
    local = free_port()
    proc = _udp_port_forward(shim.socket, pod[0], f"{local}:{port}/udp")
    try:
        assert proc.stdout.readline().strip() == f"Forwarding from 127.0.0.1:{local} -> " \
                                                 f"{port}/udp"
        payload = os.urandom(1472)
        assert _udp_exchange(local, payload) == payload
    finally:
        proc.terminate()
        proc.wait(20)


# ----------------------------------------------------------------------------- crishim check


def _check(endpoint: str, sandbox_id: str, *args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "crishim", "check", "--runtime-endpoint", endpoint,
                        "--sandbox", sandbox_id, "--json", *args],
                       capture_output=True, text=True, timeout=240)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, {c["name"]: c for c in json.loads(r.stdout)["checks"]}


def test_check_finds_containerds_streaming_shortcomings(ctrd: ContainerdEnv) -> None:
    """`crishim check` straight at containerd 1.6: it finds the netns itself (verbose
    PodSandboxStatus), moves bytes intact, and reports what docs/protocol.md §6 says containerd
    does: the half-close never reaches the pod, and a refused port or a reset comes back
    as error text, which makes client-go end the whole session."""
    sandbox_id = ctrd.run_pod_sandbox(f"check-{uuid.uuid4().hex[:6]}")
    try:
        code, checks = _check(ctrd.endpoint, sandbox_id)
    finally:
        ctrd.stop_and_remove(sandbox_id)
    assert code == 1  # half-close is a required check
    for name in ("cri-url", "token-single-use", "handshake:spdy", "echo-sha256",
                 "upload-sha256", "download-sha256", "concurrent"):
        assert checks[name]["result"] == "pass", checks[name]
    assert "8 chars" in checks["cri-url"]["detail"]  # the reference library's short tokens
    # a used token is refused 404 on both transports containerd speaks; single use is not
    # tried on those it does not (SPDY over WebSocket: 403 for any token; HTTP/2)
    assert checks["token-single-use"]["detail"] == "spdy: second use refused with 404"
    assert checks["token-single-use:websocket"]["result"] == "pass"
    assert checks["token-single-use:websocket"]["detail"] == \
        "websocket: second use refused with 404"
    for t in ("spdy-over-websocket", "h2"):
        assert checks[f"token-single-use:{t}"]["result"] == "skip", checks
        assert checks[f"token-single-use:{t}"]["required"] is False
    assert checks["half-close"]["result"] == "fail"
    assert "answer to the FIN (an EOF mark) never came back" in checks["half-close"]["detail"]
    for name in ("closed-port", "pod-reset"):
        assert checks[name]["result"] == "warn", checks[name]
        assert "error text" in checks[name]["detail"]
    # transports containerd does not speak are warnings, refused (SPDY over WebSocket) or
    # not (HTTP/2: it closes on the preface, which was an optional FAIL)
    for name in ("handshake:spdy-over-websocket", "handshake:h2"):
        assert checks[name]["result"] == "warn", checks[name]
    assert checks["udp-echo"]["result"] == "skip"  # optional: not a failure of containerd
    assert "negotiated portforward.k8s.io" in checks["udp-echo"]["detail"]


def test_check_passes_against_crishim_in_front_of_containerd(shim: CrishimProcess,
                                                             pod: tuple[str, str]) -> None:
    sandbox_id, _ = pod
    for transport in ("spdy", "h2"):
        code, checks = _check("unix://" + shim.socket, sandbox_id, "--transport", transport)
        assert code == 0, checks
        assert checks["half-close"]["result"] == "pass"
        assert checks["closed-port"]["result"] == "pass", checks["closed-port"]
        assert "22 chars" in checks["cri-url"]["detail"]


def test_port_forward_through_the_helper_plugin_to_a_containerd_pod(
        ctrd: ContainerdEnv, pod: tuple[str, str], tmp_path) -> None:
    """The helper plugin with an upstream: sandboxes found through containerd's
    PodSandboxStatus, connections dialled by `crishim helper` and passed back by fd."""
    from tests.support.helper_proc import HelperProcess

    sandbox_id, _ = pod
    helper = HelperProcess(str(tmp_path / "helper.sock")).start()
    try:
        with CrishimProcess("--runtime", "helper", "--upstream-endpoint", str(ctrd.socket),
                            "--helper-socket", helper.socket) as proc, \
                KubeStandIn({"web": sandbox_id}, proc.port_forward_url) as standin, \
                run_kubectl_port_forward(KUBECTL_127, standin.server_url, "web",
                                         [f"0:{ECHO_PORT}"]) as pf:
            payload = os.urandom(1 << 20)
            with socket.create_connection(("127.0.0.1", pf.local_ports[ECHO_PORT]),
                                          timeout=20) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    got += chunk
            assert got == payload
            assert "dial" in helper.log()
            with pytest.raises(grpc.RpcError) as e:
                proc.port_forward_url("no-such-sandbox")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # containerd's answer
    finally:
        helper.cleanup()
