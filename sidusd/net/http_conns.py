"""The connections of the HTTP boot edge: admitted to aiohttp, or answered 503 unparsed.

:class:`Gate` is the protocol of every new connection: it asks the service to
admit it (``HttpService._admit``: ``http.max_connections``,
``http.max_per_client``, stopping) and hands it to aiohttp's low-level server
(:class:`Server`, which tells the service when connections come and go), or
answers ``503`` + ``Retry-After`` itself.  :class:`ParserLog` keeps a hostile
peer from filling the log through aiohttp's parser errors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web

if TYPE_CHECKING:
    from .http_server import HttpService

BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n")
REFUSE_LINGER_S = 2.0
MAX_REFUSING = 256            # refused connections lingering at once; beyond, reset at once


class Conn:
    __slots__ = ("transport", "ip", "busy", "idle_since")

    def __init__(self, transport: Any, ip: str, now: float):
        self.transport, self.ip, self.busy, self.idle_since = transport, ip, 0, now


class Server(web.Server):
    """aiohttp's low-level server, telling the service when connections come and go."""

    def __init__(self, svc: HttpService, **kw: Any):
        super().__init__(svc._handle, **kw)
        self._svc = svc

    def connection_made(self, handler: Any, transport: Any) -> None:
        super().connection_made(handler, transport)
        self._svc._opened(handler, transport)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._svc._closed(handler)


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
        if transport.can_write_eof():
            transport.write_eof()
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
