"""What generations hold and what they share: ``diff``, own/shared sizes, records of removed ones.

* :func:`installed_packages` reads ``var/lib/dpkg/status`` (pure :func:`parse_status`);
  :func:`package_diff` says what was added, removed and upgraded between two roots.
* :func:`changed_files` compares two trees.  Generations made by hard-link farms
  (sidusd.image.layers) share the inode of every unchanged file, so an entry with the
  same inode is unchanged without reading it; only entries with different inodes are
  compared (metadata, then content).
* :func:`diff` = both, files owned by a changed package and the package manager's own
  state (:data:`PACKAGE_STATE`) reported apart from the other changed files.
* :func:`sharing`: per generation, the bytes of inodes only it uses (own) and of inodes
  it shares with other generations (shared).
* :func:`removal_record`: the short record ``gc`` keeps of a generation it removes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE_STATE = ("var/lib/dpkg/", "var/lib/apt/", "var/cache/apt/", "var/cache/debconf/", "var/log/apt/",
                 "var/log/dpkg.log", "var/log/alternatives.log", "var/cache/ldconfig/", "etc/ld.so.cache")


def parse_status(text: str) -> dict[str, str]:
    """Installed packages (``Status: ... installed``) of a dpkg status file: name -> version
    (``name:arch`` for a ``Multi-Arch: same`` package, as dpkg names its files)."""
    out: dict[str, str] = {}
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
        if "package" not in fields or not fields.get("status", "").endswith(" installed"):
            continue
        name = fields["package"]
        if fields.get("multi-arch") == "same" and fields.get("architecture"):
            name = f"{name}:{fields['architecture']}"
        out[name] = fields.get("version", "")
    return out


def installed_packages(root: Path) -> dict[str, str]:
    try:
        return parse_status((Path(root) / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return {}


def package_diff(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, dict]:
    """Packages added (in b only), removed (in a only) and upgraded (other version; "upgraded"
    also holds downgrades: name -> [old, new])."""
    return {"added": {k: b[k] for k in sorted(b.keys() - a.keys())},
            "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
            "upgraded": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}}


def _entries(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    continue
                keep.append(n)
            out[os.path.normpath(os.path.join(rel_dir, n))] = st
        dirnames[:] = [d for d in dirnames if d in keep]
    return out


def _xattrs(p: str) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
    except OSError:
        return {}


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _same(a_root: Path, b_root: Path, rel: str, sa: os.stat_result, sb: os.stat_result) -> bool:
    if (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev):
        return True                                   # one inode: unchanged (hard-link farm)
    if sa.st_ino == sb.st_ino and sa.st_ctime_ns == sb.st_ctime_ns and not stat.S_ISDIR(sa.st_mode):
        return True                                   # a btrfs snapshot's untouched file (ctime unsettable)
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    pa, pb = str(a_root / rel), str(b_root / rel)
    if _xattrs(pa) != _xattrs(pb):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True                                   # its entries are compared one by one
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(pa) == os.readlink(pb)
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if not stat.S_ISREG(sa.st_mode):
        return True
    return sa.st_size == sb.st_size and _same_content(pa, pb)


def changed_files(a_root: Path, b_root: Path) -> list[tuple[str, str]]:
    """``(status, path)`` for every entry that differs: ``A`` only in b, ``D`` only in a, ``M``
    other content, type, mode, owner or xattrs; sorted by path."""
    a, b = _entries(Path(a_root)), _entries(Path(b_root))
    out = [("A", p) for p in b.keys() - a.keys()] + [("D", p) for p in a.keys() - b.keys()]
    out += [("M", p) for p in a.keys() & b.keys() if not _same(Path(a_root), Path(b_root), p, a[p], b[p])]
    return sorted(out, key=lambda t: t[1])


def package_files(root: Path, names: Iterable[str]) -> set[str]:
    """Paths (relative, no leading /) that dpkg lists for packages ``names`` in ``root``."""
    out: set[str] = set()
    info = Path(root) / "var/lib/dpkg/info"
    for n in names:
        try:
            text = (info / f"{n}.list").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        out.update(line.strip().lstrip("/") for line in text.splitlines() if line.strip() not in ("", "/."))
    return out


def diff(a_root: Path, b_root: Path) -> dict:
    """Packages added/removed/upgraded from a to b, and the changed files outside the packages
    that changed and outside the package manager's state (``files``); counts of the others."""
    pa, pb = installed_packages(a_root), installed_packages(b_root)
    pkgs = package_diff(pa, pb)
    touched = set(pkgs["added"]) | set(pkgs["removed"]) | set(pkgs["upgraded"])
    owned = package_files(a_root, touched) | package_files(b_root, touched)
    files, in_pkgs, state = [], 0, 0
    for status, rel in changed_files(a_root, b_root):
        if rel in owned:
            in_pkgs += 1
        elif rel.startswith(PACKAGE_STATE) or rel + "/" in PACKAGE_STATE:
            state += 1
        else:
            files.append([status, rel])
    return {"packages": pkgs, "files": files, "package_files_changed": in_pkgs, "package_state_changed": state}


def sharing(roots: Mapping[int, Path], alias: Mapping[int, int] | None = None) -> dict[int, tuple[int, int]]:
    """Generation -> (own bytes, shared bytes): an inode (st_blocks, directories too) that one
    generation alone uses is its own, one that several use is shared by each of them.  ``alias``:
    st_dev -> the st_dev of the file system that holds its inodes (an overlay view on one file
    system reports that file system's inode numbers under a device of its own)."""
    users: dict[tuple[int, int], set[int]] = {}
    blocks: dict[tuple[int, int], int] = {}
    own = {n: 0 for n in roots}
    alias = alias or {}
    for n, root in roots.items():
        rst = os.lstat(root)
        for st in (rst, *_entries(Path(root)).values()):
            key = (alias.get(st.st_dev, st.st_dev), st.st_ino)
            users.setdefault(key, set()).add(n)
            blocks[key] = st.st_blocks * 512
    shared = {n: 0 for n in roots}
    for key, gens in users.items():
        for n in gens:
            if len(gens) == 1:
                own[n] += blocks[key]
            else:
                shared[n] += blocks[key]
    return {n: (own[n], shared[n]) for n in roots}


def removal_record(image: str, number: int, meta: Mapping, root: Path, booted: Iterable, now: str) -> dict:
    """What ``gc`` keeps of a generation it removes: when, what made it (kind, message, parent,
    created), its packages (name=version) and the machines that booted it (``booted``: records
    of sidusd's booted file whose root is this generation's)."""
    return {"image": image, "generation": number, "removed": now, "kind": meta.get("kind"),
            "message": meta.get("message"), "parent": meta.get("parent"), "created": meta.get("created"),
            "packages": [f"{k}={v}" for k, v in sorted(installed_packages(root).items())],
            "booted": [{"mac": r.mac, "hostname": r.hostname, "last_served": r.last_s} for r in booted]}
