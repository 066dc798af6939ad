"""S3's error vocabulary as data: which answers are worth another try, which mean "the object
exists" (a create-only write lost), and how to find the status and code behind what s3fs raises.
Pure (no I/O)."""

from __future__ import annotations

import contextlib

# S3 answers that are worth another try: throttling, server errors, a conditional write that
# raced another one (409 ConditionalRequestConflict: "retry the request")
RETRY_CODES = frozenset(
    {
        "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
        "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "ConditionalRequestConflict",
        "OperationAborted",
    }
)  # fmt: skip
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def s3_error(err: BaseException) -> tuple[int | None, str]:
    """The HTTP status and S3 error code behind an error (s3fs wraps botocore's ClientError in
    a builtin exception with the ClientError as its cause); (None, "") when there is none."""
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            break
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (status if isinstance(status, int) else None), str(
                resp["Error"].get("Code") or ""
            )
        e = e.__cause__ or e.__context__
    return None, ""


def precondition_failed(err: BaseException) -> bool:
    """A 412: the object a create-only write targets exists."""
    status, code = s3_error(err)
    return isinstance(err, FileExistsError) or status == 412 or code == "PreconditionFailed"


_TRANSPORT: tuple[type[BaseException], ...] | None = None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors of the connection rather than of the request: reset, refused, timed out, a body
    that broke off or was cut short, a reply that does not parse (throttling proxies)."""
    global _TRANSPORT
    if _TRANSPORT is None:
        import http.client
        import importlib

        found: list[type[BaseException]] = [
            ConnectionError,
            TimeoutError,
            http.client.IncompleteRead,
        ]
        for mod, names in (
            ("aiohttp", ("ClientError",)),
            (
                "botocore.exceptions",
                (
                    "HTTPClientError",
                    "ConnectionError",
                    "ResponseStreamingError",
                    "ResponseParserError",
                ),
            ),
            ("fsspec.exceptions", ("FSTimeoutError",)),
        ):
            with contextlib.suppress(ImportError):
                m = importlib.import_module(mod)
                found.extend(getattr(m, n) for n in names if hasattr(m, n))
        _TRANSPORT = tuple(found)
    return _TRANSPORT


def transient(err: BaseException) -> str | None:
    """Why ``err`` is worth another try ("503 SlowDown", "ServerDisconnectedError"...), or None
    if it is permanent (403, 404, 400, 412, a bug). An S3 answer decides by its status and code;
    otherwise the error or one of its causes must be a transport error."""
    status, code = s3_error(err)
    if status is not None or code:
        if status in RETRY_STATUS or code in RETRY_CODES:
            return f"{status} {code}".strip()
        return None
    return transport_reason(err)


def transport_reason(err: BaseException) -> str | None:
    """The name of the transport error behind ``err`` (it or one of its causes), or None: the
    transient failures every HTTP backend shares."""
    transport = _transport_errors()
    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, transport):
            return type(e).__name__
        e = e.__cause__ or e.__context__
    return None
