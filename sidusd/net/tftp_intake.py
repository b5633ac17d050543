"""TFTP intake: requests on the listening socket, admitted or refused, their content found.

* The listening socket is read with ``recvmsg`` and ``IP_PKTINFO``: the local
  address a request arrived on becomes the server IP of rendered configs and
  the address its transfer is served from (and its refusal is sent from); the
  interface index gives the MTU that caps ``blksize`` (MTU - 32).  At most
  ``BATCH`` requests are read per loop turn.
* Admission (:mod:`~sidusd.net.tftp_admission`): ``max_transfers`` in all
  and ``max_transfers_per_client`` per client IP (refused with an ERROR and
  counted); a request admitted counts against both from then on, while its
  file is being opened too; at the global cap an unconfirmed transfer (its
  peer never acknowledged anything: maybe a forged source) gives way.
* netascii (RFC 1350 section 1) is converted as a stream, a block at a time
  (:class:`~sidusd.proto.tftp_netascii.NetasciiSource`); the converted size
  (``tsize``) is counted off the event loop, in a thread, before the
  transfer begins.  A rendered document is small: converted at once.
* What the name means is decided once, for TFTP and HTTP alike
  (``runtime.provide`` -> :mod:`sidusd.boot.provider`); this module maps the
  decision's refusal codes to TFTP error codes (:data:`REFUSALS`).  A file is
  opened with ``await io.open_file(root, parts)`` (in the privilege-separated
  worker: by the supervisor), in a task: the transfer begins when the open
  completes; a stop in between ends the task and releases what it held.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from ..boot import provider
from ..config import TftpConfig
from ..errors import RemoteProtocolError
from ..proto import tftp, tftp_netascii
from ..proto.tftp_session import BytesSource
from .files import NotServable, ReadAheadSource
from .tftp_admission import ADMIT, BUSY, FLOOD, Admission

if TYPE_CHECKING:
    from .tftp_server import TftpService

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)        # Linux value
PKTINFO = struct.Struct("=i4s4s")                    # struct in_pktinfo
_CMSG_LEN = socket.CMSG_SPACE(PKTINFO.size)
BATCH = 64                  # requests read from the listening socket per loop turn
_RECV_MAX = 2048            # requests are <= 512 bytes (RFC 2347); ACKs 4
_MAX_REQUEST = 1024         # a bigger "request" is refused as malformed
NETASCII_CHUNK = 1 << 20    # bytes read at a time to count a netascii file's converted size

# provider.Refusal code -> (TFTP error code (RFC 1350 section 5), message, counter tftp.refused.<reason>)
REFUSALS = {
    provider.NAME: (tftp.ERR_ACCESS, "access violation: {reason}", "name"),
    provider.NOT_FOUND: (tftp.ERR_NOT_FOUND, "file not found", "not_found"),
    provider.ACCESS: (tftp.ERR_ACCESS, "access violation", "access"),
    provider.INTERNAL: (tftp.ERR_UNDEFINED, "internal error", "render"),
}

Peer = tuple[str, int]


class Intake:
    """The requests of one :class:`~sidusd.net.tftp_server.TftpService` (its listening socket)."""

    def __init__(self, svc: TftpService):
        self.svc = svc
        self.log, self.rlog = svc.log, svc.rlog
        self.admission = Admission(svc)
        self.pending: dict[Peer, asyncio.Task] = {}         # admitted, its file being opened

    @property
    def per_client(self) -> collections.Counter[str]:
        """Admitted requests per client IP (transfers and files being opened)."""
        return self.admission.per_client

    # -- the listening socket ------------------------------------------------------
    def on_readable(self) -> None:
        svc = self.svc
        sock = svc._sock
        if sock is None:
            return
        obs = svc.runtime.observer
        for _ in range(BATCH):
            try:
                data, anc, flags, peer = sock.recvmsg(_RECV_MAX, _CMSG_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                obs.count("tftp.rx_errors")
                self.rlog.warning("tftp.rx_error", error=exc.strerror)
                return
            obs.count("tftp.rx")
            local, ifindex = svc._bound[0] if svc._bound else "0.0.0.0", 0
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= PKTINFO.size:
                    ifindex, spec_dst, _dst = PKTINFO.unpack_from(value)
                    local = socket.inet_ntoa(spec_dst)
            try:
                if flags & socket.MSG_TRUNC or len(data) > _MAX_REQUEST:
                    obs.count("tftp.malformed")
                    continue
                self.on_request(data, peer, local, ifindex)
            except Exception:  # a request must never stop the intake loop
                obs.count("tftp.internal_errors")
                self.rlog.exception("tftp.internal_error", peer=f"{peer[0]}:{peer[1]}")

    def refuse(self, peer: Peer, local: str, code: int, message: str, reason: str,
               file: str | None = None) -> None:
        """ERROR ``code`` to ``peer`` from ``local`` (the address its request arrived on)."""
        sock = self.svc._sock
        self.svc.runtime.observer.count(f"tftp.refused.{reason}")
        self.rlog.info("tftp.refused", peer=f"{peer[0]}:{peer[1]}", file=file, reason=reason,
                      message=message)
        if sock is None:
            return
        pkt = tftp.error_packet(code, message[:200])
        try:
            if local and local != "0.0.0.0":
                info = PKTINFO.pack(0, socket.inet_aton(local), b"\0\0\0\0")
                sock.sendmsg([pkt], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, peer)
            else:
                sock.sendto(pkt, peer)
        except OSError:
            self.svc.runtime.observer.count("tftp.send_errors")

    def refuse_decision(self, peer: Peer, local: str, refusal: provider.Refusal, file: str) -> None:
        code, message, reason = REFUSALS[refusal.code]
        self.refuse(peer, local, code, message.format(reason=refusal.reason), reason, file)

    # -- one request ---------------------------------------------------------------
    def on_request(self, data: bytes, peer: Peer, local: str, ifindex: int) -> None:
        svc = self.svc
        obs = svc.runtime.observer
        try:
            pkt = tftp.decode(data)
        except RemoteProtocolError as exc:
            obs.count("tftp.malformed")
            self.rlog.debug("tftp.malformed", peer=f"{peer[0]}:{peer[1]}", error=str(exc))
            return
        if isinstance(pkt, tftp.WRQ):
            return self.refuse(peer, local, tftp.ERR_ACCESS, "write requests are not accepted",
                               "write", pkt.filename)
        if not isinstance(pkt, tftp.RRQ):
            obs.count("tftp.unexpected")
            return
        if svc.serving(peer) or peer in self.pending:
            obs.count("tftp.duplicate_rrq")   # client resent its RRQ; the transfer answers
            return
        name = pkt.filename
        cfg = svc.runtime.config.tftp
        mode = pkt.mode.lower()
        if mode not in tftp.MODES:
            return self.refuse(peer, local, tftp.ERR_ILLEGAL, f"unsupported mode {mode[:20]!r}",
                               "mode", name)
        if svc._stopping:
            return self.refuse(peer, local, tftp.ERR_UNDEFINED, "server stopping", "stopping", name)
        verdict = self.admission.decide(peer[0], svc.active_transfers() + len(self.pending),
                                        cfg.max_transfers, cfg.max_transfers_per_client, svc.loop.time())
        if verdict == FLOOD:            # every slot unconfirmed and young: no answer (maybe forged)
            obs.count("tftp.refused.flood")
            return
        if verdict == BUSY:
            return self.refuse(peer, local, tftp.ERR_UNDEFINED, "server busy, retry later", "busy", name)
        if verdict != ADMIT:
            return self.refuse(peer, local, tftp.ERR_UNDEFINED, "too many transfers from this client",
                               "per_client", name)
        try:
            decision = svc.runtime.provide(name, local, peer[0])
        except Exception as exc:
            self.rlog.error("tftp.render_failed", file=name, error=f"{type(exc).__name__}: {exc}")
            decision = provider.Refusal(provider.INTERNAL, "internal error")
        if isinstance(decision, provider.Refusal):
            return self.refuse_decision(peer, local, decision, name)
        self.admission.admitted(peer[0])      # counted until the transfer ends
        if isinstance(decision, provider.Document):
            begun = False
            try:
                body = decision.body
                if mode == "netascii":
                    body = tftp.netascii(body)      # a rendered document is small
                begun = self.svc._begin(pkt, peer, local, ifindex, name, BytesSource(body),
                                        decision.mac, cfg)
            finally:
                if not begun:
                    self.release(peer[0])
            return
        assert svc._loop is not None
        self.pending[peer] = svc._loop.create_task(
            self._open(pkt, peer, local, ifindex, name, decision, cfg))

    async def _open(self, pkt: tftp.RRQ, peer: Peer, local: str, ifindex: int, name: str,
                    at: provider.FileAt, cfg: TftpConfig) -> None:
        """Open the file (asynchronously: maybe in another process), then begin the transfer."""
        begun = False
        try:
            try:
                fd, size = await self.svc.io.open_file(at.root, at.parts)
            except NotServable as exc:
                self.refuse_decision(peer, local, provider.refused_open(exc.missing, exc.reason), name)
                return
            except OSError as exc:      # the opener itself failed (e.g. the supervisor is gone)
                self.rlog.error("tftp.open_failed", file=name, error=exc.strerror or str(exc))
                self.refuse_decision(peer, local, provider.Refusal(provider.INTERNAL, "open failed"), name)
                return
            source: Any = ReadAheadSource(fd, size)
            if pkt.mode.lower() == "netascii":
                source = await self._netascii(source, peer, local, name)  # closed if it fails
                if source is None:
                    return
            begun = self.svc._begin(pkt, peer, local, ifindex, name, source, None, cfg)
        except Exception:
            self.svc.runtime.observer.count("tftp.internal_errors")
            self.rlog.exception("tftp.internal_error", peer=f"{peer[0]}:{peer[1]}", file=name)
        finally:
            self.pending.pop(peer, None)
            if not begun:
                self.release(peer[0])
            self.svc._maybe_idle()

    async def _netascii(self, source: ReadAheadSource, peer: Peer, local: str,
                        name: str) -> tftp_netascii.NetasciiSource | None:
        """The file as netascii, a stream (RFC 1350 section 1): its converted size is counted
        in a thread (the loop goes on); None (the file closed, an ERROR sent) if unreadable."""
        try:
            added = await asyncio.get_running_loop().run_in_executor(
                None, _count_netascii, source.fd, source.size)
        except OSError as exc:
            source.close()
            self.rlog.warning("tftp.read_error", file=name, error=exc.strerror)
            self.refuse(peer, local, tftp.ERR_UNDEFINED, "read error", "read", name)
            return None
        except BaseException:
            source.close()
            raise
        return _NetasciiFile(source, tftp_netascii.converted_size(source.size, added))

    # -- bookkeeping ---------------------------------------------------------------
    def release(self, ip: str) -> None:
        """One admitted request of ``ip`` is over (its transfer ended, or never began)."""
        self.admission.release(ip)

    async def cancel_pending(self) -> None:
        """End the opens still under way (the service stops): nothing they held stays."""
        tasks = list(self.pending.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for peer in list(self.pending):         # a task cancelled before it ran
            del self.pending[peer]
            self.release(peer[0])


def _count_netascii(fd: int, size: int) -> int:
    """The bytes netascii adds to the first ``size`` bytes of ``fd`` (run in a thread)."""
    added = at = 0
    while at < size:
        chunk = os.pread(fd, min(NETASCII_CHUNK, size - at), at)
        if not chunk:
            break                   # the file shrank: the transfer meets it as a read error
        added += tftp_netascii.count_chunk(chunk)
        at += len(chunk)
    return added


class _NetasciiFile(tftp_netascii.NetasciiSource):
    """A netascii stream over an open file, closed with it (the edge closes what has ``close``)."""

    def __init__(self, raw: ReadAheadSource, size: int):
        super().__init__(raw, size)
        self.file = raw

    def close(self) -> None:
        self.file.close()

