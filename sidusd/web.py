"""The web page of the room: every machine as a tile, live (read-only; issue 17, docs/operations.md).

Served by :class:`sidusd.monitoring.Monitoring` on the monitoring endpoint
(``metrics.address:port``, loopback by default) when ``web.enabled``:

* ``GET /``: the page (``sidusd/webui/index.html``), the room's state at
  load time inside it as JSON (:func:`sidusd.liveview.safe_json`: nothing a
  hostname or a file name holds can end the block);
* ``GET /room.js``, ``/room.css``: the page's script and style (package data,
  no build step, nothing fetched from elsewhere: works offline);
* ``GET /room.json``: the same state as the page's JSON;
* ``GET /machine?mac=aa:bb:..``: one machine's tile and timeline (only the
  fields of :data:`sidusd.liveview.SAFE_FIELDS`);
* ``GET /events``: server-sent events: ``room`` once, then ``machine`` (a tile
  that changed, at most once per ``PUSH_S`` per machine) and ``counters``
  (every ``COUNTERS_S``; with privilege separation after one ``sync`` of
  the worker, as a scrape does: one round trip per ``COUNTERS_S``, not per
  viewer).  At most ``MAX_SUBSCRIBERS`` streams; a client that does not read
  (its queue of ``QUEUE`` events full) is cut off, and its browser reconnects
  and starts over with a ``room``.

The script writes text only (``textContent``), never HTML, and the responses
carry a Content-Security-Policy that forbids any script but ``/room.js``.
Nothing secret is sent: of a host its MAC, hostname, profile and address, of
a timeline the safe fields; no kernel command line, no per-MAC config, no
iSCSI or CHAP secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from importlib import resources
from typing import Any

from aiohttp import web

from .boot.inventory import normalize_mac
from .liveview import client_summary, machines, page, room, sse, tile, transfers
from .net.http_up import target_files
from .observability import get_logger

PUSH_S = 1.0
COUNTERS_S = 2.0
KEEPALIVE_S = 15.0
MAX_SUBSCRIBERS = 8
QUEUE = 256
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
ASSETS = {"/room.js": ("room.js", "text/javascript"), "/room.css": ("room.css", "text/css")}


def asset(name: str) -> str:
    """A file of ``sidusd/webui`` (package data)."""
    return resources.files("sidusd").joinpath("webui", name).read_text(encoding="utf-8")


class WebRoom:
    """The page's routes and its event streams, fed by the observer (a listener, never per packet)."""

    def __init__(self, runtime: Any, services: dict[str, Any], transfers_of: Any):
        self.runtime, self.services, self.transfers_of = runtime, services, transfers_of
        self.log = get_logger("web")
        self.template = asset("index.html")
        self.assets = {path: (asset(name), ctype) for path, (name, ctype) in ASSETS.items()}
        self._subs: set[asyncio.Queue[bytes]] = set()
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/room.json", self._room_json)
        app.router.add_get("/machine", self._machine)
        app.router.add_get("/events", self._events)
        for path in self.assets:
            app.router.add_get(path, self._asset)

    # -- the state -----------------------------------------------------------------
    def _files(self, mac: str) -> tuple[str, str] | None:
        return target_files(self.runtime, mac)

    def rows(self, macs: set[str] | None = None) -> list[dict[str, Any]]:
        obs, inv = self.runtime.observer, self.runtime.inventory
        hosts = [{"mac": h.mac, "hostname": h.hostname, "profile": h.profile, "ip": h.ip}
                 for _, h in sorted(inv.hosts.items()) if macs is None or h.mac in macs]
        clients = [r.as_dict() for r in obs.clients.values() if macs is None or r.mac in macs]
        return machines(hosts, clients, time.time(), self._files)

    def state(self) -> dict[str, Any]:
        obs = self.runtime.observer
        ips = {r.ip: r.mac for r in obs.clients.values() if r.ip}
        rows: list[dict[str, Any]] = []
        for name, svc in self.services.items():
            with contextlib.suppress(Exception):
                rows += [{"service": name, **t} for t in svc.transfers()] if hasattr(svc, "transfers") else []
        return room(self.rows(), obs.snapshot(), transfers(rows, ips), self.transfers_of(), time.time())

    def on_event(self, mac: str, kind: str, entry: dict[str, Any]) -> None:
        if self._subs:
            self._dirty.add(mac)

    # -- pushing -------------------------------------------------------------------
    def start(self) -> None:
        self.runtime.observer.listeners.append(self.on_event)
        self._task = asyncio.get_running_loop().create_task(self._push())

    async def stop(self) -> None:
        if self.on_event in self.runtime.observer.listeners:
            self.runtime.observer.listeners.remove(self.on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for q in list(self._subs):             # end the event streams (their handlers return)
            self._subs.discard(q)
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(b"")

    def _send(self, data: bytes) -> None:
        for q in list(self._subs):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:          # a client that does not read: cut off (it reconnects)
                self._subs.discard(q)
                self.runtime.observer.count("web.slow_clients")
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(b"")

    async def _push(self) -> None:
        last_counters = 0.0
        while True:
            await asyncio.sleep(PUSH_S)
            if not self._subs:
                self._dirty.clear()
                continue
            try:
                if self._dirty:
                    macs, self._dirty = self._dirty, set()
                    for row in self.rows(macs):
                        self._send(sse("machine", tile(row)))
                if time.monotonic() - last_counters >= COUNTERS_S:
                    last_counters = time.monotonic()
                    sync = getattr(self.runtime, "sync_worker", None)
                    if sync is not None:      # privilege separation: the worker's transfers in flight now
                        await sync()
                    st = self.state()
                    self._send(sse("counters", {k: st[k] for k in ("now", "states", "counters", "transfers",
                                                                     "in_flight")}))
            except Exception as exc:  # noqa: BLE001 (the page must not stop the daemon)
                self.runtime.observer.count("web.errors")
                self.log.error("web.push_failed", error=repr(exc))

    # -- handlers ------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        self.runtime.observer.count("web.pages")
        return web.Response(text=page(self.template, self.state()), content_type="text/html", headers=HEADERS)

    async def _asset(self, request: web.Request) -> web.Response:
        text, ctype = self.assets[request.path]
        return web.Response(text=text, content_type=ctype, headers=HEADERS)

    async def _room_json(self, request: web.Request) -> web.Response:
        from .liveview import safe_json
        return web.Response(text=safe_json(self.state()), content_type="application/json", headers=HEADERS)

    async def _machine(self, request: web.Request) -> web.Response:
        from .liveview import safe_json
        try:
            mac = normalize_mac(request.rel_url.query.get("mac", "")[:64])
        except Exception:  # noqa: BLE001 (any bad MAC is a 400)
            return web.Response(status=400, text="bad mac\n", headers=HEADERS)
        rows = self.rows({mac})
        if not rows:
            return web.Response(status=404, text="no such machine\n", headers=HEADERS)
        rec = self.runtime.observer.clients.get(mac)
        if rec is not None:
            rows[0]["summary"] = client_summary(list(rec.timeline), self._files(mac), time.time())
        return web.Response(text=safe_json(rows[0]), content_type="application/json", headers=HEADERS)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if len(self._subs) >= MAX_SUBSCRIBERS:
            self.runtime.observer.count("web.refused")
            return web.Response(status=503, text="too many event streams\n", headers=HEADERS)
        q: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)
        resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self._subs.add(q)
        try:
            await resp.write(b"retry: 2000\n\n" + sse("room", self.state()))
            quiet = 0.0
            while q in self._subs or not q.empty():
                try:
                    data = await asyncio.wait_for(q.get(), 1.0)
                except TimeoutError:
                    # a viewer that went away frees its place within a second, not at the next write
                    if request.transport is None or request.transport.is_closing():
                        break
                    quiet += 1.0
                    if quiet < KEEPALIVE_S:
                        continue
                    data = b": keepalive\n\n"
                if not data:
                    break
                quiet = 0.0
                await resp.write(data)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._subs.discard(q)
        return resp
