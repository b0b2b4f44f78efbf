"""The drop-in CRI proxy, pinned against an upstream runtime of the test's own.

containerd 1.6 cannot show everything (it has no GetContainerEvents, sends no custom
metadata), so a real gRPC server on a real unix socket stands upstream here and
records what reaches it; a real `crishim serve --upstream-endpoint` sits in between.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from crishim.cri import api_pb2, api_pb2_grpc
from tests.support.crishim_proc import CrishimProcess

RUNTIME = "runtime.v1.RuntimeService"


class RecordingUpstream:
    """A CRI upstream that records each call's metadata and deadline.

    - Status: echoes every x-test-* metadata key back as trailing metadata (x-echo-*),
      sends initial metadata x-upstream: hello, answers info["remaining"] = seconds left.
    - ListImages: fails with FAILED_PRECONDITION, a message and trailing metadata.
    - ImageFsInfo: waits up to 10 s for the call to end (a slow method for deadlines), or
      answers after x-test-sleep seconds where that is given.
    - GetContainerEvents: streams one event per 50 ms until the client goes away.
    - PodSandboxStatus: for sandbox "garbled", bytes that are no PodSandboxStatusResponse;
      for any other, UNIMPLEMENTED.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[tuple[str, dict[str, str | bytes], float | None]] = []
        self.ended: dict[str, threading.Event] = {
            m: threading.Event() for m in ("ImageFsInfo", "GetContainerEvents")}
        self.events_sent = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self,))
        self.server.add_insecure_port("unix://" + path)
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails):
        name = details.method.rsplit("/", 1)[-1]
        unary = {
            "Version": (self._version, api_pb2.VersionRequest),
            "Status": (self._status, api_pb2.StatusRequest),
            "ListImages": (self._list_images, api_pb2.ListImagesRequest),
            "ImageFsInfo": (self._slow, api_pb2.ImageFsInfoRequest),
        }
        if name in unary:
            fn, request_type = unary[name]
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_type.FromString,
                response_serializer=lambda m: m.SerializeToString())
        if name == "PodSandboxStatus":
            return grpc.unary_unary_rpc_method_handler(
                self._garbled_status,
                request_deserializer=api_pb2.PodSandboxStatusRequest.FromString,
                response_serializer=lambda raw: raw)
        if name == "GetContainerEvents":
            return grpc.unary_stream_rpc_method_handler(
                self._events, request_deserializer=api_pb2.GetEventsRequest.FromString,
                response_serializer=lambda m: m.SerializeToString())
        return None

    def _record(self, name: str, context: grpc.ServicerContext) -> dict[str, str | bytes]:
        metadata = dict(context.invocation_metadata())
        self.calls.append((name, metadata, context.time_remaining()))
        return metadata

    def _version(self, request, context):
        self._record("Version", context)
        return api_pb2.VersionResponse(version="0.1.0", runtime_name="recording-upstream",
                                       runtime_version="9.9.9", runtime_api_version="v1")

    def _status(self, request, context):
        metadata = self._record("Status", context)
        context.send_initial_metadata((("x-upstream", "hello"),))
        context.set_trailing_metadata(tuple(
            ("x-echo-" + k[len("x-test-"):], v) for k, v in metadata.items()
            if k.startswith("x-test-")))
        remaining = context.time_remaining()
        return api_pb2.StatusResponse(info={"remaining": repr(remaining)})

    def _list_images(self, request, context):
        self._record("ListImages", context)
        context.set_trailing_metadata((("x-why", "upstream reasons"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "upstream says no: ünïcode too")

    def _garbled_status(self, request, context):
        self._record("PodSandboxStatus", context)
        if request.pod_sandbox_id.startswith("answer-"):  # answer-<code>: fail with it
            code = grpc.StatusCode[request.pod_sandbox_id[len("answer-"):]]
            context.abort(code, f"upstream answers {code.name}")
        if request.pod_sandbox_id != "garbled":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no PodSandboxStatus here")
        return b"\x0a\x05abc"  # field 1 (status) says 5 bytes follow; 3 do

    def _slow(self, request, context):
        metadata = self._record("ImageFsInfo", context)
        context.add_callback(self.ended["ImageFsInfo"].set)
        deadline = time.monotonic() + float(metadata.get("x-test-sleep", 10))
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return api_pb2.ImageFsInfoResponse()

    def _events(self, request, context):
        self._record("GetContainerEvents", context)
        context.add_callback(self.ended["GetContainerEvents"].set)
        for i in range(600):  # at most 30 s
            if not context.is_active():
                return
            self.events_sent += 1
            yield api_pb2.ContainerEventResponse(container_id=f"c{i}", created_at=i)
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    directory = tempfile.mkdtemp(prefix="crishim-upstream-")
    server = RecordingUpstream(os.path.join(directory, "upstream.sock"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(upstream: RecordingUpstream) -> Iterator[CrishimProcess]:
    with CrishimProcess("--upstream-endpoint", upstream.path) as proc:
        yield proc


def test_metadata_passes_both_ways(proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    call = proxy.runtime.Status.with_call(
        api_pb2.StatusRequest(), timeout=10,
        metadata=(("x-test-plain", "one"), ("x-test-blob-bin", b"\x00\xffbytes")))
    response, state = call
    trailing = dict(state.trailing_metadata())
    assert trailing["x-echo-plain"] == "one"
    assert trailing["x-echo-blob-bin"] == b"\x00\xffbytes"
    assert dict(state.initial_metadata())["x-upstream"] == "hello"
    name, seen, _ = upstream.calls[-1]
    assert name == "Status" and seen["x-test-plain"] == "one"
    assert float(response.info["remaining"]) <= 11


def test_deadline_reaches_the_upstream(proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    # gRPC rounds a deadline up a little (two significant digits) at each hop
    response = proxy.runtime.Status(api_pb2.StatusRequest(), timeout=7)
    remaining = float(response.info["remaining"])
    assert 6 < remaining < 7.5
    # no deadline: no grpc-timeout upstream either (its largest value is ~3.6e11 s; a
    # Python server reports a call without one as ~9.2e18 s)
    no_deadline = proxy.runtime.Status(api_pb2.StatusRequest())
    assert float(no_deadline.info["remaining"]) > 1e15


def test_slow_upstream_call_ends_with_the_deadline(proxy: CrishimProcess,
                                                   upstream: RecordingUpstream) -> None:
    upstream.ended["ImageFsInfo"].clear()
    images = api_pb2_grpc.ImageServiceStub(proxy.channel)
    with pytest.raises(grpc.RpcError) as info:
        images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the upstream's own call ended with the deadline, not after its 10 s
    assert upstream.ended["ImageFsInfo"].wait(3)
    assert upstream.calls[-1][2] is not None and upstream.calls[-1][2] < 0.6


def test_error_status_details_and_trailers_pass_through(proxy: CrishimProcess) -> None:
    images = api_pb2_grpc.ImageServiceStub(proxy.channel)
    with pytest.raises(grpc.RpcError) as info:
        images.ListImages(api_pb2.ListImagesRequest(), timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "upstream says no: ünïcode too"
    assert dict(err.trailing_metadata())["x-why"] == "upstream reasons"


def test_server_streaming_relays_events_and_cancel_reaches_upstream(
        proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    upstream.ended["GetContainerEvents"].clear()
    stream = proxy.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=30)
    received = []
    for event in stream:
        received.append(event.container_id)
        if len(received) == 3:
            break
    assert received == ["c0", "c1", "c2"]
    sent_before = upstream.events_sent
    stream.cancel()
    # the upstream's stream ends within a few of its 50 ms ticks, not at its 30 s limit
    assert upstream.ended["GetContainerEvents"].wait(5)
    time.sleep(0.3)
    assert upstream.events_sent - sent_before < 20
    # the proxy still serves
    proxy.runtime.Status(api_pb2.StatusRequest(), timeout=10)


def _slow_call_upstream(proc: CrishimProcess, upstream: RecordingUpstream,
                        seconds: int) -> grpc.Future:
    """An ImageFsInfo the upstream answers after `seconds`, once it reached the upstream."""
    image_fs_info = proc.channel.unary_unary(
        "/runtime.v1.ImageService/ImageFsInfo",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=api_pb2.ImageFsInfoResponse.FromString)
    future = image_fs_info.future(api_pb2.ImageFsInfoRequest(), timeout=30,
                                  metadata=(("x-test-sleep", str(seconds)),))
    deadline = time.monotonic() + 10
    while not any(name == "ImageFsInfo" and meta.get("x-test-sleep") == str(seconds)
                  for name, meta, _ in upstream.calls):
        assert time.monotonic() < deadline, "the slow call never reached the upstream"
        time.sleep(0.01)
    return future


def test_a_stop_lets_calls_in_progress_finish_and_ends_event_streams(
        upstream: RecordingUpstream) -> None:
    """SIGTERM: a unary call in progress gets the rest of drain_timeout (it was cancelled
    1 s after the stream drain, which is at once with no session), and an event stream
    ends with UNAVAILABLE at once (it would hold that time to its end)."""
    with CrishimProcess("--upstream-endpoint", upstream.path, "--drain-timeout", "20s") as p:
        events = p.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=60)
        assert next(events).container_id == "c0"
        future = _slow_call_upstream(p, upstream, 3)
        p.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in events:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "crishim is stopping"
        assert not future.done()  # the slow call goes on after the stream ended
        assert isinstance(future.result(timeout=30), api_pb2.ImageFsInfoResponse)
        assert p.proc.wait(30) == 0
    assert "crishim stopped" in p.log()


def test_a_second_signal_cuts_the_calls_in_progress_short(upstream: RecordingUpstream
                                                           ) -> None:
    """SIGTERM, then Ctrl-C while a CRI call still has the drain's time: the call gets
    1 s, as live sessions do (the second signal went unseen once the CRI stop began, and
    the call ran its 8 s)."""
    with CrishimProcess("--upstream-endpoint", upstream.path, "--drain-timeout", "20s") as p:
        future = _slow_call_upstream(p, upstream, 8)
        p.proc.send_signal(signal.SIGTERM)
        assert "draining" in _wait_for_line(p, "signal received: draining")
        p.proc.send_signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as cut:
            future.result(timeout=30)
        assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert p.proc.wait(30) == 0
    assert "received again" in p.log()


def _wait_for_line(proc: CrishimProcess, text: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        line = next((line for line in proc.log().splitlines() if text in line), None)
        if line is not None:
            return line
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.02)


def test_unimplemented_upstream_method_is_the_upstreams_answer_every_time(
        proxy: CrishimProcess) -> None:
    """An upstream that ends a call at once must not race the proxy's request write
    (a stream-stream relay got INTERNAL "Internal error from Core" ~9 times in 10)."""
    answers = set()
    for _ in range(100):
        with pytest.raises(grpc.RpcError) as info:
            proxy.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        answers.add((info.value.code(), info.value.details()))
    assert answers == {(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")}


def test_version_is_the_upstreams_by_default(proxy: CrishimProcess,
                                            upstream: RecordingUpstream) -> None:
    """A drop-in: the kubelet reports the real runtime, not crishim://."""
    before = len(upstream.calls)
    answer = proxy.runtime.Version(api_pb2.VersionRequest(version="0.1.0"), timeout=10)
    assert (answer.runtime_name, answer.runtime_version) == ("recording-upstream", "9.9.9")
    assert [name for name, _, _ in upstream.calls[before:]] == ["Version"]


def test_port_forward_resolves_through_the_upstream_by_default(
        proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    """No runtime chosen: the containerd plugin asks the upstream (here it cannot answer
    PodSandboxStatus), not the netns plugin's NOT_FOUND for every sandbox."""
    with pytest.raises(grpc.RpcError) as info:
        proxy.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="x"), timeout=10)
    assert info.value.code() != grpc.StatusCode.NOT_FOUND
    assert "runtime plugin containerd: upstream_endpoint is set" in proxy.log()


@pytest.mark.parametrize("upstream_code, answer", [
    ("PERMISSION_DENIED", "PERMISSION_DENIED"), ("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    ("UNAUTHENTICATED", "UNAUTHENTICATED"), ("FAILED_PRECONDITION", "FAILED_PRECONDITION"),
    ("UNAVAILABLE", "UNAVAILABLE"), ("DEADLINE_EXCEEDED", "UNAVAILABLE"),
    ("RESOURCE_EXHAUSTED", "UNAVAILABLE"), ("INTERNAL", "UNKNOWN"),
    ("UNIMPLEMENTED", "UNKNOWN")])
def test_port_forward_answers_with_the_upstreams_verdict_on_the_sandbox(
        proxy: CrishimProcess, upstream_code: str, answer: str) -> None:
    """The upstream's verdict on the request reaches the kubelet as it is; what may pass is
    UNAVAILABLE (try later); the rest UNKNOWN, never UNIMPLEMENTED (that would say crishim
    has no PortForward). Every one of them was UNAVAILABLE."""
    with pytest.raises(grpc.RpcError) as info:
        proxy.runtime.PortForward(api_pb2.PortForwardRequest(
            pod_sandbox_id=f"answer-{upstream_code}", port=[80]), timeout=10)
    assert info.value.code() == grpc.StatusCode[answer], info.value
    assert info.value.details().endswith(f"{upstream_code}: upstream answers {upstream_code}")


def test_an_upstream_status_answer_that_does_not_parse_fails_that_call_only(
        proxy: CrishimProcess) -> None:
    """grpc.aio hands over None for an answer it cannot parse: that is an upstream that
    cannot answer (UNAVAILABLE, said once), not an AttributeError in the handler."""
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            proxy.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="garbled"),
                                      timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "not a PodSandboxStatusResponse" in info.value.details()
    assert proxy.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name
    assert "Traceback" not in proxy.log()
    assert "AttributeError" not in proxy.log()


def test_explicit_runtime_and_upstream_version_off_stay_crishims(
        upstream: RecordingUpstream) -> None:
    with CrishimProcess("--upstream-endpoint", upstream.path, "--runtime", "netns",
                        "--no-upstream-version") as proc:
        before = len(upstream.calls)
        answer = proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)
        assert (answer.runtime_name, answer.runtime_api_version) == ("crishim", "v1")
        # runtime.v1alpha2's too, as its PortForward (it was the upstream's)
        alpha = proc.channel.unary_unary(
            "/runtime.v1alpha2.RuntimeService/Version",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=api_pb2.VersionResponse.FromString)(
                api_pb2.VersionRequest(), timeout=10)
        assert (alpha.runtime_name, alpha.runtime_api_version) == ("crishim", "v1alpha2")
        with pytest.raises(grpc.RpcError) as info:
            proc.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="x"),
                                     timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # netns: no such netns
        assert len(upstream.calls) == before
        assert "runtime plugin netns: set by runtime" in proc.log()


def test_non_cri_method_is_not_forwarded(proxy: CrishimProcess,
                                         upstream: RecordingUpstream) -> None:
    before = len(upstream.calls)
    with pytest.raises(grpc.RpcError) as info:
        proxy.channel.unary_unary("/other.Service/Status")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(upstream.calls) == before


def test_unreachable_upstream_is_unavailable() -> None:
    missing = os.path.join(tempfile.mkdtemp(prefix="crishim-upstream-"), "nobody.sock")
    with CrishimProcess("--upstream-endpoint", missing) as proc:
        runtime = proc.runtime
        for call, request in ((runtime.Status, api_pb2.StatusRequest()),
                              (runtime.Version, api_pb2.VersionRequest())):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with CrishimProcess("--upstream-endpoint", missing, "--no-upstream-version") as proc:
        assert proc.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == \
            "crishim"


def test_a_call_is_passed_on_without_waiting_for_the_clients_half_close(
        proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    """CRI methods take one request: it goes upstream as soon as it is in, as containerd
    answers without the client's half-close (waiting for it, a call that never sent it
    was never answered and held its slot), and what the client sends after it is never
    read (two 9 MiB messages more were held, up to 16 MiB a call)."""
    hold = threading.Event()

    def requests() -> Iterator[bytes]:
        yield api_pb2.StatusRequest(verbose=True).SerializeToString()
        yield b"\x00" * (9 << 20)
        yield b"\x00" * (9 << 20)
        hold.wait(15)  # the call stays open: no half-close

    status = proxy.channel.stream_stream(f"/{RUNTIME}/Status")
    calls = len(upstream.calls)
    try:
        answers = list(status(requests(), timeout=10))
    finally:
        hold.set()
    assert [api_pb2.StatusResponse.FromString(a).info.get("remaining") is not None
            for a in answers] == [True]
    assert [name for name, _, _ in upstream.calls[calls:]] == ["Status"]
    proxy.runtime.Status(api_pb2.StatusRequest(), timeout=10)  # still serving


def test_calls_in_progress_are_bounded_per_connection_and_in_all(
        upstream: RecordingUpstream) -> None:
    """--max-cri-calls 8: one connection holds at most 2 calls (a quarter), every
    connection together 8; past that a call gets RESOURCE_EXHAUSTED, and a slot that
    ends serves the next call."""
    health = "/grpc.health.v1.Health/Check"
    with CrishimProcess("--upstream-endpoint", upstream.path, "--max-cri-calls", "8") as proc:
        # a connection each (channels to one target share one unless told not to)
        channels = [grpc.insecure_channel("unix://" + proc.socket,
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(5)]
        streams = []
        try:
            for channel in channels[:4]:
                for _ in range(2):
                    stream = api_pb2_grpc.RuntimeServiceStub(channel).GetContainerEvents(
                        api_pb2.GetEventsRequest(), timeout=60)
                    next(stream)  # relayed: the call is in progress
                    streams.append(stream)
            # a third call on a full connection waits for a slot of its own connection
            with pytest.raises(grpc.RpcError) as waited:
                api_pb2_grpc.RuntimeServiceStub(channels[0]).Status(api_pb2.StatusRequest(),
                                                                    timeout=1)
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # 8 in progress: a call on another connection is refused at once
            check = channels[4].unary_unary(health)
            with pytest.raises(grpc.RpcError) as refused:
                check(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            streams.pop().cancel()
            deadline = time.monotonic() + 10
            while True:
                try:
                    check(b"", timeout=10)
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the freed slot never served a call"
                    time.sleep(0.1)
        finally:
            for stream in streams:
                stream.cancel()
            for channel in channels:
                channel.close()
        log = proc.log()
    assert "Traceback" not in log


class _RawUpstream:
    """An upstream of raw HTTP/2 whose answers carry metadata gRPC does not allow in text
    values (bytes past ASCII): initial metadata `x-bad: \\xff\\xfe`, then the message
    `StatusResponse()` and a trailer `x-worse: \\xff` beside grpc-status 0."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False))
        h2c.initiate_connection()
        message = api_pb2.StatusResponse(info={"a": "b"}).SerializeToString()
        with conn:
            conn.sendall(h2c.data_to_send())
            while data := conn.recv(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        sid = event.stream_id
                        h2c.send_headers(sid, [(b":status", b"200"),
                                               (b"content-type", b"application/grpc"),
                                               (b"x-bad", b"\xff\xfe"), (b"x-fine", b"yes")])
                        h2c.send_data(sid, struct.pack(">BI", 0, len(message)) + message)
                        h2c.send_headers(sid, [(b"grpc-status", b"0"), (b"x-worse", b"\xff")],
                                         end_stream=True)
                conn.sendall(h2c.data_to_send())

    def close(self) -> None:
        self.listener.close()


def test_metadata_from_the_upstream_that_grpc_forbids_is_dropped_not_fatal() -> None:
    """An upstream's text metadata past printable ASCII (grpc hands it over as Latin-1)
    made every such answer INTERNAL "Invalid metadata" through crishim, where a direct
    call got OK, and logged a traceback per call: such values are dropped now."""
    directory = tempfile.mkdtemp(prefix="crishim-rawup-")
    upstream = _RawUpstream(os.path.join(directory, "upstream.sock"))
    try:
        with CrishimProcess("--upstream-endpoint", upstream.listener.getsockname()) as proc:
            for _ in range(3):
                answer, call = api_pb2_grpc.RuntimeServiceStub(proc.channel).Status \
                    .with_call(api_pb2.StatusRequest(), timeout=10)
                assert answer.info == {"a": "b"}
                initial = dict(call.initial_metadata())
                assert initial.get("x-fine") == "yes" and "x-bad" not in initial
                assert "x-worse" not in dict(call.trailing_metadata())
            log = proc.log()
    finally:
        upstream.close()
    assert "Traceback" not in log and "Invalid metadata" not in log


def test_v1alpha2_is_passed_through_and_its_port_forward_is_crishims(
        proxy: CrishimProcess, upstream: RecordingUpstream) -> None:
    """containerd 1.6 and 1.7 still serve runtime.v1alpha2 (crictl and kubelets before
    1.26): crishim answered it UNIMPLEMENTED. Its calls pass through now, and its
    PortForward (the same messages on the wire) is crishim's, not the upstream's URL."""
    before = len(upstream.calls)
    status = proxy.channel.unary_unary("/runtime.v1alpha2.RuntimeService/Status",
                                       request_serializer=None, response_deserializer=None)
    answer = api_pb2.StatusResponse.FromString(
        status(api_pb2.StatusRequest().SerializeToString(), timeout=10))
    assert "remaining" in answer.info
    port_forward = proxy.channel.unary_unary(
        "/runtime.v1alpha2.RuntimeService/PortForward", request_serializer=None,
        response_deserializer=None)
    with pytest.raises(grpc.RpcError) as v1alpha2:
        port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="x").SerializeToString(),
                     timeout=10)
    with pytest.raises(grpc.RpcError) as v1:
        proxy.runtime.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="x"), timeout=10)
    assert v1alpha2.value.code() == v1.value.code()  # crishim's own answer, both times
    names = [name for name, _, _ in upstream.calls[before:]]
    assert names[0] == "Status" and "PortForward" not in names
    assert names.count("PodSandboxStatus") == 2  # crishim resolving the sandbox, twice
