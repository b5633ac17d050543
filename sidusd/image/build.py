"""Runs the stage plan: build, update and chroot administration, each making a new generation.

Every operation takes the image lock, works on ``gen-N.partial`` (a fresh
debootstrap for a build, a copy of the served generation otherwise), runs its
named stages inside a :class:`~sidusd.image.chroot.Chroot` (mounted once,
always unmounted), then commits the generation, publishes its kernel and
initrd and switches ``current`` to it.  A failure names the stage and the
reason (:class:`StageFailed`), removes the partial generation (unless asked to
keep it) and leaves nothing mounted; the served generation is untouched.

Progress lines (``[3/12] packages: install 4 package(s)`` then ``ok 41.2 s``)
go to ``out``; the full output of every command goes to
``<image>/logs/gen-N.log``; log events: ``image.stage.start``,
``image.stage.done``, ``image.stage.failed``, ``image.generation.committed``,
``image.generation.served``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sidusd.errors import BackendError, SidusError
from sidusd.fsutil import append_durable, atomic_write
from sidusd.image import publish, shell
from sidusd.image.chroot import Chroot, ImageLock, signals_as_exceptions
from sidusd.image.generations import ImageStore
from sidusd.image.lazylog import get_logger
from sidusd.image.mirrors import host_mirror, security_mirror
from sidusd.image.stages import Stage, debootstrap_argv, plan, update_plan
from sidusd.storage.runner import Runner

if TYPE_CHECKING:
    from sidusd.image.recipe import Recipe

# imported when used (recipe: msgspec and yaml; history, data): a `sidus-image run` needs none
log = get_logger("image.build")
DEBOOTSTRAP_TIMEOUT_S = 3600


def __getattr__(name: str) -> Any:
    if name == "INITRAMFS_SRC":          # the overlay hook: package data (sidusd/data/initramfs/)
        from sidusd import data
        return data.INITRAMFS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StageFailed(BackendError):
    """A named stage failed; ``stage`` is its name."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        self.stage = stage
        super().__init__(f"stage {stage} failed: {reason}", detail=detail)


def initramfs_files(src: Path | None = None) -> dict[str, bytes]:
    """The overlay hook, init-bottom scripts (overlay; sidus-up: the root up-report) and module list
    (sidusd/data/initramfs/, or ``src``)."""
    if src is None:
        from sidusd import data
        src = data.INITRAMFS
    rels = ("hooks/sidus-overlay", "scripts/init-bottom/sidus-overlay", "scripts/init-bottom/sidus-up",
            "scripts/nfs-top/sidus-link")          # the boot NIC up before klibc ipconfig (docs/quirks.md)
    out = {rel: (src / rel).read_bytes() for rel in rels}
    out["modules"] = b"# sidus (sidusd/data/initramfs/modules)\n" + (src / "modules").read_bytes()
    return out


@dataclass
class Progress:
    """Prints stage lines and records timings."""
    out: TextIO
    total: int
    started: float = 0.0
    index: int = 0

    def stage(self, st: Stage) -> float:
        self.index += 1
        print(f"[{self.index}/{self.total}] {st.name}: {st.summary}", file=self.out, flush=True)
        log.info("image.stage.start", stage=st.name, index=self.index, total=self.total)
        return time.monotonic()

    def done(self, st: Stage, t0: float) -> None:
        el = time.monotonic() - t0
        print(f"      ok {el:.1f} s (total {time.monotonic() - self.started:.0f} s)", file=self.out, flush=True)
        log.info("image.stage.done", stage=st.name, elapsed_s=round(el, 1))


def _inside(root: Path, rel: str) -> Path:
    p = Path(os.path.normpath(root / rel))
    if p != root and root not in p.parents:
        raise BackendError(f"path {rel!r} escapes the image root")
    return p


def _write_file(root: Path, rel: str, data: bytes, mode: int) -> None:
    p = _inside(root, rel)
    parent = Path(os.path.realpath(p.parent))
    if parent != root and root not in parent.parents:
        raise BackendError(f"{rel}: its directory resolves outside the image root")
    parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink():
        p.unlink()            # e.g. resolv.conf -> ../run/...: replaced by a plain file
    atomic_write(p, data, mode)


def copy_site_files(src: Path, root: Path) -> int:
    """Copy the recipe's site files (a directory tree mirroring /) into the root; count of files."""
    root = Path(os.path.realpath(root))
    if not src.is_dir():
        raise BackendError(f"site_files {src} is not a directory")
    n = 0
    for dirpath, _dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        for f in filenames:
            s = Path(dirpath) / f
            if s.is_symlink() or not s.is_file():
                raise BackendError(f"site file {s} is not a regular file")
            _write_file(root, str(rel_dir / f), s.read_bytes(), s.stat().st_mode & 0o7777)
            n += 1
    return n


def run_stage(st: Stage, root: Path, ch: Chroot, recipe: Recipe | None = None) -> None:
    """Run one stage on ``root`` (files, commands, removals); StageFailed names it."""
    root = Path(os.path.realpath(root))
    try:
        for rel, data, mode in st.files:
            _write_file(root, rel, data, mode)
        if st.name == "site-files" and recipe is not None and recipe.site_files is not None:
            copy_site_files(recipe.site_files, root)
        for argv in st.commands:
            res = ch.run(argv, timeout_s=st.timeout_s) if st.chroot else ch.runner.run(argv, st.timeout_s)
            if not res.ok:
                tail = (res.err.strip() or res.out.strip())[-1500:]
                raise StageFailed(st.name, f"{' '.join(argv[:4])} exited with status {res.rc}", tail)
        for pattern in st.remove:
            for p in glob.glob(str(_inside(root, pattern))):
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
    except StageFailed:
        raise
    except (SidusError, OSError) as e:
        raise StageFailed(st.name, str(e)) from e


class Administrator:
    """Build, update and administer the images of one images directory."""

    def __init__(self, images_dir: Path, tftp_root: Path, runner: Runner | None = None,
                 out: TextIO | None = None, cache_dir: Path | None = None, images_file: Path | None = None,
                 control_socket: Path | None = None, btrfs_snapshots: bool = False, views: bool = False,
                 view_depth: int | None = None):
        self.runner = runner or Runner()
        self.images_file = Path(images_file) if images_file else Path(images_dir) / "images.yaml"
        self.control_socket = control_socket
        self.store = ImageStore(images_dir, self.runner, btrfs_snapshots=btrfs_snapshots, views=views,
                                view_depth=view_depth)
        self.tftp_root = Path(tftp_root)
        self.out = out or sys.stderr
        self.cache_dir = cache_dir

    def _new_generation(self, name: str, parent: int | None, kind: str, work: Callable[[Path, Path], dict],
                        switch: bool = True, keep_failed: bool = False, message: str | None = None) -> int:
        with signals_as_exceptions(), ImageLock(self.store.image_dir(name), kind):
            number, part = self.store.begin(name, parent)
            settled = False      # committed, aborted, or kept on purpose (keep_failed)
            try:
                logfile = self.store.log_path(name, number)
                logfile.write_bytes(f"sidus image {kind} {name} generation {number}\n".encode())
                t0 = time.monotonic()
                try:
                    meta = work(part, logfile)
                except BaseException as e:
                    why = str(e) or type(e).__name__
                    with contextlib.suppress(OSError):
                        with open(logfile, "a") as f:
                            f.write(f"FAILED: {why}\n")
                    if not keep_failed or isinstance(e, shell.Discarded):
                        self.store.abort(name, number)
                    settled = True
                    # after the cleanup, and never instead of it: stderr may be a terminal gone (hang-up: EIO)
                    with contextlib.suppress(OSError):
                        log.error("image.stage.failed", image=name, generation=number, error=why)
                    raise
                switch = switch and not meta.get("kept")            # a kept shell session is not served
                meta.update(kind=kind, parent=parent, message=message, duration_s=round(time.monotonic() - t0, 1))
                try:
                    self.store.commit(name, number, meta)         # the copy: hard-link farm + upper layer
                    settled = True
                except BaseException as e:                        # Ctrl-C half-way: no half-made generation
                    self.store.abort(name, number)
                    settled = True
                    with contextlib.suppress(OSError):
                        log.error("image.generation.aborted", image=name, generation=number,
                                  error=str(e) or type(e).__name__)
                    raise
            finally:
                # A signal can land in a cleanup path before its abort starts (the chroot's command
                # died of the same SIGHUP first, and the handler's SystemExit came in the except
                # block): the half-made generation is removed all the same (abort is idempotent).
                if not settled and not keep_failed:
                    self.store.abort(name, number)
            log.info("image.generation.committed", image=name, generation=number, kind=kind)
            root = self.store.path(name, number)
            if meta.get("kernel"):         # an unchanged kernel / initrd: a link to the parent's
                publish.publish_generation(root, self.tftp_root, name, number, parent,
                                           self.store.path(name, parent) if parent is not None else None)
            if switch:
                self.serve(name, number)
            # "served" only when sidusd says it serves this generation (image/publish.py)
            served = publish.confirm_served(self.control_socket, name, root.resolve()) if switch else None
            print(f"{name}: generation {number} complete ({meta['duration_s']:.0f} s)"
                  + (f", {served.text}" if served else ""), file=self.out, flush=True)
            if meta.get("kept"):
                print(shell.how_to(name, number), file=self.out, flush=True)
            if served is not None and served.refused:
                raise BackendError(f"{name}: generation {number} is committed and switched, but sidusd does "
                                   "not serve it", detail=served.text)
            return number

    def serve(self, name: str, number: int) -> None:
        """Switch the served generation: the ``current`` symlink, then the generated images
        file (atomic rewrite), then ``sidusctl reload`` when a control socket is given."""
        self.store.switch(name, number)
        self.write_images_file()
        log.info("image.generation.served", image=name, generation=number)

    def write_images_file(self, leaving: dict[str, set[int]] | None = None) -> None:
        """Rewrite the generated images file from the generations on disk (without the generations
        in ``leaving``: name -> numbers about to be removed); reload sidusd if asked."""
        entries = publish.images_entries(self.store, self.tftp_root)
        for name, numbers in (leaving or {}).items():
            for n in numbers:
                entries.pop(f"{name}.gen-{n}", None)
        publish.write_images_file(self.images_file, entries)
        if self.control_socket is not None:
            res = self.runner.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.control_socket),
                                   "reload"], timeout_s=60)
            if not res.ok:
                raise BackendError("sidusctl reload failed (the images file is written; sidusd still "
                                   "serves the previous one)", detail=(res.err or res.out).strip())

    def _stages(self, stages: list[Stage], root: Path, logfile: Path, recipe: Recipe | None,
                first: Callable[[], None] | None = None) -> dict:
        prog = Progress(self.out, len(stages), time.monotonic())
        if first is not None:
            first()
        with Chroot(root, self.runner, logfile) as ch:
            for st in stages:
                t = prog.stage(st)
                run_stage(st, root, ch, recipe)
                prog.done(st, t)
        return dict(publish.boot_meta(root))

    def build(self, recipe: Recipe, switch: bool = True, keep_failed: bool = False,
              message: str | None = None) -> int:
        """Bootstrap and configure a new generation of ``recipe.name``; its number."""
        mirror = recipe.mirror or host_mirror(recipe.suite)
        security = security_mirror(recipe)
        stages = plan(recipe, mirror=mirror, initramfs=initramfs_files(), security=security)

        def work(part: Path, logfile: Path) -> dict:
            boot = Stage("debootstrap", f"{recipe.suite} {recipe.variant} {recipe.architecture} from {mirror}",
                         timeout_s=DEBOOTSTRAP_TIMEOUT_S)
            def first() -> None:
                print(f"[0/{len(stages)}] debootstrap: {boot.summary}", file=self.out, flush=True)
                log.info("image.stage.start", stage="debootstrap")
                t = time.monotonic()
                if self.cache_dir is not None:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                argv = debootstrap_argv(recipe, str(part), mirror,
                                        str(self.cache_dir.resolve()) if self.cache_dir else None)
                res = self.runner.run(argv, timeout_s=DEBOOTSTRAP_TIMEOUT_S)
                with open(logfile, "ab") as f:
                    f.write(f"$ {' '.join(argv)}   (rc {res.rc}, {res.duration_s:.1f} s)\n".encode())
                    f.write(res.stdout + res.stderr)
                if not res.ok:
                    raise StageFailed("debootstrap", f"exited with status {res.rc}",
                                      (res.err.strip() or res.out.strip())[-1500:])
                print(f"      ok {time.monotonic() - t:.1f} s", file=self.out, flush=True)
                log.info("image.stage.done", stage="debootstrap", elapsed_s=round(time.monotonic() - t, 1))
            meta = self._stages(stages, part, logfile, recipe, first)
            # a foreign architecture's kernel and initrd are checked to be of it (never amd64's)
            from sidusd.image.arch import verify_generation
            meta.update(verify_generation(part, recipe.architecture, self.runner))
            meta.update(recipe=recipe.source, suite=recipe.suite, mirror=mirror, security_mirror=security)
            return meta

        return self._new_generation(recipe.name, None, "build", work, switch, keep_failed, message)

    def update(self, name: str, switch: bool = True, keep_failed: bool = False, message: str | None = None) -> int:
        """apt update + full-upgrade (+ initramfs) in a copy of the served generation."""
        parent = self._served(name)
        return self._new_generation(name, parent, "update",
                                    lambda part, logfile: self._stages(update_plan(), part, logfile, None),
                                    switch, keep_failed, message)

    def run(self, name: str, argv: Sequence[str], switch: bool = True,
            keep_failed: bool = False, message: str | None = None) -> int:
        """Run ``argv`` in a copy of the served generation; commit if it succeeds."""
        parent = self._served(name)

        def work(part: Path, logfile: Path) -> dict:
            with Chroot(part, self.runner, logfile) as ch:
                res = ch.run(argv, timeout_s=3600)
                self.out.write(res.out + res.err)
                if res.rc != 0:
                    raise StageFailed("run", f"{' '.join(argv[:4])} exited with status {res.rc}")
            meta: dict[str, Any] = {"command": list(argv)[:20]}
            meta.update(publish.boot_meta(part))
            return meta

        return self._new_generation(name, parent, "run", work, switch, keep_failed, message)

    def shell(self, name: str, parent: int | None = None, switch: bool = True, keep_failed: bool = False,
              message: str | None = None, stdin: TextIO | None = None) -> int:
        """An interactive shell in a new generation over the served one (or ``parent``); at its end
        the session is published, kept or discarded (sidusd.image.shell: never silently lost)."""
        parent = self._served(name) if parent is None else parent
        work = shell.shell_work(name, self.runner, stdin or sys.stdin, self.out)
        return self._new_generation(name, parent, "shell", work, switch, keep_failed, message)

    def rollback(self, name: str, to: int | None = None) -> int:
        """Serve the previous generation (or ``to``); its number."""
        with ImageLock(self.store.image_dir(name), "rollback"):
            target = self.store.rollback_target(name, to)
            self.serve(name, target)
            return target

    def gc(self, name: str, keep: int = 2, in_use: Sequence[int] = (), dry_run: bool = False,
           booted_by_root: Mapping[str, Sequence[Any]] | None = None) -> list[int]:
        """Remove generations that are not served, not in use and not among the ``keep`` newest
        (``dry_run``: only say which).  Each removal first appends a record to
        ``meta/removed.jsonl`` (sidusd.image.history.removal_record; ``booted_by_root``: resolved
        root -> booted records, every record of sidusd's booted file)."""
        from sidusd.image import history
        from sidusd.image.generations import gc_candidates
        with ImageLock(self.store.image_dir(name), "gc"):
            doomed = gc_candidates(self.store.numbers(name), self.store.current(name), keep,
                                   (*in_use, *shell.kept(self, name)))      # a kept session stays
            if dry_run:
                return doomed
            if doomed:
                # first out of the images file (sidusd reloaded: no longer exported nor bootable),
                # then off the disk
                self.write_images_file({name: set(doomed)})
            for n in doomed:
                root = self.store.path(name, n)
                rec = history.removal_record(name, n, self.store.meta(name, n), root,
                                             (booted_by_root or {}).get(os.path.realpath(root), ()),
                                             datetime.now(UTC).isoformat(timespec="seconds"))
                append_durable(self.store.image_dir(name) / "meta" / "removed.jsonl",
                               json.dumps(rec, separators=(",", ":")).encode(), 0o644)
                self.store.remove(name, n)
                publish.unpublish_generation(self.tftp_root, name, n)
                log.info("image.generation.removed", image=name, generation=n)
            return doomed

    def _served(self, name: str) -> int:
        cur = self.store.current(name)
        if cur is None:
            raise BackendError(f"image {name} has no served generation (build it first)",
                               detail=f"looked in {self.store.image_dir(name)}")
        return cur
