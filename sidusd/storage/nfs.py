"""NFS exports of the image roots that sidusd serves.

sidusd owns the exports of its images: :func:`plan_exports` (pure) turns the
config into a list of :class:`Export`, a backend writes them where its server
reads them and makes the server reload, and :class:`NfsManager` is the facade
the daemon calls on start, on reload and on stop.

Backends (``nfs.backend`` in the config):

* ``kernel``  -- :class:`KernelNfsBackend`: ``/etc/exports.d/sidus.exports``
  (exports(5)) then ``exportfs -ra``.
* ``ganesha`` -- :class:`GaneshaBackend`: a file of ``EXPORT {}`` blocks that
  the main ``ganesha.conf`` ``%include``s (ganesha-export-config(8)), then
  SIGHUP to the pid in ``nfs.ganesha_pid_file``.  Verified with nfs-ganesha
  4.3 (Debian 12): SIGHUP re-reads the exports, adding new ones *and* removing
  the ones no longer in the file, without a restart.
* ``none``    -- sidusd exports nothing (the operator does it) and says so.

The exported trees are root filesystems: the clients are booted as root and
their root must read root-owned files as root, so exports are read-only and
``no_root_squash`` -- which is why they are only ever offered to the networks
listed in ``nfs.client_networks`` (RFC 1813 section 4.4 leaves access control
to the server; both backends refuse every other client).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusd.boot.names import image_root_problem
from sidusd.errors import BackendError, ConfigError
from sidusd.fsutil import atomic_write
from sidusd.observability import get_logger
from sidusd.storage.runner import Runner

EXPORT_ID_MIN, EXPORT_ID_MAX = 1, 65535     # ganesha: 0 is the pseudo-root
HEADER = "managed by sidusd: rewritten on every start and reload, do not edit"


@dataclass(frozen=True)
class Export:
    """One exported image root (read-only, no_root_squash, to ``clients`` only)."""

    export_id: int
    path: Path
    pseudo: str
    clients: tuple[ipaddress.IPv4Network, ...]
    images: tuple[str, ...]


def export_id_for(path: str, taken: set[int]) -> int:
    """A stable export id for ``path``: crc32 of the path in 1..65535.

    Ganesha cannot change the Path of a live Export_Id (a reload that tries is
    refused: "Path for export update N ... doesn't match"), so an id must follow
    its path, not a position in a list.  On the rare crc collision the next free
    id is taken, in sorted path order, so the result is still deterministic.
    """
    span = EXPORT_ID_MAX - EXPORT_ID_MIN + 1
    n = EXPORT_ID_MIN + zlib.crc32(path.encode()) % span
    while n in taken:
        n = EXPORT_ID_MIN + (n - EXPORT_ID_MIN + 1) % span
    return n


def plan_exports(config: Any) -> list[Export]:
    """The exports that ``config`` needs: one per distinct image root, sorted by path.

    Pure.  Raises ConfigError for a root that is not absolute or has characters
    that cannot be written safely, or when images exist but no client network
    is configured (a no_root_squash export must name who may mount it).
    """
    by_path: dict[str, list[str]] = {}
    for name in sorted(config.images):
        root = str(config.images[name].root)
        # verbatim into exports(5) and a quoted ganesha string: the one image-root rule (boot/names.py)
        problem = image_root_problem(root)
        if problem is not None:
            raise ConfigError(f"images.{name}.root", problem)
        by_path.setdefault(os.path.normpath(root), []).append(name)
    if not by_path:
        return []
    clients = tuple(ipaddress.IPv4Network(str(n)) for n in config.nfs.client_networks)
    if not clients:
        raise ConfigError("nfs.client_networks", "required to export the image roots "
                          "(read-only, no_root_squash) to the booting machines only")
    exports: list[Export] = []
    taken: set[int] = set()
    for path in sorted(by_path):
        eid = export_id_for(path, taken)
        taken.add(eid)
        exports.append(Export(eid, Path(path), path, clients, tuple(by_path[path])))
    return exports


# -- kernel nfsd ----------------------------------------------------------------

def render_kernel_exports(exports: Sequence[Export]) -> str:
    """exports(5) lines: ``/srv/x 10.0.0.0/24(ro,no_subtree_check,no_root_squash,async)``."""
    lines = [f"# {HEADER}"]
    for e in exports:
        # no_root_squash: the clients mount this as their root filesystem, as root.
        hosts = " ".join(f"{net}(ro,no_subtree_check,no_root_squash,async)" for net in e.clients)
        lines.append(f"{e.path} {hosts}")
    return "\n".join(lines) + "\n"


class KernelNfsBackend:
    """Kernel nfsd: writes ``exports_file`` atomically and runs ``exportfs -ra``."""

    name = "kernel"

    def __init__(self, runner: Runner, exports_file: Path, timeout_s: float = 60):
        self.runner = runner
        self.exports_file = Path(exports_file)
        self.timeout_s = timeout_s
        self.exports: list[Export] = []
        self.last_error = ""
        self.log = get_logger("nfs", backend=self.name)

    async def _exportfs(self) -> None:
        res = await self.runner.arun(["exportfs", "-ra"], timeout_s=self.timeout_s)
        res.check()
        if res.err.strip():
            self.log.warning("nfs.exportfs_warning", stderr=res.err.strip()[-2000:])

    async def apply(self, exports: Sequence[Export]) -> None:
        """Write the exports file and make nfsd re-read every exports file."""
        try:
            await asyncio.to_thread(atomic_write, self.exports_file,
                                    render_kernel_exports(exports).encode(), 0o644)
            await self._exportfs()
        except (BackendError, OSError) as exc:
            self.last_error = str(exc)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write {self.exports_file}", detail=str(exc)) from exc
            raise
        self.exports = list(exports)
        self.last_error = ""

    async def remove_all(self) -> None:
        """Delete the exports file and unexport what it listed."""
        try:
            self.exports_file.unlink(missing_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot remove {self.exports_file}", detail=str(exc)) from exc
        self.exports = []
        await self._exportfs()

    def health(self) -> dict[str, Any]:
        ok = not self.last_error
        return {"backend": self.name, "ok": ok,
                "detail": self.last_error or f"{len(self.exports)} export(s) in {self.exports_file}",
                "exports": [str(e.path) for e in self.exports]}


# -- nfs-ganesha ----------------------------------------------------------------

def render_ganesha_exports(exports: Sequence[Export]) -> str:
    """EXPORT blocks as in ganesha-export-config(8).

    The export-level ``Access_Type = None`` makes the CLIENT blocks the only
    way in: a client outside ``nfs.client_networks`` gets no access at all
    (an export-level ``RO`` would serve every host that asks).
    """
    out = [f"# {HEADER}\n"]
    for e in exports:
        clients = "".join(f"    CLIENT {{ Clients = {net}; Access_Type = RO; }}\n" for net in e.clients)
        out.append(
            f"# images: {', '.join(e.images)}\n"
            "EXPORT {\n"
            f"    Export_Id = {e.export_id};\n"
            f"    Path = \"{e.path}\";\n"
            f"    Pseudo = \"{e.pseudo}\";\n"
            "    Access_Type = None;\n"
            "    Squash = No_Root_Squash;   # a root filesystem: clients read it as root\n"
            "    Protocols = 3, 4;\n"
            "    Transports = TCP, UDP;\n"
            "    SecType = sys;\n"
            f"{clients}"
            "    FSAL { Name = VFS; }\n"
            "}\n")
    return "\n".join(out)


def _read_pid(pid_file: Path) -> tuple[int | None, str]:
    """(pid, "") if ganesha runs, else (None, why not)."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None, f"nfs-ganesha is not running: no pid file {pid_file}"
    except OSError as exc:
        return None, f"cannot read {pid_file}: {exc}"
    if not text.isdigit() or int(text) <= 0:
        return None, f"pid file {pid_file} holds {text[:40]!r}, not a pid"
    pid = int(text)
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None, f"nfs-ganesha is not running: pid {pid} from {pid_file} does not exist"
    if state in ("Z", "X"):
        return None, f"nfs-ganesha is not running: pid {pid} from {pid_file} has exited"
    if "ganesha" not in comm:
        return None, f"pid {pid} from {pid_file} is {comm!r}, not nfs-ganesha (stale pid file)"
    return pid, ""


def ganesha_running(pid_file: Path) -> tuple[int | None, str]:
    """(pid, "") when nfs-ganesha runs with the pid in ``pid_file``, else (None, why not)."""
    return _read_pid(pid_file)


class GaneshaBackend:
    """nfs-ganesha: writes ``config_file`` (``%include``d by ganesha.conf) and sends SIGHUP.

    SIGHUP is asynchronous and ganesha reports reload errors only in its log.
    With ``log_file`` set, :meth:`apply` waits for ganesha's "Reread exports
    complete" line and raises with the CRIT/MAJ lines logged during the reload.
    """

    name = "ganesha"

    def __init__(self, runner: Runner, config_file: Path, pid_file: Path,
                 log_file: Path | None = None, reload_timeout_s: float = 10):
        self.runner = runner
        self.config_file = Path(config_file)
        self.pid_file = Path(pid_file)
        self.log_file = Path(log_file) if log_file else None
        self.reload_timeout_s = reload_timeout_s
        self.exports: list[Export] = []
        self.last_error = ""
        self.log = get_logger("nfs", backend=self.name)

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size if self.log_file else 0
        except OSError:
            return 0

    async def _confirm_reload(self, offset: int) -> None:
        assert self.log_file is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reload_timeout_s
        while True:
            try:
                with open(self.log_file, "rb") as f:
                    f.seek(offset)
                    new = f.read(1 << 20).decode("utf-8", "replace")
            except OSError as exc:
                raise BackendError(f"cannot read ganesha log {self.log_file}", detail=str(exc)) from exc
            if "Reread exports complete" in new:
                errors = [ln.split("] ", 1)[-1] for ln in new.splitlines()
                          if ":CRIT :" in ln or ":MAJ :" in ln or ":FATAL :" in ln]
                if errors:
                    raise BackendError("nfs-ganesha refused the exports", detail="\n".join(errors[-10:]))
                return
            if loop.time() > deadline:
                raise BackendError(f"nfs-ganesha did not confirm the reload within "
                                   f"{self.reload_timeout_s:g} s", detail=new[-2000:])
            await asyncio.sleep(0.1)

    async def _reload(self) -> None:
        pid, why = _read_pid(self.pid_file)
        if pid is None:
            raise BackendError("cannot reload nfs-ganesha", detail=why)
        offset = self._log_size()
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise BackendError(f"cannot signal nfs-ganesha pid {pid}", detail=str(exc)) from exc
        self.log.info("nfs.ganesha_reload", pid=pid, config_file=str(self.config_file))
        if self.log_file:
            await self._confirm_reload(offset)

    async def apply(self, exports: Sequence[Export]) -> None:
        """Write the EXPORT blocks and make the running ganesha re-read them."""
        try:
            # ganesha only logs a missing path and drops the export: say it here.
            missing = [str(e.path) for e in exports if not e.path.is_dir()]
            if missing:
                raise BackendError("image root is not a directory", detail=", ".join(missing))
            try:
                await asyncio.to_thread(atomic_write, self.config_file,
                                        render_ganesha_exports(exports).encode(), 0o644)
            except OSError as exc:
                raise BackendError(f"cannot write {self.config_file}", detail=str(exc)) from exc
            self.exports = list(exports)   # written: ganesha serves these once it (re)loads
            await self._reload()
        except BackendError as exc:
            self.last_error = str(exc)
            raise
        self.last_error = ""

    async def remove_all(self) -> None:
        """Empty the exports file; reload ganesha if it runs (if not, nothing is served)."""
        try:
            await asyncio.to_thread(atomic_write, self.config_file,
                                    f"# {HEADER}\n".encode(), 0o644)
        except OSError as exc:
            raise BackendError(f"cannot write {self.config_file}", detail=str(exc)) from exc
        self.exports = []
        if _read_pid(self.pid_file)[0] is not None:
            await self._reload()

    def health(self) -> dict[str, Any]:
        pid, why = _read_pid(self.pid_file)
        ok = pid is not None and not self.last_error
        detail = why or self.last_error or f"pid {pid}, {len(self.exports)} export(s) in {self.config_file}"
        return {"backend": self.name, "ok": ok, "detail": detail,
                "exports": [str(e.path) for e in self.exports]}


# -- facade ---------------------------------------------------------------------

def _backend_key(nfs: Any) -> tuple:
    return (nfs.backend, str(getattr(nfs, "exports_file", "")), str(getattr(nfs, "ganesha_config", "")),
            str(getattr(nfs, "ganesha_pid_file", "")), str(getattr(nfs, "ganesha_log_file", None)))


def make_backend(nfs: Any, runner: Runner) -> KernelNfsBackend | GaneshaBackend | None:
    """The backend that ``nfs`` (the config's NfsConfig) selects; None for ``none``."""
    if nfs.backend == "kernel":
        return KernelNfsBackend(runner, Path(nfs.exports_file))
    if nfs.backend == "ganesha":
        return GaneshaBackend(runner, Path(nfs.ganesha_config), Path(nfs.ganesha_pid_file),
                              log_file=getattr(nfs, "ganesha_log_file", None))
    if nfs.backend == "none":
        return None
    raise ConfigError("nfs.backend", f"unknown backend {nfs.backend!r} (ganesha, kernel or none)")


class NfsManager:
    """What the daemon calls: apply on start and reload, remove_all on stop, health."""

    def __init__(self, config: Any, runner: Runner):
        self.runner = runner
        self._key = _backend_key(config.nfs)
        self.backend = make_backend(config.nfs, runner)
        self.skipped: dict[str, tuple[str, ...]] = {}    # root -> images, not exported (missing)
        self.log = get_logger("nfs", backend=config.nfs.backend)

    async def apply(self, config: Any) -> None:
        """Export exactly the image roots of ``config``; raise BackendError on failure.

        An image removed from the config is unexported.  If the backend section
        changed, the old backend's exports are removed first.
        """
        key = _backend_key(config.nfs)
        if key != self._key:
            if self.backend is not None:
                await self.backend.remove_all()
            self.backend = make_backend(config.nfs, self.runner)
            self._key = key
        if self.backend is None:
            self.log.info("nfs.unmanaged", reason="nfs.backend is none: exports are the operator's job")
            return
        try:
            exports = plan_exports(config)
        except ConfigError as exc:
            raise BackendError("cannot plan the NFS exports", detail=str(exc)) from exc
        # One image whose root is missing must not block the exports of the others: it is
        # left out (and said, by the error below and health()), the rest are applied.
        present = [e for e in exports if e.path.is_dir()]
        self.skipped = {str(e.path): e.images for e in exports if e not in present}
        await self.backend.apply(present)
        self.log.info("nfs.applied", exports=[str(e.path) for e in present])
        if self.skipped:
            raise BackendError("image root is not a directory, not exported (the other images are)",
                               detail="; ".join(f"{path} (images {', '.join(names)})"
                                                for path, names in self.skipped.items()))

    async def remove_all(self) -> None:
        """Unexport every image root sidusd exported."""
        if self.backend is not None:
            await self.backend.remove_all()
            self.log.info("nfs.removed_all")

    def health(self) -> dict[str, Any]:
        """``{"backend", "ok", "detail", "exports": [paths]}``."""
        if self.backend is None:
            return {"backend": "none", "ok": True,
                    "detail": "nfs.backend is none: sidusd manages no exports", "exports": []}
        h = self.backend.health()
        if self.skipped:
            h = {**h, "ok": False, "skipped": sorted(self.skipped),
                 "detail": "not exported (root is not a directory): " + ", ".join(
                     f"{p} ({', '.join(n)})" for p, n in self.skipped.items()) + "; " + str(h.get("detail"))}
        return h
