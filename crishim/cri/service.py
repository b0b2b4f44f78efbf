"""The CRI gRPC service: PortForward answered here, every other method passed through to
the upstream runtime byte for byte (or UNIMPLEMENTED without one). Version is answered
here without an upstream; with one, the upstream answers it unless `upstream_version` is
off, so a kubelet reports the real runtime (containerd://1.6.x), not the shim."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from crishim import __version__
from crishim.cri import api_pb2
from crishim.runtime import RuntimeError_, RuntimePlugin, SandboxGone, SandboxNotFound
from crishim.tokens import StreamRequest, TokensExhausted, TokenStore

log = logging.getLogger("crishim.cri")

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
KUBELET_API_VERSION = "0.1.0"
# metadata gRPC itself sets on a call (and every reserved grpc-*/:pseudo key); everything
# else is carried to the upstream
_HOP_METADATA = {"user-agent", "content-type", "te", "host"}
# CRI methods take one request message; a client streaming more is refused, not buffered
_MAX_REQUESTS = 16


def upstream_target(endpoint: str) -> str:
    """The gRPC target of an upstream_endpoint setting: a bare path is a unix socket."""
    return "unix://" + endpoint if endpoint.startswith("/") else endpoint


def _forwardable(key: str) -> bool:
    return key not in _HOP_METADATA and not key.startswith(("grpc-", ":"))


class CriService:
    """Typed handlers for the methods crishim answers itself."""

    def __init__(self, plugin: RuntimePlugin, tokens: TokenStore,
                 url_for: Callable[[str], str]) -> None:
        self.plugin = plugin
        self.tokens = tokens
        self.url_for = url_for

    async def Version(self, request: api_pb2.VersionRequest,
                      context: grpc.aio.ServicerContext) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(version=KUBELET_API_VERSION, runtime_name="crishim",
                                       runtime_version=__version__, runtime_api_version="v1")

    async def PortForward(self, request: api_pb2.PortForwardRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.PortForwardResponse:
        sandbox_id = request.pod_sandbox_id
        if not sandbox_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "pod_sandbox_id is empty")
        bad = [p for p in request.port if not 1 <= p <= 65535]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"port {bad[0]} is not in 1..65535")
        try:
            await self.plugin.resolve(sandbox_id)
        except (SandboxNotFound, SandboxGone) as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except RuntimeError_ as e:  # e.g. the upstream runtime did not answer
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            token = self.tokens.issue(StreamRequest(sandbox_id, tuple(request.port)))
        except TokensExhausted as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        url = self.url_for(token)
        log.debug("PortForward sandbox=%s ports=%s -> %s", sandbox_id, list(request.port),
                  url.rsplit("/", 1)[0] + "/…")
        return api_pb2.PortForwardResponse(url=url)


def _typed(method: Callable, request_type) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        method, request_deserializer=request_type.FromString,
        response_serializer=lambda m: m.SerializeToString())


class CriHandler(grpc.GenericRpcHandler):
    """Routes every /runtime.v1.* method: ours typed, the rest to the upstream."""

    def __init__(self, service: CriService, upstream: grpc.aio.Channel | None,
                 upstream_version: bool = True) -> None:
        self.own = {
            f"/{RUNTIME_SERVICE}/PortForward": _typed(service.PortForward,
                                                      api_pb2.PortForwardRequest),
        }
        if upstream is None or not upstream_version:
            self.own[f"/{RUNTIME_SERVICE}/Version"] = _typed(service.Version,
                                                             api_pb2.VersionRequest)
        self.upstream = upstream

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        handler = self.own.get(method)
        if handler is not None:
            return handler
        if not method.startswith("/runtime.v1."):
            return None
        if self.upstream is None:
            return grpc.stream_stream_rpc_method_handler(self._unimplemented(method))
        return grpc.stream_stream_rpc_method_handler(self._pass_through(method))

    @staticmethod
    def _unimplemented(method: str) -> Callable:
        async def handler(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{method} is not served by crishim itself and no "
                                "upstream_endpoint is configured")
            yield b""  # pragma: no cover - abort raises

        return handler

    def _pass_through(self, method: str) -> Callable:
        """Raw bytes both ways, without decoding: unary and server-streaming answers look
        alike on the wire. Every CRI method takes exactly one request, so the request is
        read first and sent with the call's opening batch (unary-stream). A stream-stream
        client call would write it separately, and grpc.aio turns an upstream that ends
        the call before that write (UNIMPLEMENTED, a quick NOT_FOUND) into a bogus
        INTERNAL "Internal error from Core" (grpc/grpc#36066)."""
        upstream = self.upstream
        assert upstream is not None
        one_request = upstream.unary_stream(method)
        many_requests = upstream.stream_stream(method)

        async def handler(requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
            metadata = tuple((k, v) for k, v in context.invocation_metadata()
                             if _forwardable(k))
            received = []
            async for request in requests:
                received.append(request)
                if len(received) > _MAX_REQUESTS:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"{method}: more than {_MAX_REQUESTS} request messages; "
                                        "CRI methods take one")
            timeout = context.time_remaining()
            if len(received) == 1:
                call = one_request(received[0], metadata=metadata, timeout=timeout)
            else:
                call = many_requests(iter(received), metadata=metadata, timeout=timeout)
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(initial)
                async for response in call:
                    yield response
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.aio.AioRpcError as e:
                if e.trailing_metadata():
                    context.set_trailing_metadata(e.trailing_metadata())
                await context.abort(e.code(), e.details() or "")
            finally:
                # the client cancelled or went away: the upstream call must end too, not
                # linger until garbage collection (a GetContainerEvents would stay open)
                if not call.done():
                    call.cancel()

        return handler
