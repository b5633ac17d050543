"""Per-host iSCSI disks: the writable layer of persistent machines.

A host whose profile has ``overlay: iscsi`` gets its own disk on the boot
server: a sparse backing file, a target with a per-host IQN (RFC 3720 §3.2.6),
an ACL that admits only that host's initiator name, and one-way CHAP
(RFC 3720 §11.1.4, RFC 1994) with a per-host secret.  No target is ever
created with open access: the target is created, its LUN and CHAP account
bound, and only then is the initiator admitted (tgt admits nobody while a
target has no ACL entry).

* :func:`plan_disks` (pure) turns config + inventory into :class:`DiskPlan`.
* :class:`SecretStore` keeps the secrets (``secrets.token_urlsafe``, 24 bytes)
  in one JSON file, mode 0600, written with :func:`~sidusd.fsutil.atomic_write`.
  A secret is never logged; :class:`Disk` hides it from ``repr``.
* :class:`TgtBackend` drives tgtd with ``tgtadm`` (targets live in tgtd's
  memory only: :meth:`IscsiManager.apply` is idempotent and restores them
  after a tgtd restart).  tgtadm only takes the CHAP password on its command
  line, so it is visible in ``/proc/<pid>/cmdline`` for the few milliseconds
  the call lasts (root-only readable on hardened hosts with ``hidepid``).
* :class:`~sidusd.storage.iscsi_manager.IscsiManager` (iscsi_manager.py) is
  the facade the runtime calls: disks, secrets and targets together.
* :class:`~sidusd.storage.iscsi_lio.LioBackend` (iscsi_lio.py) drives the
  kernel's LIO target: targetcli for structure, the CHAP secret written
  straight into configfs (never in an argv).
"""

from __future__ import annotations

import json
import re
import secrets as secrets_mod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidusd.errors import BackendError
from sidusd.fsutil import atomic_write
from sidusd.storage.runner import Runner

SECRET_BYTES = 24                 # token_urlsafe(24) -> 32 characters (RFC 3720 §8.2.1: >= 12 bytes)
MANAGED_MARK = ":sidus-"          # every sidus target IQN contains this
_IQN = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[a-z0-9.:-]+)?$")


def mac_key(mac: str) -> str:
    """``52:54:00:ab:cd:ef`` -> ``525400abcdef`` (IQNs and CHAP user names)."""
    return mac.replace(":", "").lower()


def target_iqn(prefix: str, mac: str) -> str:
    """The disk target of host ``mac``: ``<prefix>:sidus-disk-<mac hex>`` (RFC 3720 §3.2.6.3.1)."""
    return f"{prefix}{MANAGED_MARK}disk-{mac_key(mac)}"


def initiator_iqn(prefix: str, mac: str) -> str:
    """The only initiator name admitted to that host's target."""
    return f"{prefix}{MANAGED_MARK}host-{mac_key(mac)}"


def chap_user(mac: str) -> str:
    """CHAP user name of host ``mac`` (RFC 3720 §11.1.4 CHAP_N)."""
    return f"sidus-{mac_key(mac)}"


def check_iqn(where: str, iqn: str) -> str:
    """Refuse a name that is not an ``iqn.`` name in lower case (RFC 3720 §3.2.6.3.1)."""
    if len(iqn) > 223 or not _IQN.match(iqn):
        raise ValueError(f"{where}: {iqn!r} is not an iqn.YYYY-MM.reversed.domain[:name] name")
    return iqn


@dataclass(frozen=True)
class DiskPlan:
    """What one persistent host needs (no secret: see :class:`Disk`)."""

    mac: str
    hostname: str | None
    target_iqn: str
    initiator_iqn: str
    user: str
    backing_file: Path
    size_bytes: int


@dataclass(frozen=True)
class Disk:
    """A :class:`DiskPlan` with its CHAP secret (hidden from repr)."""

    plan: DiskPlan
    secret: str = field(repr=False)


def plan_disks(config: Any, inventory: Any) -> list[DiskPlan]:
    """One :class:`DiskPlan` per host whose resolved profile has ``overlay: iscsi`` (pure)."""
    ic = config.iscsi
    out = []
    for host in sorted(inventory.hosts.values(), key=lambda h: h.mac):
        profile = inventory.profiles.get(host.profile)
        if profile is None or profile.overlay != "iscsi":
            continue
        size_mib = profile.disk_size_mib or ic.default_size_mib
        out.append(DiskPlan(
            mac=host.mac, hostname=host.hostname,
            target_iqn=target_iqn(ic.iqn_prefix, host.mac),
            initiator_iqn=initiator_iqn(ic.iqn_prefix, host.mac),
            user=chap_user(host.mac),
            backing_file=Path(ic.state_dir) / f"disk-{mac_key(host.mac)}.img",
            size_bytes=size_mib * 1024 * 1024))
    return out


# -- secrets ------------------------------------------------------------------

class SecretStore:
    """Per-host CHAP secrets in one JSON file ``{"<mac>": "<secret>"}``, mode 0600."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, str]:
        """The stored secrets; {} when the file does not exist.  Raises BackendError if unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot read the iSCSI secrets file {self.path}",
                               detail=type(exc).__name__) from None   # never echo the content
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in data.items()):
            raise BackendError(f"iSCSI secrets file {self.path} is not a JSON object of strings")
        return data

    def _save(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode(), 0o600)

    def ensure(self, macs: Sequence[str]) -> dict[str, str]:
        """Secrets for ``macs``: stored ones kept, missing ones generated and saved first."""
        data = self.load()
        missing = [m for m in macs if len(data.get(m, "")) < 16]
        for mac in missing:
            data[mac] = secrets_mod.token_urlsafe(SECRET_BYTES)
        if missing:
            self._save(data)
        return {m: data[m] for m in macs}

    def rotate(self, mac: str) -> str:
        """Give ``mac`` a new secret (saved before it is returned)."""
        data = self.load()
        data[mac] = secrets_mod.token_urlsafe(SECRET_BYTES)
        self._save(data)
        return data[mac]

    def forget(self, mac: str) -> None:
        data = self.load()
        if data.pop(mac, None) is not None:
            self._save(data)


# -- tgt ----------------------------------------------------------------------

@dataclass
class TgtTarget:
    """A target as ``tgtadm --mode target --op show`` reports it."""

    tid: int
    iqn: str
    backing: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    acls: list[str] = field(default_factory=list)
    sessions: int = 0


def parse_tgt_show(text: str) -> dict[str, TgtTarget]:
    """Parse ``tgtadm --lld iscsi --mode target --op show`` into ``{iqn: TgtTarget}``."""
    targets: dict[str, TgtTarget] = {}
    cur: TgtTarget | None = None
    section = ""
    for raw in text.splitlines():
        m = re.match(r"^Target (\d+): (\S+)\s*$", raw)
        if m:
            cur = TgtTarget(int(m.group(1)), m.group(2))
            targets[cur.iqn] = cur
            section = ""
            continue
        if cur is None:
            continue
        line = raw.strip()
        if raw.startswith("    ") and not raw.startswith("     ") and line.endswith(":"):
            section = line[:-1]
            continue
        if section == "I_T nexus information" and line.startswith("I_T nexus:"):
            cur.sessions += 1
        elif section == "LUN information" and line.startswith("Backing store path:"):
            path = line.split(":", 1)[1].strip()
            if path != "None":
                cur.backing.append(path)
        elif section == "Account information" and line:
            cur.accounts.append(line.split()[0])
        elif section == "ACL information" and line:
            cur.acls.append(line)
    return targets


def tgt_create_commands(tid: int, disk: Disk) -> list[list[str]]:
    """tgtadm argv lists creating one target, closed until its last step admits the initiator.

    Order: account (replaced), target, LUN 1, account bound, initiator name bound.
    """
    p = disk.plan
    return [
        ["--mode", "account", "--op", "delete", "--user", p.user],        # may fail: not there
        ["--mode", "account", "--op", "new", "--user", p.user, "--password", disk.secret],
        ["--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", p.target_iqn],
        ["--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1",
         "--backing-store", str(p.backing_file)],
        ["--mode", "account", "--op", "bind", "--tid", str(tid), "--user", p.user],
        ["--mode", "target", "--op", "bind", "--tid", str(tid), "--initiator-name", p.initiator_iqn],
    ]


def tgt_delete_commands(t: TgtTarget) -> list[list[str]]:
    """tgtadm argv lists removing a target (even with sessions) and its accounts."""
    cmds = [["--mode", "target", "--op", "delete", "--force", "--tid", str(t.tid)]]
    cmds += [["--mode", "account", "--op", "delete", "--user", u] for u in t.accounts]
    return cmds


def tgt_matches(t: TgtTarget, p: DiskPlan) -> bool:
    """True when the live target already is what the plan says (LUN, account, ACL)."""
    return t.backing == [str(p.backing_file)] and t.accounts == [p.user] and t.acls == [p.initiator_iqn]


class TgtBackend:
    """tgtd through tgtadm (``-C control_port`` selects one tgtd among several)."""

    name = "tgt"

    def __init__(self, runner: Runner, control_port: int = 0, timeout_s: float = 30):
        self.runner = runner
        self.control_port = control_port
        self.timeout_s = timeout_s

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]

    async def _run(self, args: Sequence[str], check: bool = True):
        res = await self.runner.arun(self.argv(args), timeout_s=self.timeout_s)
        if check and res.rc != 0:
            # the argv may carry a password: report the operation, never the argv
            raise BackendError(f"tgtadm {' '.join(args[:4])} failed (status {res.rc})",
                               detail=(res.err.strip() or res.out.strip())[-500:])
        return res

    async def show(self) -> dict[str, TgtTarget]:
        """The targets tgtd has now; BackendError when tgtd does not answer."""
        res = await self._run(["--mode", "target", "--op", "show"])
        return parse_tgt_show(res.out)

    async def apply(self, disks: Sequence[Disk], refresh: Sequence[str] = ()) -> dict[str, list[str]]:
        """Make tgtd serve exactly ``disks`` among the sidus targets.

        A live target that matches its plan is kept (a running machine keeps
        its session); for the IQNs in ``refresh`` its CHAP account is
        re-created with the current secret (CHAP is checked at login only).
        """
        live = await self.show()
        wanted = {d.plan.target_iqn: d for d in disks}
        to_refresh = set(refresh)
        done: dict[str, list[str]] = {"created": [], "kept": [], "removed": []}
        for iqn, t in sorted(live.items()):
            if MANAGED_MARK in iqn and (iqn not in wanted or not tgt_matches(t, wanted[iqn].plan)):
                await self._delete(t)
                del live[iqn]
                if iqn not in wanted:
                    done["removed"].append(iqn)
        used = {t.tid for t in live.values()}
        for iqn, disk in sorted(wanted.items()):
            if iqn in live:
                if iqn in to_refresh:
                    live_tid, user = live[iqn].tid, disk.plan.user
                    await self._run(["--mode", "account", "--op", "unbind", "--tid", str(live_tid), "--user", user],
                                    check=False)
                    cmds = tgt_create_commands(live_tid, disk)
                    await self._run(cmds[0], check=False)
                    await self._run(cmds[1])
                    await self._run(cmds[4])
                done["kept"].append(iqn)
                continue
            tid = next(n for n in range(1, len(used) + 2) if n not in used)
            used.add(tid)
            cmds = tgt_create_commands(tid, disk)
            await self._run(cmds[0], check=False)       # a stale account of the same name
            for cmd in cmds[1:]:
                await self._run(cmd)
            done["created"].append(iqn)
        return done

    async def _delete(self, t: TgtTarget) -> None:
        cmds = tgt_delete_commands(t)
        await self._run(cmds[0])
        for cmd in cmds[1:]:
            await self._run(cmd, check=False)

    async def remove(self, iqn: str) -> bool:
        t = (await self.show()).get(iqn)
        if t is None:
            return False
        await self._delete(t)
        return True
