"""LIO, the kernel iSCSI target, as a backend of the iSCSI target manager.

Same interface as :class:`~sidusd.storage.iscsi.TgtBackend`: ``apply(disks,
refresh)``, ``show()``, ``remove(iqn)``.  The division of work:

* **structure** (fileio backstore, target, TPG attributes, portal, LUN, ACL,
  mapped LUN) through ``targetcli`` (targetcli-fb), one argv per command;
* **the CHAP secret** written straight into configfs,
  ``<root>/iscsi/<iqn>/tpgt_1/acls/<initiator>/auth/{userid,password}``
  (one ``write(2)`` of the bare value, no newline: the kernel keeps the bytes
  as given), so it never appears in a process argv, a log line or an error;
* **show** reads configfs only (targets, their LUN's backing file, ACLs,
  CHAP user names, sessions from each ACL's ``info``), no program started.

A target is never open (RFC 3720 §11.1.4 CHAP for every login): the TPG gets
``authentication=1`` and ``generate_node_acls=0`` (no demo mode) before any
ACL exists, and the ACL is created without LUNs, given its CHAP user and
secret, and only then mapped to LUN 1 (the LUN the initramfs hook uses).

``targetcli saveconfig`` is deliberately not run: sidusd re-creates its
targets on every start (like tgt's), and a saved configuration would be a
second copy of every CHAP secret in ``/etc/target/saveconfig.json``.  The
kernel keeps the targets while sidusd restarts; a host reboot loses them and
sidusd's start brings them back.

``root`` (default ``/sys/kernel/config/target``) is a constructor argument so
that unit tests drive the backend against a fake tree.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.storage.iscsi import MANAGED_MARK, Disk, DiskPlan, mac_key
from sidusd.storage.runner import Runner

LIO_CONFIGFS = Path("/sys/kernel/config/target")
TPG = "tpgt_1"              # targetcli's tpg1
LUN = 1                     # the initramfs hook logs in and uses LUN 1
BACKSTORE_PREFIX = "sidus-"
ALL_ADDRESSES = ("0.0.0.0", "::0", "::")
# targetcli joins its arguments with spaces and parses them again: only plain words go through
_WORD = re.compile(r"^[A-Za-z0-9._/:=+,@\[\]-]+$")
# the TPG attributes that keep a target closed (targetcli's "set attribute" names)
CLOSED_ATTRIBUTES = {"authentication": "1", "generate_node_acls": "0", "demo_mode_write_protect": "1",
                     "cache_dynamic_acls": "0"}


def backstore_name(mac: str) -> str:
    """The fileio backstore of host ``mac``: ``sidus-<mac hex>``."""
    return f"{BACKSTORE_PREFIX}{mac_key(mac)}"


def missing_configfs_error(root: Path) -> BackendError:
    return BackendError(
        f"iscsi.backend lio: {root} absent: load target_core_mod and iscsi_target_mod "
        "(modprobe iscsi_target_mod) and mount configfs on /sys/kernel/config",
        detail="LIO is the kernel's target: it needs those modules; "
               "iscsi.backend: tgt is the userspace alternative")


@dataclass
class LioTarget:
    """A target as configfs shows it (``sessions`` counts ACLs with a logged-in initiator)."""

    iqn: str
    backing: list[str] = field(default_factory=list)      # udev_path of each LUN's fileio object
    backstores: list[str] = field(default_factory=list)   # "fileio_N/name" of each LUN
    luns: list[int] = field(default_factory=list)
    acls: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)        # CHAP userid of each ACL
    mapped: list[int] = field(default_factory=list)       # mapped LUNs of all ACLs
    portals: list[str] = field(default_factory=list)      # np entries, "ip:port" / "[ip6]:port"
    attributes: dict[str, str] = field(default_factory=dict)
    enabled: bool = False
    sessions: int = 0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _split_portal(np: str) -> tuple[str, int]:
    """``10.0.0.1:3260`` / ``[::0]:3260`` -> (ip, port)."""
    host, _, port = np.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def read_configfs(root: Path) -> tuple[dict[str, LioTarget], dict[str, str]]:
    """Every iSCSI target under ``root``, and every fileio backstore ``{"fileio_N/name": udev_path}``."""
    backstores: dict[str, str] = {}
    core = root / "core"
    if core.is_dir():
        for hba in sorted(core.glob("fileio_*")):
            for so in sorted(p for p in hba.iterdir() if p.is_dir()):
                backstores[f"{hba.name}/{so.name}"] = _read(so / "udev_path")
    targets: dict[str, LioTarget] = {}
    fabric = root / "iscsi"
    if not fabric.is_dir():
        return targets, backstores
    for tdir in sorted(p for p in fabric.iterdir() if p.is_dir() and not p.is_symlink()):
        tpg = tdir / TPG
        if not tpg.is_dir():
            continue        # discovery_auth and the like, or a target without tpg 1
        t = LioTarget(tdir.name)
        t.enabled = _read(tpg / "enable") == "1"
        t.attributes = {k: _read(tpg / "attrib" / k) for k in CLOSED_ATTRIBUTES}
        if (tpg / "np").is_dir():
            t.portals = sorted(p.name for p in (tpg / "np").iterdir() if p.is_dir())
        for lun in sorted((tpg / "lun").glob("lun_*")) if (tpg / "lun").is_dir() else ():
            links = [p for p in lun.iterdir() if p.is_symlink()]
            if not links or not lun.name[4:].isdigit():
                continue
            so = Path(os.readlink(links[0]))
            key = f"{so.parent.name}/{so.name}"
            t.luns.append(int(lun.name[4:]))
            t.backstores.append(key)
            t.backing.append(backstores.get(key, ""))
        acls = tpg / "acls"
        for acl in sorted(p for p in acls.iterdir() if p.is_dir()) if acls.is_dir() else ():
            t.acls.append(acl.name)
            user = _read(acl / "auth" / "userid")
            t.users.append("" if user == "NULL" else user)
            t.mapped += sorted(int(m.name[4:]) for m in acl.glob("lun_*") if m.name[4:].isdigit())
            info = _read(acl / "info")
            if info and not info.startswith("No active"):
                t.sessions += 1
        targets[t.iqn] = t
    return targets, backstores


def lio_matches(t: LioTarget, p: DiskPlan) -> bool:
    """True when the live target is what the plan says: closed, one LUN 1 on the host's
    backing file, one ACL for the host's initiator with its CHAP user and LUN 1 mapped."""
    return (t.attributes == CLOSED_ATTRIBUTES and t.enabled
            and t.luns == [LUN] and t.backing == [str(p.backing_file)]
            and t.backstores[0].split("/", 1)[1] == backstore_name(p.mac)
            and t.acls == [p.initiator_iqn] and t.users == [p.user] and t.mapped == [LUN])


class LioBackend:
    """LIO through targetcli (structure) and configfs (secrets, state)."""

    name = "lio"

    def __init__(self, runner: Runner, root: Path = LIO_CONFIGFS, portal: str | None = None,
                 port: int = 3260, targetcli: str = "targetcli", timeout_s: float = 60):
        self.runner = runner
        self.root = Path(root)
        self.portal = portal            # None: all addresses
        self.port = port
        self.targetcli = targetcli
        self.timeout_s = timeout_s
        self.check()

    # -- helpers ------------------------------------------------------------
    def check(self) -> None:
        """BackendError naming what is missing when LIO's configfs tree is not there."""
        if not self.root.is_dir():
            raise missing_configfs_error(self.root)

    def argv(self, path: str, *args: str) -> list[str]:
        """``targetcli PATH CMD ARGS``; refuses anything targetcli would split or reinterpret."""
        for a in (path, *args):
            if not _WORD.match(a):
                raise BackendError(f"targetcli argument {a!r} has characters targetcli would re-parse",
                                   detail="use paths and names made of letters, digits and ._/:=+,@-")
        return [self.targetcli, path, *args]

    async def _run(self, path: str, *args: str, check: bool = True):
        argv = self.argv(path, *args)
        res = await self.runner.arun(argv, timeout_s=self.timeout_s)
        if check and res.rc != 0:
            raise BackendError(f"targetcli {path} {' '.join(args[:1])} failed (status {res.rc})",
                               detail=(res.err.strip() or res.out.strip())[-500:])
        return res

    def _tpg(self, iqn: str) -> str:
        return f"/iscsi/{iqn}/tpg1"

    def _wanted_portal(self) -> str:
        return f"{self.portal or '0.0.0.0'}:{self.port}"

    def _portal_ok(self, np: str) -> bool:
        ip, port = _split_portal(np)
        if port != self.port:
            return False
        return ip == self.portal if self.portal else ip in ALL_ADDRESSES

    def write_auth(self, disk: Disk) -> None:
        """The ACL's CHAP user and secret, straight into configfs (never through an argv).

        Each attribute is opened write-only without O_CREAT (it must be the
        kernel's), written in one ``write(2)`` without a newline.
        """
        p = disk.plan
        auth = self.root / "iscsi" / p.target_iqn / TPG / "acls" / p.initiator_iqn / "auth"
        for name, value in (("userid", p.user), ("password", disk.secret)):
            path = auth / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise BackendError(f"cannot open {path} for writing",
                                   detail=os.strerror(exc.errno or errno.EIO)) from None
            try:
                data = value.encode()
                if os.write(fd, data) != len(data):
                    raise BackendError(f"short write to {path}")
            except OSError as exc:
                raise BackendError(f"cannot write {path}",
                                   detail=os.strerror(exc.errno or errno.EIO)) from None
            finally:
                os.close(fd)

    async def _read_tree(self) -> tuple[dict[str, LioTarget], dict[str, str]]:
        """:func:`read_configfs` off the loop; an OSError (a target deleted while it
        is read, configfs gone) becomes a BackendError, as callers expect."""
        self.check()
        try:
            return await asyncio.to_thread(read_configfs, self.root)
        except OSError as exc:
            raise BackendError(f"cannot read LIO's configfs tree {self.root}",
                               detail=f"{exc.filename}: {os.strerror(exc.errno or errno.EIO)}") from None

    # -- the backend interface -------------------------------------------------
    async def show(self) -> dict[str, LioTarget]:
        """The iSCSI targets LIO has now (read from configfs)."""
        targets, _ = await self._read_tree()
        return targets

    async def apply(self, disks: Sequence[Disk], refresh: Sequence[str] = ()) -> dict[str, list[str]]:
        """Make LIO serve exactly ``disks`` among the sidus targets (others are left alone).

        A live target that matches its plan is kept (a running machine keeps its
        session); for the IQNs in ``refresh`` its CHAP secret is written again
        (CHAP is checked at login only).
        """
        live, backstores = await self._read_tree()
        wanted = {d.plan.target_iqn: d for d in disks}
        to_refresh = set(refresh)
        done: dict[str, list[str]] = {"created": [], "kept": [], "removed": []}
        for iqn, t in sorted(live.items()):
            if MANAGED_MARK in iqn and (iqn not in wanted or not lio_matches(t, wanted[iqn].plan)):
                await self._run("/iscsi", "delete", iqn)
                del live[iqn]
                if iqn not in wanted:
                    done["removed"].append(iqn)
        # sidus backstores no kept target uses, or on another file than planned
        in_use = {key for t in live.values() for key in t.backstores}
        planned = {backstore_name(d.plan.mac): str(d.plan.backing_file) for d in disks}
        for key, path in sorted(backstores.items()):
            name = key.split("/", 1)[1]
            if name.startswith(BACKSTORE_PREFIX) and key not in in_use and planned.get(name) != path:
                await self._run("/backstores/fileio", "delete", name)
                del backstores[key]
        have = {key.split("/", 1)[1] for key in backstores}
        for iqn, disk in sorted(wanted.items()):
            if iqn in live:
                await self._fix_portals(iqn, live[iqn].portals)
                if iqn in to_refresh:
                    await asyncio.to_thread(self.write_auth, disk)
                done["kept"].append(iqn)
                continue
            await self._create(disk, backstore_name(disk.plan.mac) in have)
            done["created"].append(iqn)
        if done["created"]:
            now, _ = await self._read_tree()
            for iqn in done["created"]:
                made = now.get(iqn)
                if made is None or not lio_matches(made, wanted[iqn].plan):
                    raise BackendError(f"LIO target {iqn} is not as planned after targetcli",
                                       detail=repr(made))
        return done

    async def _create(self, disk: Disk, backstore_exists: bool) -> None:
        """Backstore, target (closed first, then enabled), portal, LUN 1, ACL, CHAP secret, LUN mapped last."""
        p = disk.plan
        bs = backstore_name(p.mac)
        tpg = self._tpg(p.target_iqn)
        if not backstore_exists:
            await self._run("/backstores/fileio", "create", f"name={bs}", f"file_or_dev={p.backing_file}",
                            f"size={p.size_bytes}", "sparse=true", "write_back=false")
        await self._run("/iscsi", "create", p.target_iqn)
        await self._run(tpg, "set", "attribute", *(f"{k}={v}" for k, v in CLOSED_ATTRIBUTES.items()))
        await self._run(tpg, "set", "parameter", "AuthMethod=CHAP")
        await self._run(tpg, "enable")          # (targetcli's auto_enable_tpgt may be off)
        tdir = self.root / "iscsi" / p.target_iqn / TPG / "np"
        current = sorted(x.name for x in tdir.iterdir()) if tdir.is_dir() else []
        await self._fix_portals(p.target_iqn, current)
        await self._run(f"{tpg}/luns", "create", f"/backstores/fileio/{bs}", f"lun={LUN}",
                        "add_mapped_luns=false")
        await self._run(f"{tpg}/acls", "create", p.initiator_iqn, "add_mapped_luns=false")
        await asyncio.to_thread(self.write_auth, disk)
        await self._run(f"{tpg}/acls/{p.initiator_iqn}", "create", f"mapped_lun={LUN}",
                        f"tpg_lun_or_backstore={LUN}", "write_protect=false")

    async def _fix_portals(self, iqn: str, current: Sequence[str]) -> None:
        """Exactly the configured portal on the target (targetcli adds a default one)."""
        ok = [np for np in current if self._portal_ok(np)]
        for np in current:
            if np not in ok[:1]:
                ip, port = _split_portal(np)
                await self._run(f"{self._tpg(iqn)}/portals", "delete", ip, str(port))
        if not ok:
            ip, port = _split_portal(self._wanted_portal())
            await self._run(f"{self._tpg(iqn)}/portals", "create", ip, str(port))

    async def remove(self, iqn: str) -> bool:
        """Delete target ``iqn`` and its sidus backstores (not the backing files)."""
        live, _ = await self._read_tree()
        t = live.get(iqn)
        if t is None:
            return False
        await self._run("/iscsi", "delete", iqn)
        for key in t.backstores:
            name = key.split("/", 1)[1]
            if name.startswith(BACKSTORE_PREFIX):
                await self._run("/backstores/fileio", "delete", name, check=False)
        return True
