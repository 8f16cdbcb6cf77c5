"""Re-wrapping a gRPC method handler's behaviour: the one mechanism behind every server
interceptor here (error mapping, tracing, authentication)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_call: Callable[[Behavior], Behavior],
    wrap_stream: Callable[[Behavior], Behavior],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """The same method with its behaviour wrapped: `wrap_call` for the kinds that answer
    once (unary and stream-unary), `wrap_stream` for those that stream their answer."""
    codec = {"request_deserializer": request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_call(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_call(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **codec)
