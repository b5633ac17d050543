"""The TCP control listener (``control.tcp``): mutual TLS, then the control socket's own lines.

Same framing, same messages (:mod:`sidusd.control.messages`) and the same op handlers as the
unix socket: each request line goes to :class:`~sidusd.control.server.ControlServer`'s
``answer_line`` once :mod:`sidusd.control.remote_authz` allows its op for the client's role.
The edge is thin:

* a connection over ``max_connections`` is closed at once (``control.remote.refused``);
* the TLS handshake runs under ``handshake_timeout_s``; a failure (no client certificate,
  another CA, plain text, a timeout) closes the connection (``control.remote.tls_failed``);
* a certificate with no role is answered with an error and closed (``control.remote.denied``);
  an op the role may not run is answered with an error, logged (rate-limited), the
  connection keeps serving;
* a malformed or oversize line is answered with an error and the connection closed
  (``control.remote.malformed``); a silent client is dropped after ``read_timeout_s``
  (``control.remote.timeouts``).  Nothing a peer sends stops the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from ..errors import RemoteProtocolError
from ..observability import LogLimiter, get_logger
from . import messages as m
from . import remote_authz as authz
from .tls import server_context


class RemoteControlServer:
    """The ``control.tcp`` listener in front of ``control`` (a started ``ControlServer``)."""

    def __init__(self, control: Any, tcp: Any):
        self.control = control
        self.tcp = tcp
        self.host, self.port = authz.parse_listen(tcp.listen)
        self.obs = control.runtime.observer
        self.log = get_logger("control.remote", listen=tcp.listen)
        self.rlog = LogLimiter(self.log)
        self._ctx: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the port chosen by the kernel when ``listen`` says 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Check the certificate files (ConfigError with the key) and start listening."""
        self._ctx = server_context(self.tcp)
        self._server = await asyncio.start_server(self._on_connection, self.host, self.port,
                                                  limit=m.MAX_REQUEST_BYTES + 1)
        self.rlog.info("control.remote.started", address=list(self.address),
                      admins=len(self.tcp.admins), readers=len(self.tcp.readers))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        self.rlog.info("control.remote.stopped")

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        peer_ip = str(peer[0])
        self.obs.count("control.remote.connections")
        try:
            if len(self._conns) > self.tcp.max_connections:
                self.obs.count("control.remote.refused")
                self.rlog.warning("control.remote.refused", key=peer_ip, peer=peer_ip,
                                  reason="too_many_connections", limit=self.tcp.max_connections)
                return
            try:
                assert self._ctx is not None
                await writer.start_tls(self._ctx, ssl_handshake_timeout=self.tcp.handshake_timeout_s)
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self.obs.count("control.remote.tls_failed")
                self.rlog.warning("control.remote.tls_failed", key=peer_ip, peer=peer_ip,
                                  error=f"{type(exc).__name__}: {exc}"[:200])
                return
            cn = authz.subject_cn(writer.get_extra_info("peercert"))
            role = authz.role_for(cn, self.tcp.admins, self.tcp.readers)
            if role is None:
                self.obs.count("control.remote.denied")
                self.rlog.warning("control.remote.denied", key=peer_ip, peer=peer_ip, cn=cn, reason="no_role")
                await self._send(writer, m.encode_error(authz.denial_message(authz.decide(None, ""), cn, "")))
                return
            await self._serve(reader, writer, peer_ip, cn, role)
        except TimeoutError:        # before OSError: TimeoutError is one
            self.obs.count("control.remote.timeouts")
            self.rlog.info("control.remote.timeout", key=peer_ip, peer=peer_ip)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError, asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer_ip: str, cn: str | None, role: authz.Role) -> None:
        async for line in self.control.request_lines(reader, self.tcp.read_timeout_s):
            op = None
            if isinstance(line, bytes):
                try:
                    op = m.decode_request(line).op
                except RemoteProtocolError:
                    op = None
            if op is None:           # garbage or an oversize line: answered, counted, connection closed
                self.obs.count("control.remote.malformed")
                self.rlog.warning("control.remote.malformed", key=peer_ip, peer=peer_ip, cn=cn)
                await self._send(writer, await self.control.answer_line(line))
                return
            decision = authz.decide(role, op)
            if not decision.allowed:
                self.obs.count("control.remote.denied")
                self.rlog.warning("control.remote.denied", key=peer_ip, peer=peer_ip, cn=cn, op=op,
                                  reason=decision.reason)
                await self._send(writer, m.encode_error(authz.denial_message(decision, cn, op)))
                continue
            self.obs.count("control.remote.requests")
            self.rlog.info("control.remote.request", key=peer_ip, peer=peer_ip, cn=cn, op=op)
            await self._send(writer, await self.control.answer_line(line))

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        await self.control.send(writer, data)


async def start_remote(control: Any) -> RemoteControlServer | None:
    """The started ``control.tcp`` listener of ``control``'s config (None: none configured)."""
    tcp = control.runtime.config.control.tcp
    if tcp is None:
        return None
    remote = RemoteControlServer(control, tcp)
    await remote.start()
    return remote
