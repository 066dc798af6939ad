"""A fault-injecting S3 proxy: :class:`FaultProxy` is a :class:`~ckpt.testing.proxy.LatencyProxy`
that can answer chosen requests with S3 error replies, reset the connection, lose the response
after forwarding, truncate a body, hang, or strip request headers or query parameters (an
endpoint that ignores ``If-None-Match`` or ``ifGenerationMatch``). The error replies are S3's XML;
other clients go by their status. Faults are matched by method and path; see :class:`Fault`.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ckpt.testing.proxy import CHUNK, HOP_BY_HOP, LatencyProxy

# --- fault injection ---------------------------------------------------------------------------

# S3 error replies a Fault can send: action -> (status, S3 error code, message)
S3_ERRORS: dict[str, tuple[int, str, str]] = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "conflict": (409, "ConditionalRequestConflict", "A conflicting operation occurred. Please retry."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
# what a Fault can do besides an error reply
FAULT_ACTIONS = frozenset(S3_ERRORS) | {"reset", "lost_response", "truncate", "hang"}


@dataclass
class Fault:
    """One fault-injection rule of a :class:`FaultProxy`.

    A request matches when its method is ``method`` (None: any), ``path`` is a substring of its
    path, ``query`` a substring of its raw query string and ``not_query`` is not (``query="uploadId="``
    with method POST is CompleteMultipartUpload; ``query="uploads", not_query="uploadId"`` is
    CreateMultipartUpload; ``query="partNumber="`` is UploadPart). Of the matches, the fault hits
    the ``nth`` one (1-based) if given, else each with ``probability`` (seeded by ``seed``), else
    every one; at most ``limit`` times in all if given. A hit also hits the next ``burst - 1``
    matches (aiohttp retries an idempotent request once by itself when a reused connection
    drops: ``burst=2`` gets a reset past that retry to the client's own retry layer).

    Actions: ``slowdown`` (503 SlowDown), ``internal`` (500 InternalError), ``conflict`` (409
    ConditionalRequestConflict), ``denied`` (403 AccessDenied), each with an S3 XML error body and
    without forwarding; ``reset``: the connection is closed before anything is forwarded;
    ``lost_response``: the request is forwarded and answered upstream (a write lands), then the
    connection is closed without a reply; ``truncate``: a GET is forwarded, its headers sent with
    the full Content-Length, then ``truncate_fraction`` of the body, then the connection closes;
    ``hang``: sleep ``hang_s``, then forward as usual.
    """

    action: str
    method: str | None = None
    path: str | None = None
    query: str | None = None
    not_query: str | None = None
    probability: float | None = None
    nth: int | None = None
    limit: int | None = None
    seed: int = 0
    hang_s: float = 0.0
    truncate_fraction: float = 0.5
    burst: int = 1
    matched: int = 0  # requests matched so far
    injected: int = 0  # faults injected so far
    _rng: random.Random = field(init=False, repr=False)
    _burst_left: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; one of {sorted(FAULT_ACTIONS)}")
        self._rng = random.Random(self.seed)

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            (self.method is None or method == self.method)
            and (self.path is None or self.path in path)
            and (self.query is None or self.query in query)
            and (self.not_query is None or self.not_query not in query)
        )

    def decide(self) -> bool:
        """Count one match; whether the fault hits it (call under the proxy's lock)."""
        self.matched += 1
        if self.limit is not None and self.injected >= self.limit:
            return False
        if self._burst_left > 0:
            self._burst_left -= 1
            self.injected += 1
            return True
        if self.nth is not None:
            hit = self.matched == self.nth
        elif self.probability is not None:
            hit = self._rng.random() < self.probability
        else:
            hit = True
        if hit:
            self.injected += 1
            self._burst_left = self.burst - 1
        return hit


@dataclass(frozen=True)
class Injection:
    """A fault that was injected: what, on which request, when (monotonic seconds)."""

    action: str
    method: str
    path: str
    query: str
    at: float


class FaultProxy(LatencyProxy):
    """A :class:`LatencyProxy` that injects faults into the requests it forwards (rules:
    :class:`Fault`, the first matching rule that decides to hit wins) and can strip request
    headers (``strip_headers``: e.g. ``("If-None-Match",)`` makes moto an endpoint without
    conditional writes) or query parameters (``strip_query``: ``("ifGenerationMatch",)`` makes
    fake-gcs-server one, like gcp-storage-emulator). ``injected`` records every fault; ``injected_counts`` counts them by
    action. Rules may be added or replaced while it runs (``proxy.faults = [...]``)."""

    def __init__(
        self,
        upstream: str,
        faults: list[Fault] | None = None,
        *,
        strip_headers: tuple[str, ...] = (),
        strip_query: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(upstream, **kwargs)
        self.faults: list[Fault] = list(faults or [])
        self.strip_headers = tuple(h.lower() for h in strip_headers)
        self.strip_query = frozenset(strip_query)
        self.injected: list[Injection] = []

    def start(self) -> FaultProxy:
        super().start()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    @property
    def injected_counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for i in self.injected:
                out[i.action] = out.get(i.action, 0) + 1
            return out

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.injected.clear()

    def _request_headers(self, request: web.Request) -> list[tuple[str, str]]:
        return [(k, v) for k, v in super()._request_headers(request) if k.lower() not in self.strip_headers]

    def _upstream_url(self, request: web.Request) -> URL:
        url = super()._upstream_url(request)
        if not self.strip_query or not any(k in self.strip_query for k in url.query):
            return url
        return url.with_query([(k, v) for k, v in url.query.items() if k not in self.strip_query])

    def _pick(self, request: web.Request) -> Fault | None:
        method, path, query = request.method, request.path, request.query_string
        with self._lock:
            for rule in self.faults:
                if rule.matches(method, path, query) and rule.decide():
                    self.injected.append(Injection(rule.action, method, path, query, time.monotonic()))
                    return rule
        return None

    async def _forward(self, session: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        rule = self._pick(request)
        if rule is None:
            return await super()._forward(session, request)
        if rule.action in S3_ERRORS:
            await self._drain(request)
            status, code, message = S3_ERRORS[rule.action]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>{request.path}</Resource><RequestId>ckpt-fault</RequestId></Error>"
            )
            return web.Response(
                status=status, body=None if request.method == "HEAD" else body.encode(),
                content_type="application/xml",
            )  # fmt: skip
        if rule.action == "hang":
            await asyncio.sleep(rule.hang_s)
            return await super()._forward(session, request)
        if rule.action == "reset":
            return self._abort(request)
        # forwarded, then cut: the whole reply lost, or a GET body cut short
        payload = self._relay_body(request) if request.body_exists else None
        headers = self._request_headers(request)
        if request.body_exists and request.content_length is None:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        async with session.request(
            request.method, self._upstream_url(request), headers=headers, data=payload, allow_redirects=False
        ) as up:
            if rule.action == "lost_response" or request.method != "GET" or up.status >= 300:
                await up.read()  # the upstream finished the request: a write has landed
                return self._abort(request)
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            length = int(up.headers.get("Content-Length") or 0)
            keep = min(max(int(length * rule.truncate_fraction), 0), max(length - 1, 0))
            await resp.prepare(request)
            sent = 0
            async for chunk in up.content.iter_chunked(CHUNK):
                take = chunk[: keep - sent]
                if take:
                    await resp.write(take)
                    sent += len(take)
                if sent >= keep:
                    break
            if request.transport is not None:
                request.transport.close()  # what was written goes out, then the connection ends
            return resp

    @staticmethod
    async def _drain(request: web.Request) -> None:
        if request.body_exists:
            async for _ in request.content.iter_chunked(CHUNK):
                pass

    @staticmethod
    def _abort(request: web.Request) -> web.StreamResponse:
        """Close the client's connection at once, with no reply."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)  # never sent: the connection is gone
