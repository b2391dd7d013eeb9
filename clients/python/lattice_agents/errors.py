"""Typed errors: one exception class per `google.rpc.Code`, raised for a task whose
result carries a non-OK status, a tool call or memory op that failed, or a stream the
orchestrator refused (bad credentials, wrong protocol version)."""

from __future__ import annotations

from typing import Any, ClassVar

import grpc


class LatticeError(Exception):
    """A non-OK `google.rpc.Status`. `code` is the `grpc.StatusCode`; `retryable` says
    whether the same request may succeed later (the task id keeps a retry the same task)."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, details: list[Any] | None = None, task_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.task_id = task_id

    def __str__(self) -> str:
        prefix = f"{self.code.name}"
        if self.task_id:
            prefix += f" (task {self.task_id})"
        return f"{prefix}: {self.message}"


class Cancelled(LatticeError):
    code = grpc.StatusCode.CANCELLED


class Unknown(LatticeError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(LatticeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(LatticeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(LatticeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LatticeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LatticeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(LatticeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class FailedPrecondition(LatticeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(LatticeError):
    code = grpc.StatusCode.ABORTED
    retryable = True


class OutOfRange(LatticeError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(LatticeError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(LatticeError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(LatticeError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DataLoss(LatticeError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(LatticeError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[int, type[LatticeError]] = {
    cls.code.value[0]: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
        ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
        DataLoss, Unauthenticated,
    )
}


def error_for(code: int, message: str, *, details: list[Any] | None = None, task_id: str | None = None) -> LatticeError:
    """The exception for a status code (an unknown number maps to `Unknown`)."""
    return _BY_CODE.get(code, Unknown)(message, details=details, task_id=task_id)


def from_status(status: Any, *, task_id: str | None = None) -> LatticeError | None:
    """The exception for a `google.rpc.Status` message, or None for OK."""
    if status is None or status.code == 0:
        return None
    return error_for(status.code, status.message, details=list(status.details), task_id=task_id)


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError) -> LatticeError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code.value[0] if code else 2, details or "")
