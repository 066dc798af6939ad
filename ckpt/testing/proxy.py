"""A latency-injecting HTTP reverse proxy on loopback, for measuring S3 clients on one machine.

    python -m ckpt.testing.proxy --upstream http://127.0.0.1:5000 --latency-ms 20 [--bandwidth 100e6]

It listens on 127.0.0.1 (port 0 unless ``--port``), prints its URL on the first line of stdout
and forwards every request to ``--upstream`` after sleeping ``--latency-ms``: a stand-in for
the round trip to a real bucket (BENCHMARKS.md, S3). Bodies stream both ways (large PUTs,
ranged GETs); the method, the raw path and query, and every end-to-end header are forwarded
unchanged, the Host header included, so SigV4 signatures (made for the proxy's host:port) stay
valid. ``Expect: 100-continue`` is answered by the proxy itself and not forwarded (SigV4 never
signs it). ``--bandwidth`` caps each connection's transfer rate in bytes/s, each direction
(requests on one HTTP/1.1 connection are sequential, so the cap is applied per request).

Requests are counted by method: ``LatencyProxy.counts`` in process, ``GET /__proxy_stats``
(JSON: ``{"requests": {method: n}, "total": n, "bytes_in": n, "bytes_out": n}``) over HTTP;
``POST /__proxy_stats/reset`` zeroes them. Requests to ``/__proxy_stats`` are not counted.

In process::

    with LatencyProxy("http://127.0.0.1:5000", latency_ms=20) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, ...)
        ...
        proxy.counts  # {"GET": 3, "PUT": 1}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

STATS_PATH = "/__proxy_stats"
_CHUNK = 1 << 18  # streaming granularity (and pacing step under a bandwidth cap)
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    }
)  # fmt: skip


class _Pacer:
    """Sleeps so that the bytes passed through stay under ``rate`` bytes/s since creation."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    async def __call__(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            await asyncio.sleep(ahead)


class LatencyProxy:
    """The proxy, served from its own event loop in a background thread."""

    def __init__(
        self,
        upstream: str,
        *,
        latency_ms: float = 0.0,
        bandwidth_bps: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log: bool = False,
    ) -> None:
        self.upstream = URL(upstream.rstrip("/"))
        self.latency_s = latency_ms / 1000.0
        self.bandwidth_bps = bandwidth_bps or None
        self.host = host
        self.port = port
        self.log = log  # one line per request on stderr: method, path, status, bytes, seconds
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._bytes_in = 0
        self._bytes_out = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- counters ------------------------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        """Requests forwarded so far, by HTTP method (a snapshot)."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._counts),
                "total": sum(self._counts.values()),
                "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out,
            }

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._bytes_in = self._bytes_out = 0

    def _add_bytes(self, n_in: int = 0, n_out: int = 0) -> None:
        with self._lock:
            self._bytes_in += n_in
            self._bytes_out += n_out

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LatencyProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"proxy failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # reported by start() if it happened before ready
            self._error = err
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            read_bufsize=1 << 20,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handler(session))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = int(runner.addresses[0][1])
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await session.close()

    # --- forwarding ------------------------------------------------------------------------------

    def _handler(self, session: aiohttp.ClientSession) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == STATS_PATH or request.path.startswith(STATS_PATH + "/"):
                return self._stats_response(request)
            with self._lock:
                self._counts[request.method] = self._counts.get(request.method, 0) + 1
            t0 = time.monotonic()
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            resp = await self._forward(session, request)
            if self.log:
                print(
                    f"proxy: {request.method} {request.raw_path[:120]} -> {resp.status} "
                    f"in={request.content_length or 0} out={resp.headers.get('Content-Length', '?')} "
                    f"{time.monotonic() - t0:.3f}s",
                    file=sys.stderr,
                    flush=True,
                )
            return resp

        return handle

    def _stats_response(self, request: web.Request) -> web.Response:
        if request.path == STATS_PATH + "/reset" and request.method == "POST":
            self.reset()
        elif request.path != STATS_PATH or request.method != "GET":
            return web.Response(status=404)
        return web.json_response(self.stats())

    def _request_headers(self, request: web.Request) -> list[tuple[str, str]]:
        """The headers forwarded upstream: every end-to-end one but ``Expect``."""
        return [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"]

    def _upstream_url(self, request: web.Request) -> URL:
        target = self.upstream.with_path(self.upstream.path.rstrip("/"), encoded=True)
        return URL(str(target) + request.raw_path, encoded=True)  # raw path+query: the signed bytes

    async def _forward(self, session: aiohttp.ClientSession, request: web.Request) -> web.StreamResponse:
        headers = self._request_headers(request)
        body: AsyncIterator[bytes] | None = None
        if request.body_exists:
            body = self._relay_body(request)
            if request.content_length is None:  # chunked in: chunked out
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        target = self.upstream.with_path(self.upstream.path.rstrip("/"), encoded=True)
        url = URL(str(target) + request.raw_path, encoded=True)  # raw path+query: the signed bytes
        pace = _Pacer(self.bandwidth_bps)
        try:
            async with session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        resp.headers.add(k, v)
                await resp.prepare(request)
                if request.method != "HEAD":
                    async for chunk in up.content.iter_chunked(_CHUNK):
                        await pace(len(chunk))
                        await resp.write(chunk)
                        self._add_bytes(n_out=len(chunk))
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as err:
            if "resp" in locals():  # the response already started: nothing sane to send
                raise
            return web.Response(status=502, text=f"proxy: upstream failed: {type(err).__name__}: {err}")

    async def _relay_body(self, request: web.Request) -> AsyncIterator[bytes]:
        pace = _Pacer(self.bandwidth_bps)
        async for chunk in request.content.iter_chunked(_CHUNK):
            await pace(len(chunk))
            self._add_bytes(n_in=len(chunk))
            yield chunk

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
    conditional writes). ``injected`` records every fault; ``injected_counts`` counts them by
    action. Rules may be added or replaced while it runs (``proxy.faults = [...]``)."""

    def __init__(
        self,
        upstream: str,
        faults: list[Fault] | None = None,
        *,
        strip_headers: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(upstream, **kwargs)
        self.faults: list[Fault] = list(faults or [])
        self.strip_headers = tuple(h.lower() for h in strip_headers)
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
                if k.lower() not in _HOP_BY_HOP:
                    resp.headers.add(k, v)
            length = int(up.headers.get("Content-Length") or 0)
            keep = min(max(int(length * rule.truncate_fraction), 0), max(length - 1, 0))
            await resp.prepare(request)
            sent = 0
            async for chunk in up.content.iter_chunked(_CHUNK):
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
            async for _ in request.content.iter_chunked(_CHUNK):
                pass

    @staticmethod
    def _abort(request: web.Request) -> web.StreamResponse:
        """Close the client's connection at once, with no reply."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)  # never sent: the connection is gone



def fetch_stats(proxy_url: str, *, reset: bool = False) -> dict[str, Any]:
    """Read (and optionally zero) a proxy's counters over HTTP."""
    import urllib.request

    req = urllib.request.Request(
        proxy_url.rstrip("/") + STATS_PATH + ("/reset" if reset else ""), method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="the S3 endpoint URL, e.g. http://127.0.0.1:5000")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="delay added to every request")
    ap.add_argument("--bandwidth", type=float, default=None, help="per-connection cap, bytes/s (each direction)")
    ap.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--log", action="store_true", help="print one line per request on stderr")
    args = ap.parse_args(argv)
    host = URL(args.upstream).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("--upstream must be a loopback address")
    proxy = LatencyProxy(
        args.upstream, latency_ms=args.latency_ms, bandwidth_bps=args.bandwidth, port=args.port, log=args.log
    )
    proxy.start()
    print(proxy.url, flush=True)
    print(
        f"proxy {proxy.url} -> {args.upstream}, +{args.latency_ms:g} ms/request"
        + (f", {args.bandwidth:g} B/s per connection" if args.bandwidth else ""),
        file=sys.stderr,
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not done.wait(0.5):
            pass
    proxy.stop()
    print(json.dumps(proxy.stats()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
