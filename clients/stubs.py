"""Typed views of the generated gRPC stubs the clients call.

grpcio-tools writes ``*_pb2_grpc.py`` without annotations (and the health
stub package declares no methods on ``HealthStub``), so every call through a
stub would be untyped. These protocols name each method the clients use with
its request and response messages; ``inference_stub`` and friends return the
generated stub under that type. They add no runtime behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.protos.inference import grpc_service_pb2 as pb
from meshserve.protos.inference import grpc_service_pb2_grpc as pb_grpc

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")

_Unary = grpc.UnaryUnaryMultiCallable
_AioUnary = grpc.aio.UnaryUnaryMultiCallable


class StreamCall(Protocol):
    """What ``InferStream`` uses of a sync ``ModelStreamInfer`` call (grpc's call iterator, also a future)."""

    def __next__(self) -> pb.ModelStreamInferResponse: ...
    def cancel(self) -> bool: ...
    def cancelled(self) -> bool: ...


class _StreamInfer(Protocol):
    """``ModelStreamInfer`` on a ``grpc.Channel``: grpc's stubs type its call without ``cancelled()``."""

    def __call__(self, request_iterator: Iterator[pb.ModelInferRequest], timeout: float | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> StreamCall: ...


class InferenceStub(Protocol):
    """``GRPCInferenceServiceStub`` on a ``grpc.Channel``."""

    ServerLive: _Unary[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ServerReady: _Unary[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ModelReady: _Unary[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ServerMetadata: _Unary[pb.ServerMetadataRequest, pb.ServerMetadataResponse]
    ModelMetadata: _Unary[pb.ModelMetadataRequest, pb.ModelMetadataResponse]
    ModelConfig: _Unary[pb.ModelConfigRequest, pb.ModelConfigResponse]
    ModelStatistics: _Unary[pb.ModelStatisticsRequest, pb.ModelStatisticsResponse]
    RepositoryIndex: _Unary[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse]
    RepositoryModelLoad: _Unary[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse]
    RepositoryModelUnload: _Unary[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse]
    SystemSharedMemoryRegister: _Unary[pb.SystemSharedMemoryRegisterRequest, pb.SystemSharedMemoryRegisterResponse]
    SystemSharedMemoryUnregister: _Unary[
        pb.SystemSharedMemoryUnregisterRequest, pb.SystemSharedMemoryUnregisterResponse]
    ModelInfer: _Unary[pb.ModelInferRequest, pb.ModelInferResponse]
    ModelStreamInfer: _StreamInfer


class AsyncInferenceStub(Protocol):
    """``GRPCInferenceServiceStub`` on a ``grpc.aio.Channel``."""

    ServerLive: _AioUnary[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ServerReady: _AioUnary[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ModelReady: _AioUnary[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ServerMetadata: _AioUnary[pb.ServerMetadataRequest, pb.ServerMetadataResponse]
    ModelMetadata: _AioUnary[pb.ModelMetadataRequest, pb.ModelMetadataResponse]
    ModelConfig: _AioUnary[pb.ModelConfigRequest, pb.ModelConfigResponse]
    ModelStatistics: _AioUnary[pb.ModelStatisticsRequest, pb.ModelStatisticsResponse]
    RepositoryIndex: _AioUnary[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse]
    RepositoryModelLoad: _AioUnary[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse]
    RepositoryModelUnload: _AioUnary[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse]
    SystemSharedMemoryRegister: _AioUnary[
        pb.SystemSharedMemoryRegisterRequest, pb.SystemSharedMemoryRegisterResponse]
    SystemSharedMemoryUnregister: _AioUnary[
        pb.SystemSharedMemoryUnregisterRequest, pb.SystemSharedMemoryUnregisterResponse]
    ModelInfer: _AioUnary[pb.ModelInferRequest, pb.ModelInferResponse]
    ModelStreamInfer: grpc.aio.StreamStreamMultiCallable[pb.ModelInferRequest, pb.ModelStreamInferResponse]


class HealthStub(Protocol):
    """``grpc.health.v1`` ``HealthStub`` on a ``grpc.Channel``."""

    Check: _Unary[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


class AsyncHealthStub(Protocol):
    """``grpc.health.v1`` ``HealthStub`` on a ``grpc.aio.Channel``."""

    Check: _AioUnary[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]


def inference_stub(channel: grpc.Channel) -> InferenceStub:
    stub: InferenceStub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub


def async_inference_stub(channel: grpc.aio.Channel) -> AsyncInferenceStub:
    stub: AsyncInferenceStub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub


def health_stub(channel: grpc.Channel) -> HealthStub:
    stub: HealthStub = health_pb2_grpc.HealthStub(channel)  # type: ignore[assignment]  # no methods in its stubs
    return stub


def async_health_stub(channel: grpc.aio.Channel) -> AsyncHealthStub:
    stub: AsyncHealthStub = health_pb2_grpc.HealthStub(channel)  # type: ignore[assignment]  # no methods in its stubs
    return stub
