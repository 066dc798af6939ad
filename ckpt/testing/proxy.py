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

Requests are counted by method: ``LatencyProxy.counts`` in process (and each one is remembered,
``LatencyProxy.seen``: method, path and the checksum headers of the last 100,000; the same in
arrival order as text, ``LatencyProxy.requests``: ``"GET /bucket/key?query"``), ``GET /__proxy_stats``
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
import collections
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

STATS_PATH = "/__proxy_stats"
CHUNK = 1 << 18  # streaming granularity (and pacing step under a bandwidth cap)
HOP_BY_HOP = frozenset(
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


#: request headers ``LatencyProxy.seen`` keeps: how the client checksummed and signed the body
SEEN_HEADERS = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-content-sha256", "x-amz-trailer")


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the proxy forwarded: its method, path (no query) and checksum headers."""

    method: str
    path: str
    headers: dict[str, str]
    raw_path: str = ""  # path and query, as sent


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
        self._seen: collections.deque[Seen] = collections.deque(maxlen=100_000)
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
    def seen(self) -> list[Seen]:
        """The requests forwarded since the last reset, oldest first (a snapshot)."""
        with self._lock:
            return list(self._seen)

    @property
    def requests(self) -> list[str]:
        """The requests forwarded since the last reset, in arrival order: method, raw path and
        query (``"HEAD /bucket/run/steps/000000000001/manifest.json"``)."""
        return [f"{s.method} {s.raw_path}" for s in self.seen]

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
            self._seen.clear()
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
            kept = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith(SEEN_HEADERS)}
            with self._lock:
                self._counts[request.method] = self._counts.get(request.method, 0) + 1
                self._seen.append(Seen(request.method, request.path, kept, request.raw_path))
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
        return [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"]

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
        url = self._upstream_url(request)
        pace = _Pacer(self.bandwidth_bps)
        try:
            async with session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            ) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers.add(k, v)
                await resp.prepare(request)
                if request.method != "HEAD":
                    async for chunk in up.content.iter_chunked(CHUNK):
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
        async for chunk in request.content.iter_chunked(CHUNK):
            await pace(len(chunk))
            self._add_bytes(n_in=len(chunk))
            yield chunk

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
