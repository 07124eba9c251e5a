"""kvcdn's exception hierarchy and its one mapping onto gRPC status codes.

```
KVCDNError                      base; `.code` is the gRPC status it travels as
├── NotFound                    NOT_FOUND            unknown block key or document
├── InvalidArgument             INVALID_ARGUMENT     malformed request or input
├── FingerprintMismatch         FAILED_PRECONDITION  caller's model differs from the server's
├── LimitExceeded               RESOURCE_EXHAUSTED   over a configured limit
├── Unavailable                 UNAVAILABLE          origin or peer unreachable (retryable)
├── DigestMismatch              DATA_LOSS            bytes do not match their digest (or their signature)
├── Unauthenticated             UNAUTHENTICATED      no credentials, or unknown ones
├── PermissionDenied            PERMISSION_DENIED    credentials whose role may not call the method
└── DeadlineExceeded            DEADLINE_EXCEEDED    the call ran past its deadline
```

Servers abort with `exc.code` and `str(exc)`, and send `exc.trailers` as trailing metadata (a refused
priced load says there what would pay: kvcdn.spec.prices); clients turn a `grpc.RpcError` back into the same class
with `from_rpc_error`, so callers catch domain errors, never transport ones. A call the other side
cancelled (CANCELLED, e.g. a server going away mid-call) arrives as Unavailable: retryable elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc

__all__ = [
    "DeadlineExceeded",
    "DigestMismatch",
    "FingerprintMismatch",
    "InvalidArgument",
    "KVCDNError",
    "LimitExceeded",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "error_for",
    "from_rpc_error",
]


class KVCDNError(Exception):
    """Base of every error kvcdn raises on purpose."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, *args: object, trailers: Mapping[str, str | bytes] | None = None) -> None:
        super().__init__(*args)
        self.trailers: dict[str, str | bytes] = dict(trailers or {})
        """Trailing metadata the error travels with (keys ending `-bin` carry bytes)."""


class NotFound(KVCDNError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(KVCDNError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FingerprintMismatch(KVCDNError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class LimitExceeded(KVCDNError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KVCDNError):
    code = grpc.StatusCode.UNAVAILABLE


class DigestMismatch(KVCDNError):
    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(KVCDNError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(KVCDNError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVCDNError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[KVCDNError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        InvalidArgument,
        FingerprintMismatch,
        LimitExceeded,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DigestMismatch,
        DeadlineExceeded,
    )
}


def from_rpc_error(err: grpc.RpcError, peer: str) -> KVCDNError:
    """The typed error for a failed call to `peer`; unknown codes become a plain KVCDNError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    exc = error_for(code, details, peer)
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    exc.trailers = {k: v for k, v in trailing or () if k.startswith(("kvcdn-", "payment-"))}
    return exc


def error_for(code: grpc.StatusCode, details: str, peer: str) -> KVCDNError:
    """The typed error for status `code` reported by `peer`."""
    cls = Unavailable if code == grpc.StatusCode.CANCELLED else _BY_CODE.get(code, KVCDNError)
    exc = cls(f"{peer}: {details}" if details else f"{peer}: {code.name}")
    if cls is KVCDNError:
        exc.args = (f"{peer}: {code.name}: {details}",)
    return exc
