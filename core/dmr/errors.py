"""Errors that carry their HTTP status, so every route answers them the same way."""

from __future__ import annotations

__all__ = [
    "ConflictError",
    "DmrError",
    "InsufficientMemoryError",
    "InsufficientStorageError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "RegistryError",
    "RunnerError",
    "ServiceBusyError",
    "StoreError",
    "UnsupportedMediaTypeError",
]


class DmrError(Exception):
    status: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"  # OpenAI's error "type"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(DmrError):
    status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"


class ModelNotFoundError(DmrError):
    status = 404
    code = "model_not_found"
    error_type = "not_found_error"


class ConflictError(DmrError):
    status = 409
    code = "conflict"
    error_type = "invalid_request_error"


class PayloadTooLargeError(DmrError):
    status = 413
    code = "payload_too_large"
    error_type = "invalid_request_error"


class UnsupportedMediaTypeError(DmrError):
    """An artifact whose config media type dmr does not know (422 on the API, as DMR)."""

    status = 422
    code = "unsupported_media_type"
    error_type = "invalid_request_error"


class RegistryError(DmrError):
    status = 502
    code = "registry_error"


class StoreError(DmrError):
    status = 500
    code = "store_error"


class InsufficientStorageError(StoreError):
    """The disk holding the store is (or would be) full: the operator's problem to fix."""

    status = 507
    code = "insufficient_storage"


class RunnerError(DmrError):
    """A runner failed to start or crashed; the message says why in plain words."""

    status = 500
    code = "runner_error"


class ServiceBusyError(DmrError):
    status = 503
    code = "overloaded"
    error_type = "overloaded_error"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InsufficientMemoryError(DmrError):
    """The model can never fit the device, even with every other runner unloaded."""

    status = 507
    code = "insufficient_memory"
