"""Credential redaction for third-party DEBUG logs.

botocore logs every request at DEBUG (``botocore.endpoint``: the headers, among them
``X-Amz-Security-Token``, the ``Authorization`` header with the access key id and the SSE-C
``x-amz-server-side-encryption-customer-key``; ``botocore.auth``: the canonical request with the
same headers; ``botocore.parsers``: response bodies, e.g. STS credentials), and s3fs logs the
keyword arguments of every call. A training job that turns on DEBUG for every logger must not
write credentials to its logs.

Where: at the making of each record. :func:`install` (called by ``import ckpt``; undone by
:func:`uninstall`) wraps the process's log record factory (``logging.setLogRecordFactory``,
chaining whatever factory was there), and a record whose logger is one of :data:`LOGGERS` or
below one of them, whenever that logger was created, has its message (and exception text)
rewritten with the values of credential-bearing fields replaced by ``<redacted>`` before any
filter or handler sees it. No filter is hung on anybody's logger, the user's own loggers are
never rewritten, and a record is never dropped. No secret value is known to the redaction: it
redacts by field name. :class:`RedactingFilter` does the same as a filter, for a handler of
one's own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

REDACTED = "<redacted>"

# field names whose value is a credential (case-insensitive); an SSE-C key's MD5 is not secret
_NAMES = (
    r"x-amz-security-token|securitytoken|sessiontoken|session_token|aws_session_token"
    r"|x-amz-(?:copy-source-)?server-side-encryption-customer-key(?!-md5)"
    r"|(?:copysource)?ssecustomerkey(?!md5)|secretaccesskey|secret_access_key|aws_secret_access_key"
    r"|accesskeyid|aws_access_key_id|secret|token|password|client_secret|account_key|sas_token"
)
_PATTERNS = (
    # 'Name': b'value'  /  "Name": "value"  /  Name=value  (dict and JSON reprs, query strings)
    re.compile(rf"""(?i)(?<![\w-])(['"]?(?:{_NAMES})['"]?\s*[:=]\s*b?)(['"])(.*?)(?<!\\)\2"""),
    # Name:value on a line of its own (botocore.auth's canonical request), Name: value headers
    re.compile(rf"(?im)^((?:{_NAMES})\s*:\s*)(\S+)$"),
    # <Name>value</Name> (XML response bodies, e.g. STS credentials)
    re.compile(rf"(?i)(<(?:{_NAMES})>)([^<]*)(</)"),
    # the access key id in a SigV4 Authorization header
    re.compile(r"(Credential=)([^/\s'\"]+)(/)"),
)

# the libraries ckpt drives that log request details at DEBUG: these loggers and all below them
LOGGERS = (
    "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "fsspec", "urllib3", "aiohttp",
    "gcsfs", "google.auth", "google.cloud", "google_auth_httplib2", "adlfs", "azure", "obstore",
    "requests",
)  # fmt: skip


def redact(text: str) -> str:
    """``text`` with the values of credential fields replaced by ``<redacted>``."""
    text = _PATTERNS[0].sub(lambda m: f"{m[1]}{m[2]}{REDACTED}{m[2]}", text)
    text = _PATTERNS[1].sub(lambda m: f"{m[1]}{REDACTED}", text)
    text = _PATTERNS[2].sub(lambda m: f"{m[1]}{REDACTED}{m[3]}", text)
    return _PATTERNS[3].sub(lambda m: f"{m[1]}{REDACTED}{m[3]}", text)


def clean(record: logging.LogRecord) -> None:
    """Rewrite ``record``'s message (and any exception text) with credentials redacted."""
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to the handler to report
        return
    redacted = redact(message)
    if redacted != message:
        record.msg, record.args = redacted, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)


class RedactingFilter(logging.Filter):
    """:func:`clean` as a logging filter (for a handler of one's own); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        clean(record)
        return True


class _Factory:
    """The record factory :func:`install` sets: the previous one, then :func:`clean` for the
    records of the covered loggers."""

    def __init__(self, previous: Callable[..., logging.LogRecord], names: tuple[str, ...]) -> None:
        self.previous = previous
        self.names = frozenset(names)
        self.prefixes = tuple(n + "." for n in names)

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        name = record.name
        if name in self.names or name.startswith(self.prefixes):
            clean(record)
        return record


def install(names: tuple[str, ...] = LOGGERS) -> None:
    """Redact the records of ``names`` and every logger below them, from now on (idempotent)."""
    current = logging.getLogRecordFactory()
    if isinstance(current, _Factory):
        if current.names == frozenset(names):
            return
        current = current.previous
    logging.setLogRecordFactory(_Factory(current, names))


def uninstall() -> None:
    """Stop redacting (if ckpt's factory is still the process's; another one set since is kept)."""
    current = logging.getLogRecordFactory()
    if isinstance(current, _Factory):
        logging.setLogRecordFactory(current.previous)
