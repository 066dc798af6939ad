"""Azure Blob Storage's error vocabulary as data: which answers are worth another try, which mean
"a blob is there" (a create-only write lost) or "no such blob", and how to find the status and
error code behind what the Azure SDK raises. Pure (no I/O)."""

from __future__ import annotations

import contextlib
from enum import Enum

from ckpt.storage._s3_errors import transient as _transport_reason

# Azure answers worth another try: the service is busy or timed out, or failed inside
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError"})
# "a blob is there": If-None-Match: * refused (409 BlobAlreadyExists; 412 ConditionNotMet where
# a precondition is answered the HTTP way)
EXISTS_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet"})

_TRANSPORT: tuple[type[BaseException], ...] | None = None


def azure_error(err: BaseException) -> tuple[int | None, str]:
    """The HTTP status and Azure error code behind an error (it or one of its causes carries the
    SDK's ``status_code`` and the ``x-ms-error-code`` header); (None, "") when there is none."""
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            break
        status = getattr(e, "status_code", None)
        if isinstance(status, int):
            headers = getattr(getattr(e, "response", None), "headers", None) or {}
            code = headers.get("x-ms-error-code") or getattr(e, "error_code", None) or ""
            return status, str(code.value if isinstance(code, Enum) else code)
        e = e.__cause__ or e.__context__
    return None, ""


def precondition_failed(err: BaseException) -> bool:
    """A create-only write refused because a blob is there (409 BlobAlreadyExists, 412)."""
    status, code = azure_error(err)
    return status == 412 or code in EXISTS_CODES


def not_found(err: BaseException) -> bool:
    """No such blob or container (404: BlobNotFound, ContainerNotFound)."""
    return azure_error(err)[0] == 404


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The SDK's errors of the connection rather than of the request: not sent or not answered
    (``ServiceRequestError``, ``ServiceResponseError`` and their timeouts), a body cut short
    (``IncompleteReadError``, whose status is the 200/206 that began it)."""
    global _TRANSPORT
    if _TRANSPORT is None:
        found: list[type[BaseException]] = []
        with contextlib.suppress(ImportError):
            from azure.core import exceptions as ex

            found += [ex.ServiceRequestError, ex.ServiceResponseError, ex.IncompleteReadError]
        _TRANSPORT = tuple(found)
    return _TRANSPORT


def transient(err: BaseException) -> str | None:
    """Why ``err`` is worth another try ("503 ServerBusy", "ServiceResponseError"...), or None if
    it is permanent (403, 404, 409, 412, 400, a bug). A broken connection decides first (a body
    cut short carries the status that began it); then an Azure answer by its status and code;
    otherwise the error or one of its causes must be a transport error (the SDK's, or aiohttp's
    and the OS's: the vocabulary the S3 backend shares)."""
    transport = _transport_errors()
    if isinstance(err, transport):
        return type(err).__name__
    status, code = azure_error(err)
    if status is not None:
        if status in RETRY_STATUS or code in RETRY_CODES:
            return f"{status} {code}".strip()
        return None
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            break
        if isinstance(e, transport):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return _transport_reason(err)
