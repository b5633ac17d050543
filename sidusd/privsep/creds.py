"""Users, capabilities and the privilege drop of the worker (Linux).

:func:`drop_privileges` is the one place that gives up root; it checks its own
result in ``/proc/self/status`` and raises :class:`PrivilegeError` rather than
run half-dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
from dataclasses import dataclass
from typing import Any

from ..errors import StartupError

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28


class PrivilegeError(StartupError):
    """The worker could not give up its privileges (it then refuses to run)."""


@dataclass(frozen=True)
class WorkerUser:
    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> WorkerUser:
    """The unprivileged user ``name``; :class:`StartupError` with the fix if missing or root."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise StartupError(
            f"security.worker_user: user {name!r} does not exist: create it "
            f"(scripts/setup, or systemd-sysusers with systemd/sidus.sysusers), "
            f"or set security.privsep: false") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise StartupError(f"security.worker_user: user {name!r} has uid/gid 0: it must be unprivileged")
    return WorkerUser(name, pw.pw_uid, pw.pw_gid)


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: Any, option: int, arg2: int = 0, arg3: int = 0) -> None:
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}) failed: {os.strerror(err)}")


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (empty if the process is gone)."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def describe(pid: int | str = "self") -> dict[str, Any]:
    """uid, user, groups and capability sets of a process, read from ``/proc`` (for status)."""
    st = proc_status(pid)
    if not st:
        return {"alive": False}
    uids = st.get("Uid", "").split()
    uid = int(uids[1]) if len(uids) > 1 else -1          # effective uid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"alive": True, "uid": uid, "user": user,
            "uids": [int(u) for u in uids],
            "groups": [int(g) for g in st.get("Groups", "").split()],
            "cap_eff": st.get("CapEff"), "cap_prm": st.get("CapPrm"), "cap_bnd": st.get("CapBnd"),
            "cap_amb": st.get("CapAmb"), "no_new_privs": st.get("NoNewPrivs") == "1"}


def drop_privileges(user: WorkerUser) -> None:
    """Become ``user`` for good: no capability in any set, no way back, no new privileges.

    Order: bounding set emptied (needs CAP_SETPCAP, so first), ambient set
    cleared, supplementary groups dropped, gid then uid set (real, effective
    and saved: the kernel then clears the permitted and effective sets),
    ``PR_SET_NO_NEW_PRIVS``.  Checked afterwards from ``/proc/self/status``.
    """
    libc = _libc()
    if os.geteuid() == 0:
        _prctl(libc, PR_SET_KEEPCAPS, 0)
        for cap in range(last_cap() + 1):
            _prctl(libc, PR_CAPBSET_DROP, cap)
        try:
            _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        except PrivilegeError:
            pass                                           # kernels without ambient caps
        os.setgroups([])
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    check_dropped(user)


def check_dropped(user: WorkerUser) -> None:
    """Raise :class:`PrivilegeError` unless this process is ``user`` with no capability at all."""
    d = describe("self")
    problems = []
    if d.get("uids") != [user.uid] * 4:
        problems.append(f"uids {d.get('uids')}")
    if d.get("groups"):
        problems.append(f"supplementary groups {d.get('groups')}")
    for k in ("cap_eff", "cap_prm", "cap_bnd", "cap_amb"):
        v = d.get(k)
        if v is not None and int(v, 16) != 0:
            problems.append(f"{k} {v}")
    if not d.get("no_new_privs"):
        problems.append("no_new_privs not set")
    if problems:
        raise PrivilegeError("worker privilege drop incomplete: " + ", ".join(problems))


def set_parent_death_signal(sig: int) -> None:
    """Get ``sig`` when the supervisor dies (set after the uid change, which clears it)."""
    try:
        _prctl(_libc(), PR_SET_PDEATHSIG, sig)
    except PrivilegeError:
        pass
