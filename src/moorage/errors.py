"""Domain errors. Domain code raises these; ``server`` maps each to one gRPC status code.

Every message names the field or object it is about, so a kubelet event or a crictl error
tells an operator what to fix.
"""

from __future__ import annotations


class MoorageError(Exception):
    """Base of every error that reaches a CRI caller with a status code."""

    #: Name of the ``grpc.StatusCode`` member this error maps to.
    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MoorageError):
    code = "INVALID_ARGUMENT"


class NotFound(MoorageError):
    code = "NOT_FOUND"


class AlreadyExists(MoorageError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MoorageError):
    code = "FAILED_PRECONDITION"


class DeadlineExceeded(MoorageError):
    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(MoorageError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(MoorageError):
    code = "UNAVAILABLE"


class Unauthenticated(MoorageError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MoorageError):
    code = "PERMISSION_DENIED"


class DataLoss(MoorageError):
    """Content that does not match its digest, or a truncated body."""

    code = "DATA_LOSS"


class SignatureValidationFailed(MoorageError):
    """An image the signature policy refuses. As CRI-O does, the status is UNKNOWN and the
    message starts with the CRI's ``SignatureValidationFailed`` (k8s.io/cri-api errors):
    kubelet strips UNKNOWN's code, sees that prefix and reports the container waiting
    with reason ``SignatureValidationFailed``."""

    code = "UNKNOWN"
    PREFIX = "SignatureValidationFailed"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.PREFIX}: {message}")


class Unimplemented(MoorageError):
    code = "UNIMPLEMENTED"


class Internal(MoorageError):
    code = "INTERNAL"
