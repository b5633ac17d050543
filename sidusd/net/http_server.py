"""The HTTP boot edge: iPXE scripts, kernels and initrds over HTTP/1.1 (RFC 9110, RFC 9112).

iPXE (after a chainload, or as the NIC's own ROM) fetches
``http://<server>:<http.port>/boot/<mac>.ipxe`` and then the kernel and the
initrd that script names; UEFI HTTP boot fetches its boot file by URL.  The
names mean exactly what they mean over TFTP: the URL path (percent-decoded,
strict UTF-8, query ignored) is decided by ``runtime.provide`` (one decision
for TFTP and HTTP, :mod:`sidusd.boot.provider`): a file below ``tftp.root``,
opened with ``await io.open_file(root, parts)`` (any symlink refused), a
document rendered per MAC, or a refusal, mapped to a status by
:data:`REFUSALS`.  Connections are admitted by :mod:`sidusd.net.http_conns`.

* HTTP parsing is aiohttp's (its low-level :class:`aiohttp.web.Server`); this
  module only decides and sends.  GET and HEAD (others: 405), one byte range
  ``bytes=a-b`` / ``a-`` / ``-n`` (206 + Content-Range, 416 when unsatisfiable;
  a multi-range or malformed Range is ignored and the whole file sent, as RFC
  9110 section 14.2 allows), ``Last-Modified`` + ``ETag`` for files,
  ``Cache-Control: no-store`` for rendered documents (they change on reload).
* Files go out with ``loop.sendfile`` (``sendfile(2)``), in chunks of
  ``SEND_CHUNK`` bytes, each with ``idle_timeout_s``: a client that stops
  reading is cut after that long without progress.
* Bounded (``http.max_connections``, ``max_per_client``, ``idle_timeout_s``,
  ``header_timeout_s``; new connections after a reload): ``max_per_client`` per client IP
  (over it: ``503`` + ``Retry-After``, closed unparsed) and ``max_connections`` in all; when
  every slot is taken a newcomer takes one back if it can (:meth:`~.http_conns.Slots.victim`):
  a slowloris only evicts itself.  No first request in ``header_timeout_s``, or idle or not
  reading for ``idle_timeout_s``: closed.
* Every response ends with one ``http.transfer`` log event (rate limited: ``self.rlog``)
  and, when the MAC is known, an ``http`` entry in its boot timeline (``sidusctl clients``).
  ``/up``: machines that report they are up (:mod:`.http_up`).
Counters (``http.``): requests, connections, malformed, refused.<busy|per_client|stopping|reset|method|
encoding|name|not_found|access|range>, evicted.<idle|busy>, transfers.done/failed, bytes, ranges,
timeouts.<header|idle|send>, read_errors, internal_errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from email.utils import formatdate
from typing import Any

from aiohttp import web

from ..boot import provider
from ..errors import StartupError
from ..observability import LogLimiter, get_logger
from ..proto.http import RangeNotSatisfiable, parse_range, request_name
from ..runtime_view import RuntimeView
from .files import NotServable
from .http_conns import Gate as _Gate  # (names as in start(), which binds the listener)
from .http_conns import ParserLog as _ParserLog
from .http_conns import Server as _Server
from .http_conns import Slots
from .http_up import UP_PATH, UpReports
from .io import ServiceIO, local_io

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_PER_CLIENT = 32
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
SEND_CHUNK = 1 << 20          # bytes per sendfile() call, each bounded by idle_timeout_s

# provider.Refusal code -> (status (RFC 9110 section 15), counter http.refused.<reason>, body text)
REFUSALS: dict[str, tuple[int, str | None, str]] = {
    provider.NAME: (403, "name", "forbidden: {reason}"),
    provider.NOT_FOUND: (404, "not_found", "not found"),
    provider.ACCESS: (403, "access", "forbidden"),
    provider.INTERNAL: (500, None, "internal error"),
}


class _Record:
    """What one response did, for its ``http.transfer`` event."""

    __slots__ = ("file", "mac", "status", "bytes", "size", "range", "outcome")

    def __init__(self) -> None:
        self.file: str | None = None
        self.mac: str | None = None
        self.status = 0
        self.bytes = 0
        self.size: int | None = None
        self.range: str | None = None
        self.outcome = "ok"


class HttpService:
    """HTTP boot server on ``http.address:http.port``, serving ``tftp.root`` and rendered scripts."""

    def __init__(self, runtime: RuntimeView, io: ServiceIO | None = None, max_connections: int | None = None,
                 max_per_client: int | None = None, idle_timeout_s: float | None = None,
                 header_timeout_s: float | None = None):
        self.runtime = runtime
        self.io = io if io is not None else local_io()     # how files are opened (await io.open_file)
        # None: the value of the live config (``http.max_connections`` ...), so a
        # reload changes the limits for what comes next; a number pins it (tests).
        self._fixed = dict(max_connections=max_connections, max_per_client=max_per_client,
                           idle_timeout_s=idle_timeout_s, header_timeout_s=header_timeout_s)
        self.log = get_logger("http")
        self.rlog = LogLimiter(self.log)      # every line a peer can cause goes through it
        self.slots = Slots()                  # the admitted connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._bound: tuple[str, int] | None = None
        self._watchdog: asyncio.Task | None = None
        self._stopping, self._active, self._refusing = False, 0, 0
        self._idle = asyncio.Event()
        self.up_reports = UpReports(runtime, self.log)        # /up: machines that report (http_up.py)

    def _limit(self, name: str, default: float) -> Any:
        fixed = self._fixed[name]
        return fixed if fixed is not None else getattr(self.runtime.config.http, name, default)

    @property
    def max_connections(self) -> int:
        """Open connections at most (``http.max_connections``); over it: 503."""
        return int(self._limit("max_connections", DEFAULT_MAX_CONNECTIONS))

    @property
    def max_per_client(self) -> int:
        """Open connections from one client IP at most (``http.max_per_client``); over it: 503."""
        return int(self._limit("max_per_client", DEFAULT_MAX_PER_CLIENT))

    @property
    def idle_timeout_s(self) -> float:
        """Seconds without progress before a connection is cut (``http.idle_timeout_s``)."""
        return float(self._limit("idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S))

    @property
    def header_timeout_s(self) -> float:
        """Seconds a new connection has to send its first complete request headers (``http.header_timeout_s``)."""
        return float(self._limit("header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Listen; raises :class:`StartupError` if the address cannot be bound."""
        self._loop = asyncio.get_running_loop()
        cfg = self.runtime.config.http
        # aiohttp's own keep-alive timer is only a backstop: the watchdog closes idle connections
        # (after the largest idle_timeout_s a reload may set)
        self._server = _Server(self, keepalive_timeout=2 * max(self.idle_timeout_s, 3600.0) + 10, access_log=None,
                               logger=_ParserLog(self), max_line_size=4096, max_field_size=4096, max_headers=64)
        sock = self.io.listener("http", str(cfg.address), int(cfg.port))
        try:
            self._listener = await self._loop.create_server(
                lambda: _Gate(self), sock=sock, backlog=min(1024, self.max_connections))
        except OSError as exc:
            sock.close()
            raise StartupError(f"http: cannot listen on {cfg.address}:{cfg.port}: {exc.strerror}") from None
        self._bound = self._listener.sockets[0].getsockname()[:2]
        self._watchdog = self._loop.create_task(self._watch())
        self.log.info("http.listening", address=self._bound[0], port=self._bound[1],
                      root=str(self.runtime.config.tftp.root))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; responses in flight get up to ``grace_s``, then every connection is closed."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        if self._active and grace_s > 0:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                pass
        for conn in list(self.slots.conns.values()):
            conn.transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._server is not None:
            await self._server.shutdown(1.0)
        self._listener = None

    def listeners(self) -> list[dict[str, Any]]:
        """Where this service listens (for ``sidusctl status``)."""
        if self._bound is None or self._stopping:
            return []
        return [{"proto": "tcp", "service": "http", "address": self._bound[0], "port": self._bound[1]}]

    def active_transfers(self) -> int:
        """Responses being sent now."""
        return self._active

    def connections(self) -> int:
        """Open client connections."""
        return len(self.slots.conns)

    # -- connections -------------------------------------------------------------
    def _admit(self, transport: Any) -> Any:
        """A request handler for a new connection, or None (counted, logged) if over a limit."""
        peer = transport.get_extra_info("peername") or ("?", 0)
        reason = None
        if self._stopping:
            reason = "stopping"
        elif self.slots.per_client[peer[0]] >= self.max_per_client:
            reason = "per_client"
        elif len(self.slots.conns) >= self.max_connections and not self._evict(peer[0]):
            reason = "busy"
        if reason:
            self.runtime.observer.count(f"http.refused.{reason}")
            self.rlog.info("http.refused", key=reason, peer=f"{peer[0]}:{peer[1]}", reason=reason)
            return None
        assert self._server is not None
        return self._server()

    def _evict(self, ip: str) -> bool:
        """Take a slot back for a newcomer from ``ip`` (:meth:`~.http_conns.Slots.take_back`)."""
        conn = self.slots.take_back(ip)
        if conn is not None:
            why = "busy" if conn.busy else "idle"
            self.runtime.observer.count(f"http.evicted.{why}")
            self.rlog.info("http.evicted", key=why, peer=conn.ip, reason=why, requests=conn.requests, newcomer=ip)
            conn.transport.abort()
        return conn is not None

    def _opened(self, handler: Any, transport: Any) -> None:
        assert self._loop is not None
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.runtime.observer.count("http.connections")
        self.slots.add(handler, transport, peer[0], self._loop.time())

    async def _watch(self) -> None:
        """Close connections without a first request in ``header_timeout_s``, or idle for ``idle_timeout_s``."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout_s / 2, self.header_timeout_s / 2))
            for conn, why in self.slots.expired(self._loop.time(), self.header_timeout_s, self.idle_timeout_s):
                self.runtime.observer.count(f"http.timeouts.{why}")
                self.rlog.info("http.timeout", key=why, peer=conn.ip, reason=why)
                conn.transport.close()

    # -- requests ----------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._loop is not None
        if request.path == UP_PATH:
            return await self.up_reports.answer(request, request.remote or "?")
        t0 = self._loop.time()
        conn = self.slots.conns.get(request.protocol)
        if conn is not None:
            conn.busy, conn.task = conn.busy + 1, asyncio.current_task()
        self._active += 1
        self.runtime.observer.count("http.requests")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        local = request.transport.get_extra_info("sockname") if request.transport else None
        peer_ip = peer[0] if peer else "?"
        rec = _Record()
        try:
            return await self._serve(request, rec, peer_ip, local[0] if local else "0.0.0.0")
        except (ConnectionError, asyncio.CancelledError):
            rec.outcome = "aborted"
            raise
        except Exception:
            rec.outcome = "internal-error"
            self.runtime.observer.count("http.internal_errors")
            self.rlog.exception("http.internal_error", peer=peer_ip, path=request.raw_path[:300])
            raise
        finally:
            self._active -= 1
            if conn is not None:
                conn.busy -= 1
                conn.requests += 1
                conn.idle_since = self._loop.time()
                rec.outcome = "evicted" if conn.evicted else rec.outcome
            self._summary(request, rec, peer, round(self._loop.time() - t0, 3))
            if not self._active:
                self._idle.set()

    def _summary(self, request: web.BaseRequest, rec: _Record, peer: Any, duration_s: float) -> None:
        obs = self.runtime.observer
        ok = rec.outcome == "ok" and rec.status in (200, 206, 304)
        obs.count("http.transfers.done" if ok else "http.transfers.failed")
        obs.count("http.bytes", rec.bytes)
        mac = rec.mac or (obs.mac_for_ip(peer[0]) if peer else None)
        log = self.rlog.info if ok or rec.status in (304, 404) else self.rlog.warning
        log("http.transfer", key=peer[0] if peer else None, method=request.method, file=rec.file,
            path=None if rec.file is not None else request.raw_path[:300],
            peer=f"{peer[0]}:{peer[1]}" if peer else None, mac=mac, status=rec.status,
            bytes=rec.bytes, size=rec.size, range=rec.range, duration_s=duration_s,
            outcome=rec.outcome)
        obs.timeline(mac, "http", file=rec.file, bytes=rec.bytes, duration_s=duration_s,
                     status=rec.status, outcome=rec.outcome)

    def _fail(self, rec: _Record, status: int, reason: str, text: str,
              headers: dict[str, str] | None = None) -> web.Response:
        self.runtime.observer.count(f"http.refused.{reason}")
        rec.status, rec.outcome = status, reason
        body = (text + "\n").encode()
        rec.bytes = len(body)
        return web.Response(status=status, body=body, content_type="text/plain", headers=headers)

    def _refused(self, rec: _Record, refusal: provider.Refusal) -> web.Response:
        """The response for a refusal of the content decision (:data:`REFUSALS`)."""
        status, reason, text = REFUSALS[refusal.code]
        if refusal.code == provider.ACCESS:
            self.rlog.info("http.access", file=rec.file, reason=refusal.reason)
        if reason is None:                  # our bug: counted and logged as an internal error already
            rec.status, rec.outcome = status, "internal-error"
            body = (text + "\n").encode()
            rec.bytes = len(body)
            return web.Response(status=status, body=body, content_type="text/plain")
        return self._fail(rec, status, reason, text.format(reason=refusal.reason))

    async def _serve(self, request: web.BaseRequest, rec: _Record, peer_ip: str,
                     local_ip: str) -> web.StreamResponse:
        if self._stopping:
            return self._fail(rec, 503, "stopping", "server stopping", {"Retry-After": "1"})
        if request.method not in ("GET", "HEAD"):
            return self._fail(rec, 405, "method", "only GET and HEAD", {"Allow": "GET, HEAD"})
        name = request_name(request.raw_path)
        if name is None:
            return self._fail(rec, 400, "encoding", "path is not UTF-8")
        rec.file = name.lstrip("/")[:300] or "/"
        try:
            decision = self.runtime.provide(name, local_ip, peer_ip)
        except Exception:
            self.runtime.observer.count("http.internal_errors")
            self.rlog.exception("http.internal_error", peer=peer_ip, path=request.raw_path[:300])
            decision = provider.Refusal(provider.INTERNAL, "internal error")
        if isinstance(decision, provider.Refusal):
            rec.mac = decision.mac
            return self._refused(rec, decision)
        if isinstance(decision, provider.Document):
            rec.mac = decision.mac
            doc = decision.body
            headers = {"Cache-Control": "no-store", "Content-Type": "text/plain; charset=us-ascii"}
            return await self._send(request, rec, headers, len(doc), doc=doc)
        try:
            fd, size = await self.io.open_file(decision.root, decision.parts)
        except NotServable as exc:
            return self._refused(rec, provider.refused_open(exc.missing, exc.reason))
        with open(fd, "rb", buffering=0, closefd=True) as fobj:
            st = os.fstat(fd)
            etag = '"' + hashlib.blake2s(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode(),
                                         digest_size=8).hexdigest() + '"'
            headers = {"ETag": etag, "Last-Modified": formatdate(st.st_mtime, usegmt=True),
                       "Content-Type": "application/octet-stream"}
            inm = request.headers.get("If-None-Match")
            if inm is not None and etag in [t.strip() for t in inm.split(",")]:
                rec.status, rec.size = 304, size
                return web.Response(status=304, headers={"ETag": etag})
            return await self._send(request, rec, headers, size, fobj=fobj, etag=etag)

    async def _send(self, request: web.BaseRequest, rec: _Record, headers: dict[str, str], size: int,
                    doc: bytes | None = None, fobj: Any = None, etag: str | None = None) -> web.StreamResponse:
        rec.size = size
        headers["Accept-Ranges"] = "bytes"
        rng_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and (etag is None or if_range.strip() != etag):
            rng_header = None                     # RFC 9110 section 13.1.5: validator changed
        try:
            rng = parse_range(rng_header, size) if request.method == "GET" else None
        except RangeNotSatisfiable:
            return self._fail(rec, 416, "range", "range not satisfiable",
                              {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        start, stop, status = 0, size, 200
        if rng is not None:
            start, stop, status = rng.start, rng.stop, 206
            headers["Content-Range"] = rng.content_range
            rec.range = rng.content_range
            self.runtime.observer.count("http.ranges")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = stop - start
        rec.status = status
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        if doc is not None:
            await asyncio.wait_for(resp.write(doc[start:stop]), self.idle_timeout_s)
            rec.bytes = stop - start
        else:
            assert self._loop is not None and request.transport is not None
            transport, offset = request.transport, start
            while offset < stop:
                n = min(SEND_CHUNK, stop - offset)
                try:
                    sent = await asyncio.wait_for(
                        self._loop.sendfile(transport, fobj, offset, n), self.idle_timeout_s)
                except TimeoutError:
                    # the client stopped reading: cut it (the rest of the file is never sent)
                    rec.outcome = "timeout"
                    self.runtime.observer.count("http.timeouts.send")
                    transport.close()
                    return resp
                if not sent:
                    # the file shrank under us: the promised Content-Length cannot be kept
                    rec.outcome = "read-error"
                    self.runtime.observer.count("http.read_errors")
                    transport.close()
                    return resp
                offset += sent
                rec.bytes = offset - start
        await resp.write_eof()
        return resp
