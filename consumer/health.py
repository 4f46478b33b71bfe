"""``/metrics``, ``/healthz`` and ``/readyz`` for Prometheus and Kubernetes probes.

The server runs on a thread and event loop of its own, so it still answers — red — when the relay's loop
or the intake thread is stuck; a server on the relay's own loop would just time out, which a probe cannot
tell from a slow network.

* ``/healthz`` (liveness): the relay's event loop ticked recently and the intake thread polled Kafka
  recently. Red means restart me.
* ``/readyz`` (readiness): partitions are assigned, a broker is reachable, and no shop's circuit breaker
  is open. Red means I am alive but not moving events.

Each answers JSON ``{"status": "ok" | "failing", "problems": [...]}`` with 200 or 503.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Final

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import RelayMetrics

log = structlog.get_logger(__name__)

Checks = Callable[[], list[str]]

#: The paths served; the deployment's probes and scrape configuration (the Helm chart) name the same ones.
METRICS_PATH: Final = "/metrics"
LIVENESS_PATH: Final = "/healthz"
READINESS_PATH: Final = "/readyz"


class HealthServer:
    """Serves the relay's metrics and probes on ``host:port`` from a background thread."""

    def __init__(
        self, metrics: RelayMetrics, *, liveness: Checks, readiness: Checks, host: str, port: int
    ) -> None:
        self._metrics = metrics
        self._liveness = liveness
        self._readiness = readiness
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._started: Future[int] = Future()
        self._thread = threading.Thread(target=self._run, name="rr-health", daemon=True)
        self.port = port

    def start(self, timeout: float = 10.0) -> int:
        """Start serving; return the port (useful with port 0)."""
        self._thread.start()
        self.port = self._started.result(timeout)
        log.info(
            "health.listening",
            host=self._host,
            port=self.port,
            paths=[METRICS_PATH, LIVENESS_PATH, READINESS_PATH],
        )
        return self.port

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            port = loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001 - handed to start(), which raises it on the caller's thread
            self._started.set_exception(exc)
            loop.close()
            return
        self._started.set_result(port)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics_handler)
        app.router.add_get(LIVENESS_PATH, self._healthz)
        app.router.add_get(READINESS_PATH, self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        return int(self._runner.addresses[0][1])  # the bound port, also when 0 asked for a free one

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return self._probe(self._liveness)

    async def _readyz(self, _request: web.Request) -> web.Response:
        return self._probe(self._readiness)

    def _probe(self, checks: Checks) -> web.Response:
        problems = checks()
        body = {"status": "failing" if problems else "ok", "problems": problems}
        return web.Response(
            body=orjson.dumps(body), status=503 if problems else 200, content_type="application/json"
        )
