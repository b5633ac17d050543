"""The live state of the daemon: config + inventory snapshot, swapped atomically.

Every edge reads ``runtime.config`` / ``runtime.inventory`` per request; a
reload builds a complete new :class:`Snapshot` and swaps one reference, so a
bad config never half-applies and requests in flight keep what they started
with (Warewulf's node map, built fresh and swapped on SIGHUP).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import config as config_mod
from . import preflight
from .boot import inventory as inv_mod
from .boot import provider, render
from .boot.render import IscsiLogin
from .errors import BackendError, ConfigError, SidusError
from .fsutil import atomic_write, remove_stale_temps
from .image.booted_store import BootedRecorder
from .observability import LogLimiter, Observer, RepeatBackoff, get_logger

if TYPE_CHECKING:
    from .storage.iscsi_manager import IscsiManager
    from .storage.nfs import NfsManager


@dataclass(frozen=True)
class Snapshot:
    """One consistent view: the config, the inventory checked against it, its number."""

    config: config_mod.Config
    inventory: inv_mod.Inventory
    generation: int


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    error: str | None = None
    restart_needed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "restart_needed": list(self.restart_needed)}


def read_inventory(path: Path) -> inv_mod.Inventory:
    """Read and parse the inventory file (I/O edge of boot.inventory)."""
    try:
        text = path.read_bytes()            # decoded by parse_inventory: not UTF-8 is a refusal with the offset
    except FileNotFoundError:
        raise ConfigError("inventory_file", f"{path}: no such file "
                          "(start from /usr/share/sidus/inventory.yaml; in a checkout: sidusd/data/)") from None
    except OSError as exc:
        raise ConfigError("inventory_file", f"{path}: {exc.strerror}") from None
    return inv_mod.parse_inventory(text, str(path))


InventorySource = Callable[[config_mod.Config], tuple[config_mod.Config, inv_mod.Inventory]]


def load_snapshot(config_path: Path, generation: int = 1, source: InventorySource | None = None) -> Snapshot:
    """Read config + inventory (``source``: from the config, sidusd/state) and check them together."""
    cfg = config_mod.read(config_path)
    cfg, inv = source(cfg) if source is not None else (cfg, read_inventory(cfg.inventory_file))
    inv_mod.check_against(inv, cfg)
    return Snapshot(cfg, inv, generation)


class BootedNotes(Protocol):
    """Where served boot targets are noted (image.booted_store.BootedRecorder; the worker forwards)."""

    def note(self, config: config_mod.Config, mac: str | None, target: inv_mod.BootTarget | None,
             now: float | None = None) -> None: ...

    async def aclose(self) -> None: ...


def default_iscsi_factory(config: config_mod.Config) -> IscsiManager:
    """The iSCSI manager of ``config`` (tgt driven with tgtadm)."""
    from .storage.iscsi_manager import IscsiManager
    from .storage.runner import Runner
    return IscsiManager(config, Runner())


class Runtime:
    """Owns the current :class:`Snapshot`, the observer and the storage backends."""

    def __init__(self, config_path: Path, snapshot: Snapshot, observer: Observer | None = None,
                 nfs_factory: Callable[[config_mod.Config], NfsManager] | None = None,
                 iscsi_factory: Callable[[config_mod.Config], IscsiManager] | None = None,
                 iscsi_watch_s: float = 5.0,
                 inspect: Callable[[config_mod.Config], list[preflight.Problem]] = preflight.inspect_serving,
                 inventory_source: InventorySource | None = None, inventory_writer: Callable[..., Any] | None = None):
        self.config_path = Path(config_path)
        self.inventory_source, self.inventory_writer = inventory_source, inventory_writer   # sidusd/state
        self._snap = snapshot
        self.observer = observer or Observer()
        self.observer.set_known(snapshot.inventory.hosts)   # inventory hosts: never evicted by others
        self.started_at = time.time()
        self.last_reload: dict[str, Any] | None = None
        self.backend_status: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()
        self._nfs_factory = nfs_factory
        self._nfs: NfsManager | None = None
        self._iscsi_factory = iscsi_factory or default_iscsi_factory
        self.iscsi: IscsiManager | None = None      # when iscsi.backend is set
        self._iscsi_watch_s = iscsi_watch_s
        self._iscsi_watch: asyncio.Task | None = None
        # which generation each MAC was served (config.booted; docs/images.md): a durable write
        self.booted: BootedNotes = BootedRecorder(self.observer)
        # privilege separation (sidusd/privsep): called after every snapshot or iSCSI change
        self.on_change: list[Callable[[], None]] = []
        self.sync_worker: Callable[[], Any] | None = None      # async: the worker's counters are in
        self.process_info: Callable[[], list[dict[str, Any]]] | None = None
        self.log = get_logger("runtime")
        self.rlog = LogLimiter(self.log)      # lines per request (render decisions)
        # what the running config lacks for a boot (sidusd/preflight.py): status, reload's baseline
        self._inspect = inspect
        self.preflight: list[preflight.Problem] = []

    @classmethod
    def load(cls, config_path: Path, **kw: Any) -> Runtime:
        snap = load_snapshot(Path(config_path), source=kw.get("inventory_source"))
        # temporaries of inventory writes cut short by a crash (kill -9)
        remove_stale_temps(snap.config.inventory_file)
        return cls(config_path, snap, **kw)

    # -- the current view -------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    @property
    def config(self) -> config_mod.Config:
        return self._snap.config

    @property
    def inventory(self) -> inv_mod.Inventory:
        return self._snap.inventory

    @property
    def generation(self) -> int:
        return self._snap.generation

    # -- what a requested name is served as -----------------------------------
    def render_context(self, server_ip: str) -> render.RenderContext:
        return provider.context(self.config, server_ip)

    def provide(self, name: str, server_ip: str, client_ip: str) -> provider.Response | provider.Refusal:
        """What ``name`` is served as for ``client_ip`` (asking on ``server_ip``): the decision of
        :func:`sidusd.boot.provider.decide`, with its counters, log events and booted record."""
        snap = self._snap
        return self._emit(provider.decide(name, self._asker(server_ip, client_ip), snap.config,
                                          snap.inventory, self.iscsi_login), snap.config, client_ip)

    def render(self, kind: str, mac: str | None, server_ip: str, client_ip: str) -> bytes | None:
        """The document for a generated name, or None when there is none to serve.

        A per-MAC document that carries a secret (``overlay: iscsi``) is served
        only when ``client_ip`` is the address that did the DHCP exchange for
        that MAC; any other asker gets None and a counted, logged refusal.
        """
        snap = self._snap
        out = self._emit(provider.document(kind, mac, self._asker(server_ip, client_ip), snap.config,
                                           snap.inventory, self.iscsi_login), snap.config, client_ip)
        return out.body if isinstance(out, provider.Document) else None

    def _asker(self, server_ip: str, client_ip: str) -> provider.Asker:
        mac = self.observer.mac_for_ip(client_ip)
        return provider.Asker(server_ip, client_ip, mac, self.observer.claimed_from(mac) if mac else ())

    def _emit(self, out: Any, config: config_mod.Config, client_ip: str) -> Any:
        """Count and log what a decision implies; note a served document in the booted record."""
        if isinstance(out, provider.Document):
            self.booted.note(config, out.booted_mac, out.target)
        elif isinstance(out, provider.Refusal):
            if out.cause == provider.RENDER:
                self.observer.count("render.errors")
                self.rlog.error("render.failed", kind=out.kind, mac=out.mac, error=out.reason)
            elif out.cause == provider.SECRET:
                self.observer.count("render.secret_refused")
                self.rlog.warning("render.secret_refused", kind=out.kind, mac=out.mac, client_ip=client_ip,
                                 dhcp_mac_of_ip=self.observer.mac_for_ip(client_ip), reason=out.reason)
        return out

    def iscsi_login(self, mac: str, server_ip: str) -> IscsiLogin | None:
        """Host ``mac``'s disk login for its boot config (None: no disk applied)."""
        disk = self.iscsi.disk(mac) if self.iscsi is not None else None
        if disk is None:
            return None
        ic = self.config.iscsi
        p = disk.plan
        return render.IscsiLogin(target_iqn=p.target_iqn, portal=str(ic.portal or server_ip), port=ic.port,
                                 initiator_iqn=p.initiator_iqn, user=p.user, secret=disk.secret)

    # -- reload -------------------------------------------------------------
    async def reload(self) -> ReloadResult:
        """Re-read config + inventory; on any error keep the old snapshot serving."""
        async with self._lock:
            try:
                new = load_snapshot(self.config_path, self._snap.generation + 1, self.inventory_source)
                # refused: what the new config lacks and the running one does not (checked now)
                found = await asyncio.to_thread(self._inspect, new.config)
                running = await asyncio.to_thread(self._inspect, self.config)
                refused = preflight.refused_at_reload(found, running)
                if refused:
                    raise ConfigError(refused[0].key, "; ".join(
                        f"{p.path}: {p.reason}; fix: {p.fix}" if p is refused[0] else str(p) for p in refused))
            except (SidusError, OSError) as exc:
                result = ReloadResult(False, str(exc))
                self.observer.count("reload.refused")
                self.log.error("reload.refused", error=str(exc))
            else:
                restart = [f"{key} changed: restart sidusd to apply it"
                           for key in config_mod.restart_needed(self.config, new.config)]
                self._snap = new
                self.observer.set_known(new.inventory.hosts)
                self._note_problems(found)
                self.observer.count("reload.ok")
                self.log.info("reload.ok", generation=new.generation, restart_needed=restart)
                await self.apply_backends()
                await self._changed()
                result = ReloadResult(True, None, restart)
            self.last_reload = {"t": time.time(), **result.as_dict()}
            return result

    def check_start(self) -> None:
        """Verify what a boot needs before serving (sidusd/preflight.py): every problem is logged
        at error and kept for status; a missing TFTP root or interface refuses the start."""
        self._note_problems(self._inspect(self.config))
        fatal = preflight.fatal_at_start(self.preflight)
        if fatal:
            raise ConfigError(fatal[0].key, "; ".join(
                f"{p.path}: {p.reason}; fix: {p.fix}" if p is fatal[0] else str(p) for p in fatal))

    def _note_problems(self, found: list[preflight.Problem]) -> None:
        had = {(p.key, p.path) for p in self.preflight}
        self.preflight = list(found)
        for p in found:
            if (p.key, p.path) not in had:
                self.log.error("preflight.problem", **p.as_dict())

    async def edit_inventory(self, fn: Callable[[inv_mod.Inventory], inv_mod.Inventory]) -> inv_mod.Inventory:
        """Apply ``fn`` to the inventory, check it, write the file atomically, swap."""
        async with self._lock:
            snap = self._snap
            # Start from the file on disk, not the copy in memory: an admin's hand
            # edit that was not reloaded yet must not be silently overwritten.
            on_disk = await asyncio.to_thread(read_inventory, snap.config.inventory_file)
            new_inv = fn(on_disk)
            inv_mod.check_against(new_inv, snap.config)
            data = inv_mod.dump_inventory(new_inv).encode()
            await asyncio.to_thread(atomic_write, snap.config.inventory_file, data, 0o640)
            self._snap = Snapshot(snap.config, new_inv, snap.generation + 1)
            self.observer.set_known(new_inv.hosts)
            self.observer.count("inventory.writes")
            self.log.info("inventory.written", hosts=len(new_inv.hosts), generation=self.generation)
            await self.apply_iscsi()
            await self._changed()
            return new_inv

    async def _changed(self) -> None:
        for fn in list(self.on_change):
            try:
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
            except Exception as exc:  # a subscriber must not undo a good reload
                self.log.error("runtime.on_change_failed", error=repr(exc))

    # -- storage backends ---------------------------------------------------
    async def apply_backends(self) -> None:
        """Bring the NFS exports and iSCSI targets in line with the config; failures go to status."""
        if self._nfs_factory is not None:
            await self._apply_nfs(self._nfs_factory)
        await self.apply_iscsi()

    async def _apply_nfs(self, factory: Callable[[config_mod.Config], NfsManager]) -> None:
        try:
            if self._nfs is None:
                self._nfs = factory(self.config)
            await self._nfs.apply(self.config)
        except BackendError as exc:
            self.observer.count("nfs.errors")
            self.log.error("nfs.apply_failed", error=str(exc))
            self.backend_status["nfs"] = {"ok": False, "detail": str(exc)}
        else:
            self.backend_status["nfs"] = self._nfs.health()

    async def apply_iscsi(self) -> None:
        """Bring the per-host iSCSI disks and targets in line with config + inventory."""
        cfg = self.config
        try:
            if cfg.iscsi.backend == "none":
                if self.iscsi is not None:
                    await self.iscsi.remove_all()
                    self.iscsi = None
                self.backend_status.pop("iscsi", None)
                return
            if self.iscsi is None:
                self.iscsi = self._iscsi_factory(cfg)
            await self.iscsi.apply(cfg, self.inventory)
        except BackendError as exc:
            self.observer.count("iscsi.errors")
            self.log.error("iscsi.apply_failed", error=str(exc))
            self.backend_status["iscsi"] = {"ok": False, "detail": str(exc)}
        else:
            self.backend_status["iscsi"] = self.iscsi.health()
        if self.iscsi is not None and self._iscsi_watch is None and self._iscsi_watch_s > 0:
            self._iscsi_watch = asyncio.get_running_loop().create_task(self._watch_iscsi())

    async def _watch_iscsi(self) -> None:
        """Restore the targets a restarted tgtd lost (its targets live in memory only).

        Checked every ``iscsi_watch_s``; while the check keeps failing (tgtd
        down) every failure is counted and shown by ``sidusctl status``, but
        logged only at growing intervals (:class:`RepeatBackoff`), and once
        more when it works again (``iscsi.watch_recovered``).
        """
        backoff = RepeatBackoff()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._iscsi_watch_s)
            if self.iscsi is None:
                continue
            try:
                async with self._lock:
                    if await self.iscsi.ensure():
                        self.observer.count("iscsi.restored")
                        self.log.warning("iscsi.restored", targets=len(self.iscsi.disks))
                    self.backend_status["iscsi"] = self.iscsi.health()
            except BackendError as exc:
                self.observer.count("iscsi.errors")
                self.backend_status["iscsi"] = {"ok": False, "detail": str(exc)}
                if backoff.failed(str(exc), loop.time()):
                    self.log.error("iscsi.watch_failed", error=str(exc), failures=backoff.streak,
                                   suppressed=backoff.take_suppressed())
            else:
                failures = backoff.recovered()
                if failures:
                    self.log.warning("iscsi.watch_recovered", failures=failures)

    async def stop_watchers(self) -> None:
        """Stop background work (the tgtd watch).  Exports and targets stay up:
        machines that booted keep their root and their disk while sidusd restarts."""
        await self.booted.aclose()      # pending booted records written
        if self._iscsi_watch is not None:
            self._iscsi_watch.cancel()
            try:
                await self._iscsi_watch
            except (asyncio.CancelledError, Exception):
                pass
            self._iscsi_watch = None

    async def remove_backends(self) -> None:
        await self.stop_watchers()
        if self.iscsi is not None:
            try:
                await self.iscsi.remove_all()
            except BackendError as exc:
                self.log.error("iscsi.remove_failed", error=str(exc))
        if self._nfs is not None:
            try:
                await self._nfs.remove_all()
            except BackendError as exc:
                self.log.error("nfs.remove_failed", error=str(exc))

    def refresh_backend_status(self) -> None:
        if self._nfs is not None:
            self.backend_status["nfs"] = self._nfs.health()
        if self.iscsi is not None:
            self.backend_status["iscsi"] = self.iscsi.health()

    def status(self) -> dict[str, Any]:
        self.refresh_backend_status()
        problems = self._inspect(self.config)       # as things are now (a few stat calls)
        return {"pid": os.getpid(), "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 1),
                "config_path": str(self.config_path), "generation": self.generation,
                "last_reload": self.last_reload, "backend_status": self.backend_status,
                "privsep": self.process_info is not None,
                "preflight": [p.as_dict() for p in problems],
                "broken_images": preflight.broken_images(problems),
                "processes": self.process_info() if self.process_info is not None else [_this_process()]}


def _this_process() -> dict[str, Any]:
    """The one process of a daemon without privilege separation, for status."""
    from .privsep.creds import describe
    d = describe("self")
    return {"role": "sidusd", "pid": os.getpid(),
            **{k: d.get(k) for k in ("user", "uid", "groups", "cap_eff", "cap_prm", "cap_bnd", "no_new_privs")}}
