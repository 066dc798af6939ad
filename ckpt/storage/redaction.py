"""Credential redaction for third-party DEBUG logs.

botocore logs every request at DEBUG (``botocore.endpoint``: the headers, among them
``X-Amz-Security-Token``, the ``Authorization`` header with the access key id and the SSE-C
``x-amz-server-side-encryption-customer-key``; ``botocore.auth``: the canonical request with the
same headers; ``botocore.parsers``: response bodies, e.g. STS credentials), and s3fs logs the
keyword arguments of every call. A training job that turns on DEBUG for every logger must not
write credentials to its logs, so :func:`install` puts a :class:`RedactingFilter` on those
loggers. It rewrites a record's message with the values of credential-bearing fields replaced
by ``<redacted>``; it never drops a record. No secret value is known to the filter: it redacts by
field name.
"""

from __future__ import annotations

import logging
import re

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

# loggers of the libraries ckpt drives that log request details at DEBUG
LOGGERS = (
    "botocore", "botocore.endpoint", "botocore.auth", "botocore.parsers", "botocore.hooks",
    "botocore.credentials", "botocore.utils", "botocore.retryhandler", "botocore.httpsession",
    "botocore.client", "botocore.awsrequest", "botocore.regions", "botocore.handlers",
    "aiobotocore", "aiobotocore.endpoint", "aiobotocore.credentials", "aiobotocore.httpsession",
    "aiobotocore.client", "aiobotocore.regions", "s3fs", "fsspec", "urllib3",
    "urllib3.connectionpool", "aiohttp.client",
)  # fmt: skip


def redact(text: str) -> str:
    """``text`` with the values of credential fields replaced by ``<redacted>``."""
    text = _PATTERNS[0].sub(lambda m: f"{m[1]}{m[2]}{REDACTED}{m[2]}", text)
    text = _PATTERNS[1].sub(lambda m: f"{m[1]}{REDACTED}", text)
    text = _PATTERNS[2].sub(lambda m: f"{m[1]}{REDACTED}{m[3]}", text)
    return _PATTERNS[3].sub(lambda m: f"{m[1]}{REDACTED}{m[3]}", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and any exception text) with credentials redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()


def install(names: tuple[str, ...] = LOGGERS) -> None:
    """Put the redacting filter on ``names`` and on every existing logger below them (once)."""
    prefixes = tuple(n + "." for n in names)
    existing = [
        n for n in list(logging.Logger.manager.loggerDict) if n in names or n.startswith(prefixes)
    ]
    for name in {*names, *existing}:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
