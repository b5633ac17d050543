"""The connections of the HTTP boot edge: admitted to aiohttp, or answered 503 unparsed.

:class:`Gate` is the protocol of every new connection: it asks the service to
admit it (``HttpService._admit``: ``http.max_connections``,
``http.max_per_client``, stopping) and hands it to aiohttp's low-level server
(:class:`Server`, which tells the service when connections come and go), or
answers ``503`` + ``Retry-After`` itself.  :class:`Handler` is aiohttp's
request handler that answers a first request line without an HTTP version
(HTTP/0.9, or junk) with ``400`` at once, instead of waiting for headers that
never come.  :class:`ParserLog` keeps a hostile peer from filling the log
through aiohttp's parser errors.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ..proto.http import request_line_ok

if TYPE_CHECKING:
    from .http_server import HttpService

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n")
REFUSE_LINGER_S = 2.0
MAX_REFUSING = 256            # refused connections lingering at once; beyond, reset at once
MAX_REQUEST_LINE = 4096       # bytes (as aiohttp's max_line_size)
_BAD_LINE_BODY = b"bad request line (HTTP/0.9 is not served)\n"
BAD_LINE = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_BAD_LINE_BODY), _BAD_LINE_BODY))


class Conn:
    """One admitted connection: ``busy`` requests being served, ``requests`` done, idle since when."""

    __slots__ = ("transport", "ip", "busy", "requests", "idle_since", "evicted", "task")

    def __init__(self, transport: Any, ip: str, now: float):
        self.transport, self.ip, self.busy, self.requests, self.idle_since = transport, ip, 0, 0, now
        self.evicted = False
        self.task: asyncio.Task | None = None         # of the request being served (busy)


class Slots:
    """The admitted connections (handler -> :class:`Conn`) and how many each client IP holds."""

    def __init__(self) -> None:
        self.conns: dict[Any, Conn] = {}
        self.per_client: collections.Counter[str] = collections.Counter()

    def add(self, handler: Any, transport: Any, ip: str, now: float) -> None:
        self.conns[handler] = Conn(transport, ip, now)
        self.per_client[ip] += 1

    def remove(self, handler: Any) -> None:
        conn = self.conns.pop(handler, None)
        if conn is not None:
            self.per_client[conn.ip] -= 1
            if self.per_client[conn.ip] <= 0:
                del self.per_client[conn.ip]

    def victim(self, ip: str) -> Any:
        """The connection to take back for a newcomer from ``ip`` when every slot is taken, or None.

        Idle ones first (no request being served): one that never completed a
        request before a keep-alive one, from the IP holding the most
        connections, the longest idle first.  A busy one only from an IP
        holding at least two more connections than ``ip`` does (fair share).
        A slowloris filling every slot with half-sent headers (and reconnecting
        when cut) thus only ever evicts itself; a real client is served at once.
        """
        best, best_key = None, None
        mine = self.per_client[ip]
        for handler, c in self.conns.items():
            n = self.per_client[c.ip]
            if c.busy:
                if n < mine + 2:
                    continue
                key: tuple[int, int, float] = (0, n, -c.idle_since)
            else:
                key = (2 if c.requests == 0 else 1, n, -c.idle_since)
            if best_key is None or key > best_key:
                best, best_key = handler, key
        return best

    def take_back(self, ip: str) -> Conn | None:
        """Remove the :meth:`victim` for a newcomer from ``ip`` and return it (None: every slot stays)."""
        handler = self.victim(ip)
        if handler is None:
            return None
        conn = self.conns[handler]
        self.remove(handler)                 # its slot is free now (connection_lost comes later)
        conn.evicted = True
        if conn.busy and conn.task is not None:
            conn.task.cancel()               # a send in progress would wait for the idle cut
        return conn

    def expired(self, now: float, header_timeout_s: float, idle_timeout_s: float) -> list[tuple[Conn, str]]:
        """Idle connections past their limit, with why (``header``: no first request yet; ``idle``)."""
        out = []
        for conn in self.conns.values():
            first = conn.requests == 0
            limit = min(header_timeout_s, idle_timeout_s) if first else idle_timeout_s
            if not conn.busy and now - conn.idle_since > limit:
                conn.idle_since = now          # once per timeout, even if close is slow
                out.append((conn, "header" if first else "idle"))
        return out


class Handler(RequestHandler):
    """aiohttp's request handler, answering a bad first request line (RFC 9112 section 3) at once.

    ``GET /x`` + CRLF (HTTP/0.9, no version) would otherwise wait for the end
    of headers until the idle cut; it gets ``400`` and a close as soon as its
    line is complete.  Only the connection's first line is checked (later ones
    are behind aiohttp's buffer); leading empty lines are allowed (section 2.2).
    """

    __slots__ = ("_first",)

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._first: bytes | None = b""

    def data_received(self, data: bytes) -> None:
        if self._first is not None and not (self._force_close or self._close):
            first = (self._first + data).lstrip(b"\r\n")
            nl = first.find(b"\n")
            if nl < 0 and len(first) < MAX_REQUEST_LINE:
                self._first = first
            else:
                self._first = None
                if nl >= 0 and not request_line_ok(first[:nl]):
                    svc = self._manager._svc      # type: ignore[union-attr]
                    svc.runtime.observer.count("http.malformed")
                    svc.rlog.debug("http.malformed", error="bad request line", line=repr(first[:min(nl, 80)]))
                    self._close = True
                    if self.transport is not None:
                        self.transport.write(BAD_LINE)
                        self.transport.close()
                    return
        super().data_received(data)


class Server(web.Server):
    """aiohttp's low-level server, telling the service when connections come and go."""

    def __init__(self, svc: HttpService, **kw: Any):
        super().__init__(svc._handle, **kw)
        self._svc = svc

    def __call__(self) -> RequestHandler:
        return Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: Any, transport: Any) -> None:
        super().connection_made(handler, transport)
        self._svc._opened(handler, transport)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._svc.slots.remove(handler)


class Gate(asyncio.Protocol):
    """Admits a new connection to aiohttp, or answers 503 without parsing anything.

    A refused client gets the 503, our half-close, and its request bytes read
    and dropped until it closes (at most ``REFUSE_LINGER_S``): closing with
    unread data would send an RST, and the client would see a reset instead
    of the 503.
    """

    def __init__(self, svc: HttpService):
        self.svc = svc
        self.timer: asyncio.TimerHandle | None = None
        self.svc_counted = False

    def connection_made(self, transport: Any) -> None:
        svc = self.svc
        handler = svc._admit(transport)
        if handler is not None:
            transport.set_protocol(handler)
            handler.connection_made(transport)
            return
        if svc._refusing >= MAX_REFUSING:
            transport.abort()         # a flood: no lingering, the kernel answers with a reset
            return
        svc._refusing += 1
        self.svc_counted = True
        transport.write(BUSY)
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:               # the peer reset between our write and the shutdown: nothing to wait for
            svc.runtime.observer.count("http.refused.reset")
            transport.abort()
            return
        assert svc._loop is not None
        self.timer = svc._loop.call_later(REFUSE_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False                  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.svc_counted:
            self.svc._refusing -= 1
            self.svc_counted = False


class ParserLog(logging.Logger):
    """aiohttp's logger for this service: a malformed request is counted and logged at debug.

    aiohttp answers 400 itself and logs the parser's exception with a
    traceback at ERROR; a hostile peer must not be able to fill the log.
    """

    def __init__(self, svc: HttpService):
        super().__init__("sidusd.http.aiohttp")
        self.svc = svc

    def handle(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            self.svc.runtime.observer.count("http.malformed")
            self.svc.rlog.debug("http.malformed", error=str(exc).splitlines()[0][:200])
        elif record.levelno >= logging.WARNING:
            self.svc.runtime.observer.count("http.internal_errors")
            self.svc.rlog.error("http.aiohttp_error", message=record.getMessage()[:300],
                               error=repr(exc)[:300] if exc else None)
