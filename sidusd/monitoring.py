"""The monitoring side of the daemon: boot history journal, boot metrics, the Prometheus endpoint.

Run by :func:`sidusd.services.serve_signals` in the process that holds the
state (the supervisor with privilege separation, else the one process): the
history is read back into the observer (:mod:`sidusd.history`), the boot
histograms listen to the observer (:mod:`sidusd.metrics`), and, with
``metrics.enabled``, ``GET /metrics`` is served on ``metrics.address:port``
(loopback by default; text exposition format 0.0.4 from prometheus_client).
With ``web.enabled`` the same endpoint serves the web page of the room
(``/``, ``/events``...: :mod:`sidusd.web`), with or without ``/metrics``.

The endpoint is small on purpose: GET/HEAD only (``/metrics`` and the page's paths), requests
bounded by aiohttp's limits (8 KiB lines, a 1 KiB body at most), a listen
backlog of ``MAX_CONNECTIONS``; it reads the observer and writes nothing.
With privilege separation a scrape first waits for the worker's report
(``Supervisor.sync``, as ``sidusctl status`` does), so the counters and the
transfers in flight are those of the moment of the scrape.  A port that cannot
be bound is logged (``metrics.listen_failed``) and the daemon keeps booting
machines: metrics are not worth a boot.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .history import HistoryJournal, history_path
from .metrics import make_registry
from .net.http_up import target_files
from .observability import get_logger
from .web import WebRoom

MAX_CONNECTIONS = 16


def transfers_of(services: dict[str, Any]) -> dict[str, int]:
    """Transfers in flight per service (``active_transfers()`` of those that have it)."""
    out: dict[str, int] = {}
    for name, svc in services.items():
        if hasattr(svc, "active_transfers"):
            try:
                out[name] = int(svc.active_transfers())
            except Exception:  # noqa: BLE001 (one broken service must not hide the others)
                continue
    return out


class Monitoring:
    """History + boot metrics + endpoint of one daemon; :meth:`start` then :meth:`stop`."""

    def __init__(self, runtime: Any, services: dict[str, Any]):
        self.runtime = runtime
        self.services = services
        self.log = get_logger("metrics")
        self.registry, self.boots = make_registry(runtime, lambda: transfers_of(self.services),
                                                  lambda mac: target_files(runtime, mac))
        self.history: HistoryJournal | None = None
        self._runner: web.AppRunner | None = None
        self.web: WebRoom | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        cfg = self.runtime.config
        obs = self.runtime.observer
        path = history_path(cfg)
        if path is not None:
            journal = HistoryJournal(path, obs)
            try:
                journal.load()
            except OSError as exc:
                obs.count("history.write_errors")
                self.log.error("history.load_failed", path=str(path), error=str(exc))
            else:
                journal.start()
                self.history = journal
        self.boots.seed(obs.clients)
        obs.listeners.append(self.boots.on_event)
        if cfg.web.enabled:
            self.web = WebRoom(self.runtime, self.services, lambda: transfers_of(self.services))
        if cfg.metrics.enabled or self.web is not None:
            await self._listen(str(cfg.metrics.address), int(cfg.metrics.port), cfg.metrics.enabled)

    async def _listen(self, address: str, port: int, metrics: bool = True) -> None:
        app = web.Application(client_max_size=1024)
        if metrics:
            app.router.add_get("/metrics", self._metrics)
        if self.web is not None:
            self.web.routes(app)
            self.web.start()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=15,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address, port, backlog=MAX_CONNECTIONS, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            self.runtime.observer.count("metrics.listen_errors")
            self.log.error("metrics.listen_failed", address=address, port=port, error=exc.strerror or str(exc))
            await self._runner.cleanup()
            self._runner = None
            return
        server = getattr(site, "_server", None)
        socks = getattr(server, "sockets", None) or []
        self.bound = socks[0].getsockname()[:2] if socks else (address, port)
        self.log.info("metrics.listening", address=self.bound[0], port=self.bound[1],
                      path="/metrics" if metrics else None, web=self.web is not None)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.runtime.observer.count("metrics.scrapes")
        sync = getattr(self.runtime, "sync_worker", None)
        if sync is not None:
            # privilege separation: the worker's counters and transfers in flight up to now
            # (one round trip per scrape, bounded by SYNC_TIMEOUT_S; never per packet)
            await sync()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self.boots.on_event in self.runtime.observer.listeners:
            self.runtime.observer.listeners.remove(self.boots.on_event)
        if self.web is not None:
            await self.web.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.history is not None:
            await self.history.aclose()
            self.history = None
