"""The CRI gRPC service: PortForward answered here, every other method passed through to
the upstream runtime byte for byte (or UNIMPLEMENTED without one). Version is answered
here without an upstream; with one, the upstream answers it unless `upstream_version` is
off, so a kubelet reports the real runtime (containerd://1.6.x), not the shim."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2

from crishim import __version__
from crishim.budget import LogBudget
from crishim.cri import api_pb2
from crishim.ports import InvalidPort, check_port, shown
from crishim.runtime import RuntimeError_, RuntimePlugin, SandboxGone, SandboxNotFound
from crishim.tokens import StreamRequest, TokensExhausted, TokenStore

log = logging.getLogger("crishim.cri")

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
RUNTIME_APIS = ("runtime.v1", "runtime.v1alpha2")
_PASSED_PREFIXES = tuple(f"/{api}." for api in RUNTIME_APIS)
KUBELET_API_VERSION = "0.1.0"
# metadata gRPC itself sets on a call (and every reserved grpc-*/:pseudo key); everything
# else is carried to the upstream
_HOP_METADATA = {"user-agent", "content-type", "te", "host"}


def upstream_target(endpoint: str) -> str:
    """The gRPC target of an upstream_endpoint setting: a bare path is a unix socket."""
    return "unix://" + endpoint if endpoint.startswith("/") else endpoint


def _forwardable(key: str) -> bool:
    return key not in _HOP_METADATA and not key.startswith(("grpc-", ":"))


def _relayable(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    """The upstream's metadata as the client may get it: a text value gRPC does not allow
    (printable ASCII only; grpc hands the upstream's other bytes over as Latin-1) is
    dropped. Sent on, each turned the upstream's OK into INTERNAL "Invalid metadata",
    with a traceback in the log per call."""
    return tuple((k, v) for k, v in metadata
                 if k.endswith("-bin") or (isinstance(v, str) and v.isascii()
                                           and v.isprintable()))


class Undecodable:
    """What a request deserializer hands the handler for bytes that are not the message:
    the handler answers INVALID_ARGUMENT instead of grpc logging a traceback (UNKNOWN)."""

    __slots__ = ("method", "reason")

    def __init__(self, method: str, reason: str) -> None:
        self.method = method
        self.reason = reason


def cri_refusal_log(lines_per_second: float) -> LogBudget:
    """The lines about refused CRI requests, within log_lines_per_second (a WARNING
    each: 5,000 garbage calls in a second wrote 5,000)."""
    return LogBudget(log, lines_per_second, "%d more refused CRI requests not logged")


async def refuse_undecodable(refusal_log: LogBudget, request: object,
                             context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """INVALID_ARGUMENT, and a line within refusal_log, for bytes that were not the
    method's request message (a decoder's Undecodable)."""
    if isinstance(request, Undecodable):
        refusal_log.log(logging.WARNING, "%s: refusing an undecodable request: %s",
                        request.method, request.reason)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request is not a valid {request.method} message: "
                            f"{request.reason}")


class CriService:
    """Typed handlers for the methods crishim answers itself."""

    def __init__(self, plugin: RuntimePlugin, tokens: TokenStore,
                 url_for: Callable[[str], str], max_sandbox_id_length: int = 256,
                 max_ports: int = 64, draining: Callable[[], bool] = lambda: False,
                 max_request_bytes: int = 64 * 1024,
                 refusal_log: LogBudget | None = None) -> None:
        self.plugin = plugin
        self.tokens = tokens
        self.url_for = url_for
        self.max_sandbox_id_length = max_sandbox_id_length
        self.max_ports = max_ports
        self.draining = draining
        self.max_request_bytes = max_request_bytes
        self.refusal_log = refusal_log or cri_refusal_log(0)

    async def refuse_undecodable(self, request: object,
                                 context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await refuse_undecodable(self.refusal_log, request, context)

    async def Version(self, request: api_pb2.VersionRequest,
                      context: grpc.aio.ServicerContext[Any, Any],
                      api: str = "v1") -> api_pb2.VersionResponse:
        await self.refuse_undecodable(request, context)
        return api_pb2.VersionResponse(version=KUBELET_API_VERSION, runtime_name="crishim",
                                       runtime_version=__version__, runtime_api_version=api)

    async def VersionV1alpha2(self, request: api_pb2.VersionRequest,
                              context: grpc.aio.ServicerContext[Any, Any]
                              ) -> api_pb2.VersionResponse:
        """runtime.v1alpha2's Version (the same messages on the wire), naming that API."""
        return await self.Version(request, context, api="v1alpha2")

    async def _refuse(self, request: api_pb2.PortForwardRequest,
                      context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                      message: str) -> NoReturn:
        """Abort the call, and say so in the log within log_lines_per_second (containerd
        logs every failed PortForward; these were not logged at all)."""
        self.refusal_log.log(logging.WARNING, "PortForward sandbox=%s ports=%s refused: %s: %s",
                             shown(request.pod_sandbox_id, 40), list(request.port[:8]),
                             code.name, message)
        await context.abort(code, message)
        raise AssertionError("abort returned")  # pragma: no cover - abort raises

    async def PortForward(self, request: api_pb2.PortForwardRequest,
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> api_pb2.PortForwardResponse:
        await self.refuse_undecodable(request, context)

        async def refuse(code: grpc.StatusCode, message: str) -> NoReturn:
            await self._refuse(request, context, code, message)

        invalid = grpc.StatusCode.INVALID_ARGUMENT
        shutting_down = ("crishim is shutting down: a stream URL issued now could not be "
                         "redeemed; retry against the restarted server")
        if self.draining():
            await refuse(grpc.StatusCode.UNAVAILABLE, shutting_down)
        sandbox_id = request.pod_sandbox_id
        if not sandbox_id:
            await refuse(invalid, "pod_sandbox_id is empty")
        if len(sandbox_id.encode()) > self.max_sandbox_id_length:
            await refuse(invalid, f"pod_sandbox_id {shown(sandbox_id, 40)} is longer than "
                                  f"{self.max_sandbox_id_length} bytes (max_sandbox_id_length)")
        if any(c < " " or c == "\x7f" for c in sandbox_id):
            # no runtime names a sandbox so; a NUL reached a plugin's os.stat as ValueError
            await refuse(invalid, f"pod_sandbox_id {shown(sandbox_id, 40)} contains control "
                                  "characters")
        if len(request.port) > 16 * self.max_ports:  # not even collapsed: too costly
            await refuse(invalid, f"{len(request.port)} ports listed; at most "
                                  f"{16 * self.max_ports} (16 x max_port_forward_ports)")
        ports = tuple(dict.fromkeys(request.port))  # duplicates collapse, order kept
        if len(ports) > self.max_ports:
            await refuse(invalid, f"{len(ports)} distinct ports requested; at most "
                                  f"{self.max_ports} (max_port_forward_ports)")
        try:
            for port in ports:
                check_port(port)
        except InvalidPort as e:
            await refuse(invalid, str(e))
        try:
            await self.plugin.resolve(sandbox_id)
        except (SandboxNotFound, SandboxGone) as e:
            await refuse(grpc.StatusCode.NOT_FOUND, str(e))
        except RuntimeError_ as e:  # e.g. the upstream runtime did not answer
            # a plugin's own status name, where it names a failure (else try later)
            code = grpc.StatusCode.__members__.get(str(e.status), grpc.StatusCode.UNAVAILABLE)
            await refuse(code if code is not grpc.StatusCode.OK else
                         grpc.StatusCode.UNAVAILABLE, str(e))
        if self.draining():  # it began during the lookup (up to the upstream's 10 s)
            await refuse(grpc.StatusCode.UNAVAILABLE, shutting_down)
        try:
            token = self.tokens.issue(StreamRequest(sandbox_id, ports))
        except TokensExhausted as e:
            await refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        url = self.url_for(token)
        log.debug("PortForward sandbox=%s ports=%s -> %s", sandbox_id, list(ports),
                  url.rsplit("/", 1)[0] + "/…")
        return api_pb2.PortForwardResponse(url=url)


def _decoder(request_type: type[Message], max_bytes: int) -> Callable[[bytes], object]:
    """request_type.FromString, but bytes that do not decode (malformed protobuf, invalid
    UTF-8 in a string) or are larger than max_bytes become an Undecodable for the handler
    to refuse."""
    name = request_type.DESCRIPTOR.name

    def decode(data: bytes) -> object:
        if len(data) > max_bytes:  # refused before decoding: a repeated field costs memory
            return Undecodable(name, f"{len(data)} bytes; at most {max_bytes} "
                                     "(max_request_bytes)")
        try:
            return request_type.FromString(data)
        except DecodeError as e:
            return Undecodable(name, shown(str(e), 120))

    return decode


def _typed(method: Callable[..., Any], request_type: type[Message],
           max_bytes: int) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=_decoder(request_type, max_bytes),
        response_serializer=lambda m: m.SerializeToString())


# CRI methods whose answer is a stream that lasts as long as the client wants it
_STREAMING_METHODS = frozenset({"GetContainerEvents"})


class CriHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # stubs: generic
    """Routes every /runtime.v1.* and /runtime.v1alpha2.* method: ours typed, the rest to
    the upstream. v1alpha2 (what containerd 1.6 and 1.7 still serve, for crictl and
    kubelets older than 1.26) has the same PortForward messages on the wire: crishim
    answers it too, or those clients would get the upstream's own stream URL."""

    def __init__(self, service: CriService, upstream: grpc.aio.Channel | None,
                 upstream_version: bool = True) -> None:
        port_forward = _typed(service.PortForward, api_pb2.PortForwardRequest,
                              service.max_request_bytes)
        self.own = {f"/{api}.RuntimeService/PortForward": port_forward
                    for api in RUNTIME_APIS}
        if upstream is None or not upstream_version:  # on both APIs, as PortForward
            for api, version in (("runtime.v1", service.Version),
                                 ("runtime.v1alpha2", service.VersionV1alpha2)):
                self.own[f"/{api}.RuntimeService/Version"] = _typed(
                    version, api_pb2.VersionRequest, service.max_request_bytes)
        self.upstream = upstream
        # the server-streaming calls passed through (GetContainerEvents), which never end
        # by themselves: ended by end_streams when crishim stops, so that the unary calls
        # in progress get the rest of the drain and a stream does not hold it to its end
        self._streams: set[Any] = set()
        self._stopping = False

    def end_streams(self) -> None:
        """crishim is stopping: each streaming call ends with UNAVAILABLE (the kubelet
        opens its event stream again on the runtime that comes next)."""
        self._stopping = True
        for call in list(self._streams):
            call.cancel()

    def service(self, details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method
        handler = self.own.get(method)
        if handler is not None:
            return handler
        if not method.startswith(_PASSED_PREFIXES):
            return None
        if self.upstream is None:
            return grpc.stream_stream_rpc_method_handler(self._unimplemented(method))
        return grpc.stream_stream_rpc_method_handler(self._pass_through(method))

    @staticmethod
    def _unimplemented(method: str) -> Callable[..., AsyncIterator[bytes]]:
        async def handler(requests: AsyncIterator[bytes],
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{method} is not served by crishim itself and no "
                                "upstream_endpoint is configured")
            yield b""  # pragma: no cover - abort raises

        return handler

    def _pass_through(self, method: str) -> Callable[..., AsyncIterator[bytes]]:
        """Raw bytes both ways, without decoding: unary and server-streaming answers look
        alike on the wire. Every CRI method takes exactly one request, so the request is
        read first and sent with the call's opening batch (unary-stream). A stream-stream
        client call would write it separately, and grpc.aio turns an upstream that ends
        the call before that write (UNIMPLEMENTED, a quick NOT_FOUND) into a bogus
        INTERNAL "Internal error from Core" (grpc/grpc#36066).

        The request goes upstream as soon as it is in, as containerd answers a call
        without waiting for the client's half-close; what a client sends after it is
        never read, so never held (waiting for the half-close, a call that never sent
        it held its slot forever, and its extra messages up to 16 MiB)."""
        upstream = self.upstream
        assert upstream is not None
        one_request = upstream.unary_stream(method)  # type: ignore[call-arg]  # raw bytes
        many_requests = upstream.stream_stream(method)  # type: ignore[call-arg]  # raw bytes
        streaming = method.rpartition("/")[2] in _STREAMING_METHODS

        async def handler(requests: AsyncIterator[bytes],
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
            metadata = tuple((k, v) for k, v in context.invocation_metadata() or ()
                             if _forwardable(k))
            first: bytes | None = None
            async for request in requests:
                first = request
                break
            if streaming and self._stopping:  # after end_streams: it would hold the stop
                await context.abort(grpc.StatusCode.UNAVAILABLE, "crishim is stopping")
            timeout = context.time_remaining()
            call: Any
            if first is not None:
                call = one_request(first, metadata=metadata, timeout=timeout)
            else:  # none at all: the upstream's answer to that
                call = many_requests(iter(()), metadata=metadata, timeout=timeout)
            if streaming:
                self._streams.add(call)
            try:
                initial = _relayable(await call.initial_metadata() or ())
                if initial:
                    await context.send_initial_metadata(initial)
                async for response in call:
                    yield response
                trailing = _relayable(await call.trailing_metadata() or ())
                if trailing:
                    context.set_trailing_metadata(trailing)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not (self._stopping and task is not None and not task.cancelling()):
                    raise  # the call itself was cancelled, not its upstream call by us
                await context.abort(grpc.StatusCode.UNAVAILABLE, "crishim is stopping")
            except grpc.aio.AioRpcError as e:
                trailers = _relayable(e.trailing_metadata() or ())
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(e.code(), e.details() or "")
            finally:
                # the client cancelled or went away: the upstream call must end too, not
                # linger until garbage collection (a GetContainerEvents would stay open)
                if not call.done():
                    call.cancel()
                self._streams.discard(call)

        return handler


HEALTH_SERVICE = "grpc.health.v1.Health"


class _LastStatus:
    """A Watch's context that remembers the last status written to it. A write goes on
    when the Watch is cancelled (gRPC takes one message at a time on a call: another write
    while it is in flight fails, GRPC_CALL_ERROR_TOO_MANY_OPERATIONS): `settled()` waits
    for it."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self.last: int | None = None
        self._writing: asyncio.Future[None] | None = None
        self._writing_status: int | None = None

    async def write(self, message: Any) -> None:
        self._writing_status = message.status
        writing = self._writing = asyncio.ensure_future(self._context.write(message))
        await asyncio.shield(writing)
        self.last = message.status

    async def settled(self) -> bool:
        """Wait for the write in flight, if any; False when it failed (the call is over)."""
        writing = self._writing
        if writing is None:
            return True
        try:
            await writing
        except Exception:  # noqa: BLE001 - the call ended meanwhile: nothing more goes out
            return False
        self.last = self._writing_status
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # stubs: generic
    """grpc.health.v1 (Check, Watch) from grpc_health's servicer, with the CRI methods'
    decoder: bytes that are not a HealthCheckRequest get INVALID_ARGUMENT. The stock
    registration's deserializer raised, and grpc logged an ERROR and a traceback per
    call."""

    def __init__(self, servicer: Any, refusal_log: LogBudget | None = None) -> None:
        self.servicer = servicer
        self.refusal_log = refusal_log or cri_refusal_log(0)
        self._stopping = asyncio.Event()  # end_watches
        decode = _decoder(health_pb2.HealthCheckRequest, 1024)
        encode = health_pb2.HealthCheckResponse.SerializeToString
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            f"/{HEALTH_SERVICE}/Check": grpc.unary_unary_rpc_method_handler(
                self._check, request_deserializer=decode, response_serializer=encode),
            f"/{HEALTH_SERVICE}/Watch": grpc.unary_stream_rpc_method_handler(
                self._watch, request_deserializer=decode, response_serializer=encode),
        }

    def service(self, details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self.handlers.get(details.method)

    async def _check(self, request: object, context: grpc.aio.ServicerContext[Any, Any]
                     ) -> Any:
        await refuse_undecodable(self.refusal_log, request, context)
        return await self.servicer.Check(request, context)

    async def _watch(self, request: object, context: grpc.aio.ServicerContext[Any, Any]
                     ) -> None:
        await refuse_undecodable(self.refusal_log, request, context)
        # it writes its answers to context, and never ends by itself
        said = _LastStatus(context)
        watching = asyncio.ensure_future(self.servicer.Watch(request, said))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            stopping.cancel()
        # the last word, then the end of the stream; once (the stop's own NOT_SERVING,
        # enter_graceful_shutdown's, has usually reached the watch already)
        if self._stopping.is_set() and await said.settled() \
                and said.last != health_pb2.HealthCheckResponse.NOT_SERVING:
            try:
                await context.write(health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.NOT_SERVING))
            except Exception:  # noqa: BLE001 - the watcher went away meanwhile
                pass

    def end_watches(self) -> None:
        """crishim is stopping: each Watch ends, after a NOT_SERVING (it would hold the
        stop for what is left of drain_timeout, as an event stream would)."""
        self._stopping.set()
