"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc

from kvserver import domain

STATUS_BY_ERROR: dict[type[domain.KvError], grpc.StatusCode] = {
    domain.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.KeyNotFound: grpc.StatusCode.NOT_FOUND,
    domain.ConditionFailed: grpc.StatusCode.ABORTED,
    domain.Compacted: grpc.StatusCode.OUT_OF_RANGE,
    domain.FutureRevision: grpc.StatusCode.OUT_OF_RANGE,
    domain.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    domain.StorageFailure: grpc.StatusCode.UNAVAILABLE,
    domain.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: domain.KvError) -> grpc.StatusCode:
    for error_type in type(error).__mro__:
        if error_type in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_type]
    return grpc.StatusCode.INTERNAL
