"""The rack's side of a push: its directory, the manifest of a tree, the two steps that run on
the rack's file system (docs/scale.md "Image rollout").

:class:`Rack` (the layout: sidusd.image.rollout_plan), :func:`tree_manifest`, :func:`run_rsync`;
:func:`begin` (the plan, a final directory without a marker taken back to staging) and
:func:`commit` (the manifest of what arrived checked, renamed into place, the marker, ``current``,
the images file).  ``sidus-image push`` to a local rack runs both here (sidusd.image.rollout), a
push over ssh runs them on the rack in ``rack-receive`` (sidusd.image.rollout_remote).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import _fsync_dir, atomic_write
from sidusd.image import publish
from sidusd.image import rollout_plan as rp
from sidusd.image.generations import ImageStore

RSYNC_TIMEOUT_S = 6 * 3600


def walk_entries(top: Path) -> list[rp.Entry]:
    """The manifest entries of the tree under ``top`` (lstat, not followed)."""
    out: list[rp.Entry] = []
    top = Path(top)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for n in [".", *dirnames, *filenames] if dirpath == str(top) else [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, top)
            m = st.st_mode
            kind, size, mtime, target = "?", 0, 0, ""
            if stat.S_ISREG(m):
                kind, size, mtime = "f", st.st_size, int(st.st_mtime)
            elif stat.S_ISDIR(m):
                kind = "d"
            elif stat.S_ISLNK(m):
                kind, target, mtime = "l", os.readlink(p), int(st.st_mtime)
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                kind, target = ("c" if stat.S_ISCHR(m) else "b"), f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            elif stat.S_ISFIFO(m):
                kind = "p"
            out.append(rp.Entry(rel, kind, stat.S_IMODE(m), st.st_uid, st.st_gid, size, mtime, target))
    return out


def tree_manifest(root: Path, boot: Path) -> tuple[str, int]:
    """(hash, entries) of a generation: its root and its boot-file directory together."""
    entries = [rp.Entry("root/" + e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.target)
               for e in walk_entries(root)]
    entries += [rp.Entry("boot/" + e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.target)
                for e in walk_entries(boot)]
    return rp.manifest_hash(entries), len(entries)


@dataclass(frozen=True)
class PushResult:
    rack: Path
    image: str
    generation: int
    already: bool
    link_dest: int | None
    stats: rp.RsyncStats
    served: bool


class Rack:
    """One rack server's directory (layout: sidusd.image.rollout_plan)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.store = ImageStore(self.path / "images")
        self.tftp_root = self.path / "tftp"
        self.images_file = self.path / "images" / "images.yaml"

    def marker_path(self, name: str, n: int) -> Path:
        return self.store.image_dir(name) / "meta" / (rp.gen_name(n) + rp.MARKER_SUFFIX)

    def marker(self, name: str, n: int) -> rp.Marker | None:
        try:
            data = self.marker_path(name, n).read_bytes()
        except OSError:
            data = None
        return rp.parse_marker(data, name, n)

    def boot_dir(self, name: str, n: int) -> Path:
        return publish.tftp_dir(self.tftp_root, name) / rp.gen_name(n)

    def partly_on_disk(self, name: str) -> list[int]:
        """Generations with a final root or a final boot-file directory (both, or one: a crash)."""
        boot = publish.tftp_dir(self.tftp_root, name)
        got = set(self.store.numbers(name))
        if boot.is_dir():
            got |= {int(p.name[4:]) for p in boot.iterdir()
                    if p.is_dir() and p.name.startswith("gen-") and p.name[4:].isdigit()}
        return sorted(got)

    def on_disk(self, name: str) -> list[int]:
        return [n for n in self.store.numbers(name) if self.boot_dir(name, n).is_dir()]

    def arrived(self, name: str, verify: bool = False) -> list[int]:
        """Generations of ``name`` this rack may serve (marker valid; ``verify``: and the manifest
        of the disk matches it)."""
        disk = self.on_disk(name)
        markers = {n: self.marker(name, n) for n in disk}
        manifests = None
        if verify:
            manifests = {n: tree_manifest(self.store.path(name, n), self.boot_dir(name, n))[0]
                         for n in disk if markers[n] is not None}
        return rp.arrived(markers, disk, manifests)

    def entries(self, verify: bool = False) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for name in self.store.names():
            got = self.arrived(name, verify)
            out.update(rp.rack_entries(name, got, self.store.current(name),
                                       {n: str(self.store.path(name, n).resolve()) for n in got}))
        return dict(sorted(out.items()))

    def write_images_file(self, verify: bool = False) -> dict[str, dict[str, str]]:
        """Rewrite the rack's images file (the rack sidusd's ``images_file``) from the markers."""
        entries = self.entries(verify)
        publish.write_images_file(self.images_file, entries)
        return entries


@dataclass(frozen=True)
class PushSource:
    """What a push sends: the generation's tree, its published boot files and their manifest."""
    root: Path
    boot: Path
    manifest: str
    count: int
    parent: int | None


def push_source(store: ImageStore, tftp_root: Path, name: str, number: int) -> PushSource:
    """Generation ``number`` of ``name`` as a push sends it; refused with the reason when it is
    not complete or has no published kernel and initrd (both pushes, local and over ssh)."""
    if number not in store.numbers(name):
        raise BackendError(f"image {name} has no complete generation {number} to push")
    src_root = store.path(name, number)
    src_boot = publish.tftp_dir(tftp_root, name) / rp.gen_name(number)
    if not ((src_boot / "vmlinuz").is_file() and (src_boot / "initrd.img").is_file()):
        raise BackendError(f"image {name} generation {number} has no published kernel and initrd in {src_boot}")
    manifest, count = tree_manifest(src_root, src_boot)
    parent = store.meta(name, number).get("parent")
    return PushSource(src_root, src_boot, manifest, count, parent if isinstance(parent, int) else None)


def run_rsync(argv: list[str], on_start: Callable[[subprocess.Popen], None] | None) -> rp.RsyncStats:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    if on_start is not None:
        on_start(proc)
    try:
        out, err = proc.communicate(timeout=RSYNC_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BackendError(f"rsync failed (exit {proc.returncode}): the rack keeps the generation as "
                           f"{argv[-1]} and does not serve it; push again to resume",
                           detail=err.decode("utf-8", "replace")[-2000:])
    return rp.parse_stats(out.decode("utf-8", "replace"))


def begin(rack: Rack, name: str, number: int, parent: int | None) -> rp.PushPlan:
    """The rack side's first step (under the rack image's lock): the plan, a final directory
    without a marker taken back to staging, the staging directories' parents made."""
    plan = rp.plan_push(name, number, parent, rack.arrived(name), rack.partly_on_disk(name))
    if plan.already:
        return plan
    base = rack.path
    if plan.reclaim:                    # renamed into place, crashed before the marker: resume
        for fin, stg in ((plan.final_root, plan.staging_root), (plan.final_boot, plan.staging_boot)):
            if (base / fin).exists():       # never served (no marker): back to staging
                if (base / stg).exists():
                    shutil.rmtree(base / stg)
                os.rename(base / fin, base / stg)
    for sub in (plan.staging_root, plan.staging_boot):
        (base / sub).parent.mkdir(parents=True, exist_ok=True)
    (base / "images" / name / "meta").mkdir(parents=True, exist_ok=True)
    return plan


def commit(rack: Rack, plan: rp.PushPlan, marker: rp.Marker, *, serve: bool) -> None:
    """The rack side's last step, after rsync: the manifest of what arrived checked against
    ``marker``'s (the source's), renamed into place, the marker written, ``current`` switched
    (``serve``), the images file rewritten.  Raises (nothing renamed) when the manifest differs."""
    name, number, base = plan.image, plan.generation, rack.path
    if not plan.already:
        got, _ = tree_manifest(base / plan.staging_root, base / plan.staging_boot)
        if got != marker.manifest:
            raise BackendError(f"image {name} generation {number}: what arrived on {rack.path} differs from the "
                               "source (changed or cut during the push?); not served, push again")
        os.rename(base / plan.staging_boot, base / plan.final_boot)
        os.rename(base / plan.staging_root, base / plan.final_root)
        _fsync_dir((base / plan.final_root).parent)
        _fsync_dir((base / plan.final_boot).parent)
        atomic_write(rack.marker_path(name, number), marker.to_json())
    if serve:
        rack.store.switch(name, number)
    rack.write_images_file()
