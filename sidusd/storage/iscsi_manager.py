"""The facade the runtime calls for persistent hosts: disks, secrets and targets together.

The pure parts (plan, secrets file, tgt commands) are in
:mod:`sidusd.storage.iscsi`, the LIO backend in :mod:`sidusd.storage.iscsi_lio`;
see their docstrings for the model (RFC 3720 targets, one per host, ACL + CHAP,
never open).  ``iscsi.backend`` picks the backend: ``tgt`` (tgtd via tgtadm) or
``lio`` (refused at once, naming what is missing, on a host without LIO's
configfs tree).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sidusd.errors import BackendError
from sidusd.observability import get_logger
from sidusd.storage.iscsi import Disk, DiskPlan, SecretStore, TgtBackend, plan_disks
from sidusd.storage.iscsi_lio import LIO_CONFIGFS, LioBackend
from sidusd.storage.runner import Runner


def create_backing_file(path: Path, size_bytes: int) -> bool:
    """Create a sparse file of ``size_bytes`` (mode 0600) if missing; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.ftruncate(fd, size_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


class IscsiManager:
    """Disks, secrets and targets of the persistent hosts; what the runtime calls.

    ``apply(config, inventory)`` on start, reload and inventory edits;
    ``ensure()`` from a watch loop restores targets after a tgtd restart;
    ``disk(mac)`` gives the credentials to render into that host's boot config.
    """

    def __init__(self, config: Any, runner: Runner, backend: TgtBackend | LioBackend | None = None,
                 lio_root: Path = LIO_CONFIGFS):
        ic = config.iscsi
        if backend is None:
            if ic.backend == "tgt":
                backend = TgtBackend(runner, ic.tgt_control_port)
            elif ic.backend == "lio":
                # raises BackendError naming the missing configfs tree / modules
                backend = LioBackend(runner, lio_root, portal=str(ic.portal) if ic.portal else None,
                                     port=ic.port)
            else:
                raise BackendError(f"iscsi.backend {ic.backend!r} has no target manager",
                                   detail="use tgt or lio")
        self.backend = backend
        self.secrets = SecretStore(ic.secrets_file)
        self.disks: dict[str, Disk] = {}
        self._applied: dict[str, str] = {}          # target iqn -> secret it was set up with
        self.last_error = ""
        self.log = get_logger("iscsi", backend=backend.name)

    async def apply(self, config: Any, inventory: Any) -> dict[str, list[str]]:
        """Create disks/secrets as needed and make the backend serve exactly these targets."""
        try:
            plans = plan_disks(config, inventory)
            secrets = await asyncio.to_thread(self.secrets.ensure, [p.mac for p in plans])
            disks = {p.mac: Disk(p, secrets[p.mac]) for p in plans}
            for d in disks.values():
                if await asyncio.to_thread(create_backing_file, d.plan.backing_file, d.plan.size_bytes):
                    self.log.info("iscsi.disk_created", mac=d.plan.mac, path=str(d.plan.backing_file),
                                  size_bytes=d.plan.size_bytes)
            self.disks = disks
            done = await self._apply_backend()
        except (BackendError, OSError) as exc:
            self.last_error = str(exc)
            if isinstance(exc, OSError):
                raise BackendError("cannot prepare the iSCSI disks", detail=str(exc)) from exc
            raise
        self.last_error = ""
        return done

    async def _apply_backend(self) -> dict[str, list[str]]:
        disks = list(self.disks.values())
        refresh = [d.plan.target_iqn for d in disks if self._applied.get(d.plan.target_iqn) != d.secret]
        done = await self.backend.apply(disks, refresh)
        self._applied = {d.plan.target_iqn: d.secret for d in disks}
        self.log.info("iscsi.applied", **{k: len(v) for k, v in done.items()})
        return done

    async def ensure(self) -> bool:
        """Re-create the targets the backend lost (tgtd restart); True if something was restored."""
        live = await self.backend.show()
        if all(d.plan.target_iqn in live for d in self.disks.values()):
            return False
        self.log.warning("iscsi.targets_missing", restoring=len(self.disks))
        await self._apply_backend()
        return True

    def disk(self, mac: str) -> Disk | None:
        """The disk and credentials of host ``mac`` (None: not persistent)."""
        return self.disks.get(mac)

    async def info(self, mac: str) -> dict[str, Any]:
        """Size, space used, target, whether a session is logged in (secret not included)."""
        d = self.disks.get(mac)
        if d is None:
            raise BackendError(f"host {mac} has no iSCSI disk", detail="its profile's overlay is not iscsi")
        p = d.plan
        try:
            st = p.backing_file.stat()
            size, used = st.st_size, st.st_blocks * 512
        except OSError:
            size, used = None, None
        t = (await self.backend.show()).get(p.target_iqn)
        return {"mac": mac, "hostname": p.hostname, "target": p.target_iqn, "initiator": p.initiator_iqn,
                "user": p.user, "backing_file": str(p.backing_file), "size_bytes": size,
                "used_bytes": used, "served": t is not None, "logged_in": bool(t and t.sessions)}

    async def reset(self, mac: str) -> dict[str, Any]:
        """Wipe host ``mac``'s disk (its next boot makes a new file system); refused while logged in."""
        info = await self.info(mac)
        if info["logged_in"]:
            raise BackendError(f"host {mac} is logged in to its disk", detail="shut it down first")
        p = self.disks[mac].plan

        def wipe() -> None:
            fd = os.open(p.backing_file, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, p.size_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        await asyncio.to_thread(wipe)
        self.log.info("iscsi.disk_reset", mac=mac, path=str(p.backing_file))
        return await self.info(mac)

    async def rotate(self, mac: str) -> Disk:
        """Give host ``mac`` a new CHAP secret (saved first) and set it on its target."""
        d = self.disks.get(mac)
        if d is None:
            raise BackendError(f"host {mac} has no iSCSI disk", detail="its profile's overlay is not iscsi")
        secret = await asyncio.to_thread(self.secrets.rotate, mac)
        self.disks[mac] = Disk(d.plan, secret)
        await self._apply_backend()             # the target's account gets the new secret
        self.log.info("iscsi.secret_rotated", mac=mac, target=d.plan.target_iqn)
        return self.disks[mac]

    async def remove_host(self, mac: str, plan: DiskPlan, delete_disk: bool = False) -> None:
        """Remove a removed host's target and secret, and its backing file if asked."""
        await self.backend.remove(plan.target_iqn)
        self.disks.pop(mac, None)
        self._applied.pop(plan.target_iqn, None)
        await asyncio.to_thread(self.secrets.forget, mac)
        if delete_disk:
            plan.backing_file.unlink(missing_ok=True)
        self.log.info("iscsi.host_removed", mac=mac, disk_deleted=delete_disk)

    async def remove_all(self) -> None:
        """Remove every sidus target (disks and secrets stay)."""
        for d in list(self.disks.values()):
            await self.backend.remove(d.plan.target_iqn)
        self._applied = {}

    def health(self) -> dict[str, Any]:
        return {"backend": self.backend.name, "ok": not self.last_error,
                "detail": self.last_error or f"{len(self.disks)} disk(s)",
                "targets": sorted(d.plan.target_iqn for d in self.disks.values())}
