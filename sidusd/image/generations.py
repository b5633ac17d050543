"""Image generations: every build or update is a new root; the served one switches atomically.

Layout of one image under the images directory (docs/images.md)::

    <images_dir>/<name>/
        .lock                 flock of administrations (sidusd.image.chroot.ImageLock)
        gen-0001/             a complete root file system (generation 1)
        gen-0002.partial/     a generation being built (never served, removed on failure): an
                              overlayfs view over its parent (sidusd.image.layers), or on btrfs with
                              ``btrfs_snapshots`` a snapshot (sidusd.image.btrfs)
        gen-0002.layer/       its overlay's upper + work directories (gone once published)
        gen-0002.farm/        the parent's hard-link farm, made while the work runs (becomes gen-0002)
        gen-0001.spent/       a published generation's used-up layer, removed by the next farm thread
        gen-0003/ + .ovl/     with views (sidusd.image.views): a read-only overlay view + its layer
        current -> gen-0002   the served generation: a relative symlink, replaced by rename(2)
        meta/gen-0001.json    what made it (build/update, parent, message, recipe, kernel), when, how
                              long, how (mechanism) and what changed
        meta/removed.jsonl    what gc removed (sidusd.image.history.removal_record)
        logs/gen-0001.log     the full log of the build or update

A generation directory appears under its final name only once complete
(rename of ``.partial``), and ``current`` is switched with a new symlink
renamed over the old one, so a reader sees the old or the new generation,
never a half-built one.

:class:`ImageStore` does the file operations; :func:`gc_candidates` is the
pure policy of what ``gc`` may remove.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.fsutil import _fsync_dir, atomic_write
from sidusd.image import btrfs, layers
from sidusd.image import views as views_mod
from sidusd.image.lazylog import get_logger  # structlog only for an event written (sidus-image)
from sidusd.storage.runner import Runner
from sidusd.yamlstrict import check_name

log = get_logger("image.generations")
_GEN = re.compile(r"^gen-(\d{4,9})$")
COPY_TIMEOUT_S = 3600


def gen_dirname(number: int) -> str:
    return f"gen-{number:04d}"


@dataclass(frozen=True)
class Generation:
    """One complete generation of an image."""
    image: str
    number: int
    path: Path
    created: str
    kind: str
    parent: int | None
    size_bytes: int | None
    current: bool
    meta: dict


def tree_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (st_blocks, hard links counted once, same file system)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    dev = os.lstat(path).st_dev
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if st.st_dev != dev or (st.st_ino, st.st_dev) in seen:
                continue
            seen.add((st.st_ino, st.st_dev))
            total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
    return total


def gc_candidates(numbers: Iterable[int], current: int | None, keep: int, in_use: Iterable[int] = ()) -> list[int]:
    """Generations ``gc`` may remove (pure): not current, not in use, not among the ``keep`` newest."""
    nums = sorted(set(numbers), reverse=True)
    protected = set(nums[:max(keep, 0)]) | set(in_use)
    if current is not None:
        protected.add(current)
    return sorted(n for n in nums if n not in protected)


def pinned_generations(image_names: Iterable[str], name: str) -> set[int]:
    """Generations of image ``name`` that an inventory pins (pure): ``<name>.gen-N`` among the
    image names its hosts and profiles use."""
    prefix = f"{name}.gen-"
    return {int(n[len(prefix):]) for n in image_names
            if n.startswith(prefix) and n[len(prefix):].isdigit()}


def booted_generations(roots_in_use: Iterable[str], generation_roots: dict[int, str]) -> set[int]:
    """Generations whose root a booted machine still uses (pure): ``generation_roots`` maps each
    generation number to its root directory (resolved), ``roots_in_use`` are the roots of the live
    booted records (sidusd/boot/booted.py)."""
    used = {os.path.normpath(r) for r in roots_in_use}
    return {n for n, root in generation_roots.items() if os.path.normpath(root) in used}


class ImageStore:
    """Generations of the images under one directory."""

    def __init__(self, images_dir: Path, runner: Runner | None = None,
                 replace: Callable[[str, str], None] = layers.replace_entry, btrfs_snapshots: bool = False,
                 views: bool = False, view_depth: int | None = None):
        if views and btrfs_snapshots:
            raise ValueError("--views and --btrfs-snapshots exclude each other: a snapshot already shares "
                             "everything, and nfs-ganesha exports neither a btrfs subvolume nor overlays on it")
        self.views, self.view_depth = views, views_mod.check_depth(
            views_mod.DEFAULT_DEPTH if view_depth is None else view_depth)
        self._probed = False
        self.dir = Path(images_dir)
        self.runner = runner or Runner()
        # opt-in: nfs-ganesha 4 (Debian 12) does not export btrfs subvolumes (docs/images.md)
        self.btrfs_snapshots = btrfs_snapshots
        self.replace = replace              # how flatten puts a changed entry in place (tests break it)
        self._made: dict[tuple[str, int], str] = {}     # (image, number) -> how begin() made it
        self._farms: dict[tuple[str, int], layers.Farm] = {}    # the farms begin() started

    def image_dir(self, name: str) -> Path:
        check_name("image", name, what="image name")
        return self.dir / name

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and not p.is_symlink())

    def numbers(self, name: str) -> list[int]:
        d = self.image_dir(name)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _GEN.fullmatch(p.name)) and p.is_dir()
                      and not p.is_symlink())

    def current(self, name: str) -> int | None:
        """The served generation (where ``current`` points), or None."""
        try:
            target = os.readlink(self.image_dir(name) / "current")
        except FileNotFoundError:
            return None
        m = _GEN.fullmatch(target)
        return int(m.group(1)) if m else None

    def path(self, name: str, number: int) -> Path:
        return self.image_dir(name) / gen_dirname(number)

    def served_path(self, name: str) -> Path:
        """The stable path of the served root (the ``current`` symlink) for the ``images:`` config."""
        return self.image_dir(name) / "current"

    def meta(self, name: str, number: int) -> dict:
        try:
            return json.loads((self.image_dir(name) / "meta" / f"{gen_dirname(number)}.json").read_text())
        except (OSError, ValueError):
            return {}

    def log_path(self, name: str, number: int) -> Path:
        return self.image_dir(name) / "logs" / f"{gen_dirname(number)}.log"

    def list(self, name: str, sizes: bool = True) -> list[Generation]:
        cur = self.current(name)
        out = []
        for n in self.numbers(name):
            m = self.meta(name, n)
            p = self.path(name, n)
            out.append(Generation(name, n, p, m.get("created", ""), m.get("kind", "?"), m.get("parent"),
                                  tree_size(p) if sizes else None, n == cur, m))
        return out

    # -- making generations ------------------------------------------------------

    def begin(self, name: str, parent: int | None) -> tuple[int, Path]:
        """A new ``gen-N.partial`` and its number N.  With a ``parent``: an overlayfs mount over
        the parent (sidusd.image.layers; the parent is its read-only lower layer), or, when the
        overlay cannot be mounted, a full copy (``cp -a --reflink=auto``).  Stale partials and
        layers (a crash) are released and removed first."""
        d = self.image_dir(name)
        for sub in ("", "meta", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        from sidusd.image.chroot import release
        for p in d.iterdir():
            if p.name.endswith(".partial"):       # left by a crash: release, then remove
                release(p, self.runner)
                self._remove_tree(p)
        for p in d.iterdir():
            if p.name.endswith((".layer", ".farm")):
                self._remove_tree(p)
        views_mod.free_unneeded(d)                  # a crash's half-published layer, if any
        # earlier generations' used-up layers: the overlay path's Farm removes them, off the clock
        spent = [p for p in d.iterdir() if p.name.endswith(".spent")]
        number = max([*self.numbers(name), *views_mod.kept_numbers(d)], default=0) + 1   # never a kept layer's
        part = d / f"{gen_dirname(number)}.partial"
        on_btrfs = self.btrfs_snapshots and btrfs.available(d)
        if parent is None:                          # a build: no farm to hand them to
            for p in spent:
                self._remove_tree(p)
            spent = []
        if parent is None:
            if on_btrfs:
                btrfs.create(part, self.runner)     # so that its children can be snapshots
            else:
                part.mkdir(mode=0o755)
            self._made[(name, number)] = "btrfs-subvolume" if on_btrfs else "directory"
            return number, part
        src = self.path(name, parent)
        if not src.is_dir():
            raise BackendError(f"image {name} has no generation {parent}")
        if on_btrfs and btrfs.is_subvolume(src):
            for p in spent:
                self._remove_tree(p)
            btrfs.snapshot(src, part, self.runner)  # O(1), copy-on-write: the fast path
            self._made[(name, number)] = "btrfs-snapshot"
            return number, part
        stack = views_mod.parent_stack(d, parent)           # [parent] when the parent is flat
        lowers = views_mod.layer_paths(d, stack)
        as_view = self.views and len(stack) <= self.view_depth
        if as_view and not self._probed:
            views_mod.probe(d, self.runner)                 # refused here, before any work
            self._probed = True
        try:
            try:
                layers.prepare(lowers if len(lowers) > 1 else src, part, parent, self.runner)
                if as_view:                                 # published as a layer: no farm
                    (layers.layer_dir(part) / "stack").write_text(" ".join(map(str, [number, *stack])) + "\n")
                    for p in spent:
                        self._remove_tree(p)
                else:                                       # farm of the base + the stack's layers
                    self._farms[(name, number)] = layers.Farm(lowers[-1], part, self.runner, tuple(spent),
                                                              tuple(reversed(lowers[:-1])))
            except (BackendError, OSError) as e:
                log.warning("image.generation.full_copy", image=name, generation=number, reason=str(e))
                for p in (part, layers.layer_dir(part), *spent):
                    self._remove_tree(p)
                self.runner.run(["cp", "-a", "--reflink=auto", "--one-file-system", str(src), str(part)],
                                timeout_s=COPY_TIMEOUT_S).check()
                self._made[(name, number)] = "copy"
        except BaseException:                       # Ctrl-C, SIGTERM or a failure half-way: nothing stays
            self.abort(name, number)
            raise
        return number, part

    def commit(self, name: str, number: int, meta: dict) -> Path:
        """Make ``gen-N.partial`` the complete generation N (rename) and record its metadata.
        An overlay generation is unmounted and flattened first (parent's hard-link farm + the
        upper layer's entries; ``meta["changes"]`` says how much changed)."""
        d = self.image_dir(name)
        final = self.path(name, number)
        part = d / f"{gen_dirname(number)}.partial"
        lower = layers.lower_of(part)
        vstack = _read_stack(layers.layer_dir(part) / "stack") if lower is not None else None
        if vstack:
            from sidusd.image.chroot import release
            release(part, self.runner)
            meta = dict(meta, changes=views_mod.publish_layer(d, number, part, vstack).as_meta(),
                        mechanism="overlay-view", stack=vstack)
        elif lower is not None:
            from sidusd.image.chroot import release
            release(part, self.runner)
            farm = self._farms.pop((name, number), None)
            meta = dict(meta, changes=layers.flatten(self.path(name, lower), part, self.runner,
                                                     self.replace, farm).as_meta(), mechanism="overlay+hardlinks")
        else:
            if btrfs.is_subvolume(part):
                btrfs.set_readonly(part, self.runner)
            meta = dict(meta, mechanism=self._made.pop((name, number), "directory"))
        meta = dict(meta, generation=number,
                    created=meta.get("created") or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        atomic_write(d / "meta" / f"{gen_dirname(number)}.json", (json.dumps(meta, indent=1) + "\n").encode())
        os.rename(part, final)
        _fsync_dir(d)
        if vstack:
            try:
                views_mod.mount(d, number, self.runner)
            except BackendError:
                self.remove(name, number)
                raise
        return final

    def abort(self, name: str, number: int) -> None:
        """Remove an unfinished ``gen-N.partial`` and its layer (its processes stopped and mounts
        released first), and its metadata unless generation N is complete; Ctrl-C, SIGTERM and
        SIGHUP wait until this is done."""
        from sidusd.image.chroot import release, signals_deferred
        part = self.image_dir(name) / f"{gen_dirname(number)}.partial"
        with signals_deferred():
            self._made.pop((name, number), None)
            farm = self._farms.pop((name, number), None)
            if part.exists():
                release(part, self.runner)
            if farm is not None:
                with contextlib.suppress(Exception):     # its error does not matter: it is removed
                    farm.wait()
            self._remove_tree(part)
            self._remove_tree(layers.layer_dir(part))
            self._remove_tree(layers.farm_dir(part))
            if not self.path(name, number).exists():
                (self.image_dir(name) / "meta" / f"{gen_dirname(number)}.json").unlink(missing_ok=True)

    def leftovers(self, name: str) -> tuple[str, ...]:
        """Half-made generations of ``name`` still on disk (``gen-N.partial``, ``.layer``, ``.farm``)."""
        d = self.image_dir(name)
        if not d.is_dir():
            return ()
        return tuple(sorted(p.name for p in d.iterdir() if p.name.endswith((".partial", ".layer", ".farm"))))

    def switch(self, name: str, number: int) -> None:
        """Serve generation ``number``: a new symlink renamed over ``current`` (atomic)."""
        d = self.image_dir(name)
        if number not in self.numbers(name):
            raise BackendError(f"image {name} has no complete generation {number}")
        if views_mod.stack_of(d, number) is not None:
            views_mod.mount(d, number, self.runner)         # `current` never names an empty mount point
        tmp = d / f".current.{os.getpid()}.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(gen_dirname(number), tmp)
        os.rename(tmp, d / "current")
        _fsync_dir(d)

    def rollback_target(self, name: str, to: int | None = None) -> int:
        """The generation a rollback serves: ``to``, or the newest one older than the current."""
        nums = self.numbers(name)
        cur = self.current(name)
        if to is not None:
            if to not in nums:
                raise BackendError(f"image {name} has no generation {to}", detail=f"generations: {nums}")
            return to
        older = [n for n in nums if cur is None or n < cur]
        if not older:
            raise BackendError(f"image {name}: no generation older than {cur} to roll back to")
        return max(older)

    def remove(self, name: str, number: int) -> None:
        """Delete generation ``number`` (never the current one)."""
        if number == self.current(name):
            raise BackendError(f"image {name}: generation {number} is served (current); roll back first")
        d = self.image_dir(name)
        if views_mod.stack_of(d, number) is not None or number in views_mod.needed(d):
            views_mod.remove(d, number, self.runner)        # a layer or base that a stack needs stays
        else:
            self._remove_tree(self.path(name, number))
            views_mod.free_unneeded(d)
        for extra in (d / "meta" / f"{gen_dirname(number)}.json", self.log_path(name, number)):
            extra.unlink(missing_ok=True)

    def mount_views(self) -> builtins.list[tuple[str, int, str]]:
        """(Re)mount every overlay view of every image (idempotent; sidusd.image.views.mount_all)."""
        return views_mod.mount_all(self.dir, self.runner)

    def _remove_tree(self, path: Path) -> None:
        from sidusd.image.chroot import mounts_under
        if not path.exists():
            return
        left = mounts_under(path)
        if left:
            raise BackendError(f"refusing to remove {path}: something is mounted in it", detail=", ".join(left))
        if btrfs.is_subvolume(path):
            btrfs.delete(path, self.runner)
        else:
            shutil.rmtree(path)

    def own_shared(self, name: str, numbers: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Generation -> (own bytes, shared bytes): extents on btrfs (``btrfs filesystem du``),
        else inodes (sidusd.image.history.sharing)."""
        from sidusd.image.history import sharing
        roots = {n: self.path(name, n) for n in numbers}
        if roots and all(btrfs.is_subvolume(p) for p in roots.values()):
            return btrfs.du(roots, self.runner)
        fs_dev = os.lstat(self.image_dir(name)).st_dev     # a view has its own st_dev, the layers' inodes
        return sharing(roots, {os.lstat(p).st_dev: fs_dev for p in roots.values() if os.path.ismount(p)})


def _read_stack(path: Path) -> list[int] | None:
    try:
        return [int(x) for x in path.read_text().split()] or None
    except (OSError, ValueError):
        return None
