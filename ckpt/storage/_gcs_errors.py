"""Google Cloud Storage's error vocabulary as data: which answers are worth another try, which
mean "the object exists" (a create-only write lost), and the typed error ckpt raises for an
answer of the JSON API. Pure (no I/O)."""

from __future__ import annotations

import json

from ckpt.storage._s3_errors import transport_reason

# GCS answers worth another try (https://cloud.google.com/storage/docs/retry-strategy):
# request timeout, rate limits, server errors
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class GcsError(Exception):
    """A JSON-API answer of 4xx/5xx other than 404 (FileNotFoundError) and 412
    (FileExistsError): its status and GCS's reason and message (never a credential)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason


class IncompleteChunk(Exception):
    """A resumable upload took fewer bytes of a chunk than were sent (308 with a shorter
    range): the rest is sent again."""


def answer_error(status: int, body: bytes, what: str) -> Exception:
    """The exception for an error answer ``status`` with ``body`` to a request about ``what``."""
    if status == 404:
        return FileNotFoundError(what)
    if status == 412:
        return FileExistsError(f"{what}: an object is there (precondition failed)")
    reason, message = "", body[:300].decode(errors="replace")
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message", ""))
            errors = error.get("errors")
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                reason = str(errors[0].get("reason", ""))
    except (ValueError, AttributeError):
        pass
    return GcsError(status, reason, message)


def transient(err: BaseException) -> str | None:
    """Why ``err`` is worth another try ("503 backendError", "ServerDisconnectedError"...), or
    None if it is permanent (403, 404, 400, 412, a bug)."""
    if isinstance(err, GcsError):
        return f"{err.status} {err.reason}".strip() if err.status in RETRY_STATUS else None
    if isinstance(err, IncompleteChunk):
        return "incomplete chunk"
    if isinstance(err, FileNotFoundError | FileExistsError):
        return None
    return transport_reason(err)
