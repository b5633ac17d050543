"""The inventory and image requests of the control socket that an admin lives with.

* ``hosts.show MAC``: the host as the inventory has it, what it boots (host -> profile ->
  image merged) and what the daemon saw of it;
* ``hosts.set MAC ...``: change some fields of a host, keep the others (``unset`` clears one);
* ``hosts.adopt MAC``: a machine seen in ``clients`` becomes a host (default profile unless given);
* ``hosts.clear-conflict MAC``: forget the addresses a MAC was claimed from (boot/claims.py), here
  and in the worker, after an admin has checked a conflict;
* ``hosts.rotate-secret MAC``: a new CHAP secret for a persistent host, set on its target (a stolen
  copy stops working) and pushed to the worker for its next boot config;
* ``images.status NAME``: is the image served as the running config says: its problems
  (sidusd/preflight.py), exported by the NFS backend, its boot config rendered.  ``sidus-image``
  asks this before it says "served".

Every change goes through :meth:`InventoryOps.edit`: ``Runtime.edit_inventory`` (the file on disk
re-read, checked, written atomically, swapped), or with ``state.backend: postgresql`` the runtime's
``inventory_writer`` (sidusd/state/service.py: one transaction in PostgreSQL, checked the same way,
pushed to every rack server by NOTIFY).  Errors are :class:`~sidusd.errors.ControlError` / ``SidusError`` texts
the server sends back as they are.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from ..errors import ControlError, SidusError

SETTABLE = ("profile", "hostname", "image", "ip", "append")
UNSETTABLE = ("hostname", "image", "ip", "append")


def unanswered(timeline: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last ``dhcp.unanswered`` event of a client, when no DHCP answer came after it (pure)."""
    for e in reversed(timeline):
        event = str(e.get("event", ""))
        if event == "dhcp.unanswered":
            return {"t": e.get("t"), "code": e.get("code"), "reason": e.get("reason")}
        if event in ("dhcp.offer", "dhcp.ack"):
            return None
    return None


def client_summary(rec: Any) -> dict[str, Any]:
    """A client record without its timeline, with the reason it got no answer (or None)."""
    d = rec.as_dict()
    timeline = d.pop("timeline", [])
    return {**d, "events": len(timeline), "unanswered": unanswered(timeline)}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if v is None or isinstance(v, (str, int, float, bool)) else str(v)) for k, v in d.items()}


class InventoryOps:
    """``hosts.show``, ``hosts.set``, ``hosts.adopt`` and ``images.status`` for ``runtime``."""

    def __init__(self, runtime: Any, log: Any, sync_worker: Any):
        self.runtime = runtime
        self.log = log
        self._sync = sync_worker

    async def edit(self, fn: Any) -> Any:
        """One change of the hosts (``fn``: inventory -> inventory), where the daemon's hosts come from."""
        writer = getattr(self.runtime, "inventory_writer", None) or self.runtime.edit_inventory
        return await writer(fn)

    async def show(self, mac: str) -> dict[str, Any]:
        await self._sync()
        rt = self.runtime
        host = rt.inventory.hosts.get(mac)
        rec = rt.observer.clients.get(mac)
        if host is None and rec is None:
            raise ControlError(f"no host {mac} in the inventory and no machine with that MAC seen recently")
        try:
            target = rt.inventory.resolve(mac, rt.config)
        except SidusError:
            target = None
        boots = _jsonable(dataclasses.asdict(target)) if target is not None else None
        if boots is not None and host is None:
            boots["why"] = "not in the inventory: the default profile (dhcp.unknown_hosts is default)"
        return {"mac": mac, "host": _jsonable(dataclasses.asdict(host)) if host is not None else None,
                "boots": boots, "client": client_summary(rec) if rec is not None else None}

    async def set(self, mac: str, unset: list[str] | None = None, **given: Any) -> dict[str, Any]:
        from ..boot.inventory import Host
        changes = {k: v for k, v in given.items() if v is not None}
        clear = list(dict.fromkeys(unset or ()))
        bad = [f for f in clear if f not in UNSETTABLE]
        if bad:
            raise ControlError(f"cannot unset {', '.join(bad)} (unsettable: {', '.join(UNSETTABLE)})")
        both = sorted(set(clear) & set(changes))
        if both:
            raise ControlError(f"{', '.join(both)}: given and unset at once")
        if not changes and not clear:
            raise ControlError("nothing to change: give --profile, --hostname, --image, --ip, --append "
                               "or --unset FIELD")
        previous: list[Any] = []

        def edit(inv: Any) -> Any:
            old = inv.hosts.get(mac)
            if old is None:
                raise ControlError(f"no host {mac} in the inventory (sidusctl hosts add, or hosts adopt "
                                   "for a machine seen in sidusctl clients)")
            fields = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
            fields.update(changes)
            fields.update({f: None for f in clear})
            previous[:] = [old]
            return inv.with_host(Host(**fields))

        new = await self.edit(edit)
        changed = sorted([*changes, *clear])
        self.log.info("control.host_changed", mac=mac, fields=changed)
        return {"host": _jsonable(dataclasses.asdict(new.hosts[mac])),
                "previous": _jsonable(dataclasses.asdict(previous[0])), "changed": changed}

    async def adopt(self, mac: str, profile: str | None = None, hostname: str | None = None,
                    image: str | None = None, append: str | None = None) -> dict[str, Any]:
        from ..boot.inventory import Host
        await self._sync()
        rec = self.runtime.observer.clients.get(mac)
        if rec is None:
            raise ControlError(f"no machine with MAC {mac} seen recently (sidusctl clients lists them)")
        profile = profile or self.runtime.config.boot.default_profile
        host = Host(mac=mac, profile=profile, hostname=hostname, image=image, append=append)  # type: ignore[arg-type]

        def edit(inv: Any) -> Any:
            if mac in inv.hosts:
                raise ControlError(f"host {mac} is in the inventory already (change it: sidusctl hosts set)")
            return inv.with_host(host)

        new = await self.edit(edit)
        self.log.info("control.host_adopted", mac=mac, profile=profile)
        return {"host": _jsonable(dataclasses.asdict(new.hosts[mac])), "client": client_summary(rec)}

    async def clear_conflict(self, mac: str) -> dict[str, Any]:
        """Forget who claimed ``mac`` (both processes): the next claim starts a fresh record."""
        await self._sync()
        rt = self.runtime
        rec = rt.observer.clients.get(mac)
        if rec is None:
            raise ControlError(f"no machine with MAC {mac} seen recently (sidusctl clients lists them)")
        before = rec.as_dict()
        rt.observer.clear_claims(mac)
        worker = getattr(rt, "worker_clear_claims", None)    # privsep: the worker's table decides
        if worker is not None:
            await worker(mac)
        self.log.warning("control.conflict_cleared", mac=mac, claimed_from=before["claimed_from"],
                         claim_attempts=before["claim_attempts"], conflict=before["conflict"])
        return {"mac": mac, "conflict": before["conflict"], "claimed_from": before["claimed_from"],
                "claim_attempts": before["claim_attempts"]}

    async def rotate_secret(self, mac: str) -> dict[str, Any]:
        """A new CHAP secret for persistent host ``mac``, on its target and in its next config."""
        rt = self.runtime
        mgr = rt.iscsi
        if mgr is None or mgr.disk(mac) is None:
            raise ControlError(f"host {mac} has no iSCSI disk (not persistent, or iscsi.backend is none)")
        disk = await mgr.rotate(mac)
        for fn in list(rt.on_change):                 # privsep: the worker renders with the new one
            res = fn()
            if inspect.isawaitable(res):
                await res
        self.log.warning("control.secret_rotated", mac=mac, target=disk.plan.target_iqn)
        return {"mac": mac, "target": disk.plan.target_iqn, "user": disk.plan.user, "rotated": True}

    async def image_status(self, name: str) -> dict[str, Any]:
        """Whether image ``name`` is served as the running config says (for ``sidus-image``)."""
        from ..boot import provider, render
        from ..boot.inventory import BootTarget
        rt = self.runtime
        cfg = rt.config
        img = cfg.images.get(name)
        if img is None:
            raise ControlError(f"no image {name} in the running config (images: {', '.join(sorted(cfg.images))})")
        st = rt.status()
        problems = st.get("broken_images", {}).get(name, [])
        nfs = st.get("backend_status", {}).get("nfs")
        exported: bool | None = None if cfg.nfs.backend == "none" or nfs is None else (
            str(img.root) in (nfs.get("exports") or []))
        target = BootTarget(mac=None, hostname=None, profile=cfg.boot.default_profile, image=name,
                            image_root=img.root, kernel=img.kernel, initrd=img.initrd, overlay="tmpfs",
                            append=img.append)
        try:
            server = str(cfg.nfs.server_address or cfg.tftp.address)
            render.pxelinux_config(target, provider.context(cfg, server))
            render_error = None
        except SidusError as exc:
            render_error = str(exc)
        served = not problems and render_error is None and exported is not False
        return {"name": name, "root": str(img.root), "kernel": img.kernel, "initrd": img.initrd,
                "generation": rt.generation, "nfs_backend": cfg.nfs.backend, "exported": exported,
                "rendered": render_error is None, "render_error": render_error, "problems": problems,
                "served": served}
