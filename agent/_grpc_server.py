"""The local inference server over gRPC: the Open Inference Protocol's ``GRPCInferenceService``.

Optional: it needs the ``grpc`` extra (grpcio, protobuf) and runs only with ``[grpc] enabled =
true``; the daemon imports this module then and only then, so an agent without the extra never
loads grpc. Calls (``tritonclient.grpc`` works unchanged)::

    ServerLive, ServerReady          liveness / readiness (as /v2/health/live and /ready)
    ServerMetadata                   name and version
    ModelReady, ModelMetadata        the served version of a model
    ModelInfer                       inference: raw_input_contents or typed contents in,
                                     raw_output_contents out

Every inference goes through :meth:`edgepack.agent._runtime.Runtime.run`, the path HTTP and the
Python API take: the same validation against the manifest, the same ``[runtime]
request_timeout``, the same telemetry and drift. Failures are gRPC status codes with a message
saying what is wrong: INVALID_ARGUMENT for a bad request, NOT_FOUND for a model or version not
served, INTERNAL when the model fails on valid inputs, DEADLINE_EXCEEDED when the request
timeout stopped it or the client's deadline passed before it ran.

Bounds (``[grpc]``): requests and responses of at most ``max_message_bytes`` (a larger request is
refused by gRPC before it is parsed: RESOURCE_EXHAUSTED), at most ``max_concurrent_rpcs`` calls
admitted at once (more are refused at once, RESOURCE_EXHAUSTED), ``max_workers`` threads running
them. gRPC reads and writes connections on its own threads and hands a call to a worker only
once its whole message has arrived, so slow or idle clients hold no worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent import futures
from typing import Any

from edgepack.agent._config import GrpcConfig
from edgepack.agent._grpc_protocol import (
    METHODS,
    SERVICE,
    decode_infer_request,
    encode_infer_response,
    messages,
    model_and_version,
    model_metadata_response,
    server_metadata_response,
)
from edgepack.agent._runtime import Runtime
from edgepack.agent.exceptions import (
    ConfigError,
    EdgepackError,
    InferenceError,
    ModelNotFoundError,
    RequestError,
)

__all__ = ["GrpcInferenceServer"]

log = logging.getLogger("edgepack.agent.grpc")

_MAX_DETAIL = 2000  # characters of an error message (it travels in a trailer)
# edgepack.agent._session.run_session's words when the request timeout stopped onnxruntime
_STOPPED = "did not answer within"


def _import_grpc() -> tuple[Any, dict[str, Any]]:
    """grpc, and the message classes (protobuf)."""
    try:
        import grpc

        return grpc, messages()
    except ImportError as e:
        raise ConfigError(
            f"[grpc] enabled = true needs grpcio and protobuf, which are not installed ({e}); "
            "install the extra: pip install 'edgepack[agent,grpc]'"
        ) from e


class _Service:
    """The six calls; each returns a response message or aborts the call with a status."""

    def __init__(self, grpc: Any, runtime: Runtime, ready: Callable[[], bool]) -> None:
        self._codes = grpc.StatusCode
        self._runtime = runtime
        self._ready = ready
        self._messages = messages()

    def _abort(self, context: Any, code: Any, message: str) -> None:
        context.abort(code, message[:_MAX_DETAIL])  # raises: the call ends here

    def server_live(self, request: Any, context: Any) -> Any:
        return self._messages["ServerLiveResponse"](live=True)

    def server_ready(self, request: Any, context: Any) -> Any:
        return self._messages["ServerReadyResponse"](ready=bool(self._ready()))

    def server_metadata(self, request: Any, context: Any) -> Any:
        return server_metadata_response()

    def model_ready(self, request: Any, context: Any) -> Any:
        # Triton's answer for a model it does not serve: not ready (no error), so a client's
        # is_model_ready() says False, as it does over HTTP (a 404 there)
        try:
            self._runtime.get(*model_and_version(request.name, request.version))
        except RequestError:
            return self._messages["ModelReadyResponse"](ready=False)
        return self._messages["ModelReadyResponse"](ready=True)

    def model_metadata(self, request: Any, context: Any) -> Any:
        try:
            served = self._runtime.get(*model_and_version(request.name, request.version))
        except ModelNotFoundError as e:
            return self._abort(context, self._codes.NOT_FOUND, str(e))
        except RequestError as e:
            return self._abort(context, self._codes.INVALID_ARGUMENT, str(e))
        manifest = served.manifest
        return model_metadata_response(
            served.name, [served.version], manifest.inputs, manifest.outputs
        )

    def model_infer(self, request: Any, context: Any) -> Any:
        codes = self._codes
        try:
            decoded = decode_infer_request(request)
            caller = decoded.caller or _caller_metadata(context)
            served = self._runtime.route(decoded.model, decoded.version, caller)
            left = context.time_remaining()
            if left is not None and left <= 0:
                code, message = codes.DEADLINE_EXCEEDED, "the deadline passed before the model ran"
            else:
                # run on the model we hold: a hot swap right now must not fail this request
                outputs = self._runtime.run(served, decoded.inputs, decoded.outputs or None)
                request_id = decoded.id
                monitor = self._runtime.monitor
                if monitor is not None and monitor.quality_config.enabled:
                    request_id = request_id or os.urandom(16).hex()  # returned: feedback names it
                    self._runtime.remember(served, request_id, outputs)
                return encode_infer_response(served.name, served.version, request_id, outputs)
        except ModelNotFoundError as e:
            code, message = codes.NOT_FOUND, str(e)
        except RequestError as e:
            code, message = codes.INVALID_ARGUMENT, str(e)
        except InferenceError as e:  # a valid request the model fails on: the model's fault
            log.warning("%s", e)
            code = codes.DEADLINE_EXCEEDED if _STOPPED in str(e) else codes.INTERNAL
            message = str(e)
        except EdgepackError as e:
            code, message = codes.INTERNAL, str(e)
        except Exception as e:
            log.exception("inference failed")
            code, message = codes.INTERNAL, f"inference failed: {type(e).__name__}: {e}"
        # outside the try: context.abort raises, and the handlers above must not catch that
        return self._abort(context, code, message)


class GrpcInferenceServer:
    """Serves ``GRPCInferenceService`` from a bounded thread pool.

    Args:
        runtime: what to serve.
        config: the ``[grpc]`` settings (address and bounds).
        ready: returns whether the agent is ready (``ServerReady``).

    Raises:
        ConfigError: grpcio or protobuf is not installed.
        EdgepackError: the address cannot be listened on (another agent, a bad host).
    """

    def __init__(
        self, runtime: Runtime, config: GrpcConfig, ready: Callable[[], bool] = lambda: True
    ) -> None:
        grpc, classes = _import_grpc()
        service = _Service(grpc, runtime, ready)
        handlers = {
            method: grpc.unary_unary_rpc_method_handler(
                getattr(service, _snake(method)),
                request_deserializer=classes[request].FromString,
                response_serializer=classes[response].SerializeToString,
            )
            for method, (request, response) in METHODS.items()
        }
        self._pool = futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="edgepack-grpc"
        )
        self._server = grpc.server(
            self._pool,
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # two agents must not share a port: a second bind fails instead of splitting
                # the traffic (gRPC sets SO_REUSEPORT by default)
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        host = f"[{config.host}]" if ":" in config.host else config.host
        try:
            port = self._server.add_insecure_port(f"{host}:{config.port}")
        except RuntimeError as e:  # grpcio's way of saying the bind failed
            port, why = 0, str(e)
        else:
            why = "the address is in use or cannot be bound"
        if not port:
            self._pool.shutdown(wait=False)
            raise EdgepackError(
                f"cannot listen for gRPC on {host}:{config.port}: {why} (is another agent "
                "running? change [grpc].port in agent.toml)"
            )
        self.host = config.host
        self.port = int(port)

    @property
    def address(self) -> str:
        """``host:port``, as ``tritonclient.grpc.InferenceServerClient(url=...)`` takes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> GrpcInferenceServer:
        self._server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop accepting calls; those in flight get ``grace`` seconds to finish."""
        self._server.stop(grace).wait(timeout=grace + 5)
        self._pool.shutdown(wait=False)


def _snake(method: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in method).lstrip("_")


def _caller_metadata(context: Any) -> str | None:
    """The ``x-edgepack-caller`` metadata of a call (the HTTP header's gRPC twin), if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-edgepack-caller" and isinstance(value, str) and value:
            if len(value) > 256:
                raise RequestError("the x-edgepack-caller metadata must be at most 256 characters")
            return value
    return None
