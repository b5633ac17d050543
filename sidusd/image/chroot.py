"""Safe administration of an image root: lock, policy-rc.d, mounts, leftover processes.

The documentation's chroot procedure (bind /proc, /dev/pts, /dev/shm, work,
kill what was left running, unmount) made safe:

* :class:`ImageLock` — an exclusive ``flock`` on ``<image dir>/.lock`` (the
  holder's pid is written in it): two administrations of one image cannot run
  at once; the kernel drops the lock when the holder dies, so no stale lock.
* :class:`Chroot` — a context manager (commands run with ``chroot`` in their own mount
  namespace, the host's resolv.conf bound read-only over the image's for the command only,
  see :data:`CHROOT_WRAPPER`): installs ``/usr/sbin/policy-rc.d``
  (exit 101: no service starts) unless the image has its own, mounts proc,
  sysfs, a private devpts and a tmpfs on /dev/shm, and on exit — normal,
  exception, Ctrl-C or SIGTERM (turned into an exception by :func:`signals_as_exceptions`)
  — stops every process whose root is inside the image (SIGTERM, then SIGKILL),
  unmounts everything under the root (deepest first, lazily as a last resort),
  removes the policy-rc.d it added, and checks /proc/self/mountinfo that
  nothing is left; if something is, :class:`sidusd.errors.BackendError` says what.

Every program runs through :class:`sidusd.storage.runner.Runner`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.image.lazylog import get_logger  # structlog only for an event written (sidus-image)
from sidusd.image.stages import APT_ENV, POLICY_RC_D
from sidusd.storage.runner import Result, Runner

log = get_logger("image.chroot")

MOUNTS = (  # (target inside the root, fstype, source, options)
    ("proc", "proc", "proc", "nosuid,nodev,noexec"),
    ("sys", "sysfs", "sysfs", "ro,nosuid,nodev,noexec"),
    ("dev/pts", "devpts", "devpts", "newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec"),
    ("dev/shm", "tmpfs", "shm", "nosuid,nodev,size=256m"),
)
KILL_GRACE_S = 5.0
# Every command runs in a private mount namespace where the host's resolv.conf is bound read-only
# over the image's (a shared image has a static, often empty, resolv.conf: without this `apt-get`
# inside cannot resolve the mirror).  The bind lives only as long as the command: nothing to
# unmount, and the stages can rewrite the image's own /etc/resolv.conf in between.
CHROOT_WRAPPER = (
    'r=$1; shift; c="$r/etc/resolv.conf"; '
    'if [ -f /etc/resolv.conf ] && [ -f "$c" ] && [ ! -L "$c" ]; then '
    'mount --bind /etc/resolv.conf "$c" && mount -o remount,bind,ro "$c" '
    '|| echo "sidus: no host resolver inside the image" >&2; fi; '
    'exec chroot "$r" "$@"')


class LockBusy(BackendError):
    """Another administration of the same image holds its lock."""


class ImageLock:
    """Exclusive, non-blocking lock of one image directory (``flock`` on ``.lock``)."""

    def __init__(self, image_dir: Path, what: str = "administration"):
        self.path = Path(image_dir) / ".lock"
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> ImageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise LockBusy(f"image {self.path.parent.name} is busy",
                           detail=f"another administration holds {self.path} ({holder or 'unknown holder'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {self.what}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)      # closing drops the flock
            self.fd = None


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(root: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    root_s = os.path.realpath(root)
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mountinfo = f.read()
    out = []
    for line in mountinfo.splitlines():
        parts = line.split(" ")
        if len(parts) > 4:
            mp = _unescape(parts[4])
            if mp == root_s or mp.startswith(root_s.rstrip("/") + "/"):
                out.append(mp)
    return sorted(out, key=lambda p: (-p.count("/"), p))


def processes_in(root: Path) -> list[int]:
    """Pids whose root directory is ``root`` or below it (``/proc/PID/root``)."""
    root_s = os.path.realpath(root).rstrip("/")
    me = os.getpid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            r = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if r == root_s or r.startswith(root_s + "/"):
            pids.append(int(name))
    return sorted(pids)


def kill_processes_in(root: Path, grace_s: float = KILL_GRACE_S) -> list[int]:
    """SIGTERM every process rooted in ``root``, SIGKILL what remains after ``grace_s``; the pids found."""
    found = processes_in(root)
    if not found:
        return []
    log.warning("image.chroot.leftover_processes", root=str(root), pids=found)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in processes_in(root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while processes_in(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not processes_in(root):
            break
    left = processes_in(root)
    if left:
        raise BackendError(f"processes inside {root} survived SIGKILL", detail=str(left))
    return found


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit (SIGINT already raises KeyboardInterrupt), so
    ``finally`` blocks (unmounting) run; previous handlers come back afterwards."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


CLEANUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while a cleanup runs (a second Ctrl-C must not stop the
    removal of a half-made generation half-way); they are delivered when it is done."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_real_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode)


def _below(root: Path) -> list[str]:
    """Mounts strictly below ``root`` (not ``root`` itself: an overlay generation's merged view)."""
    root_s = os.path.realpath(root)
    return [m for m in mounts_under(root) if m != root_s]


def release(root: Path, runner: Runner | None = None, keep_root: bool = False) -> None:
    """Stop every process rooted in ``root`` and unmount everything under it (deepest first,
    lazily as a last resort), then verify with /proc/self/mountinfo; BackendError says what is left.
    ``keep_root``: a mount on ``root`` itself stays (the overlay a Chroot works in).
    Also used on a failed debootstrap, which mounts /proc and /sys in its target itself."""
    runner = runner or Runner()
    errors = []
    try:
        kill_processes_in(root)
    except BackendError as e:
        errors.append(str(e))
    under = _below if keep_root else mounts_under
    for mp in under(root):
        res = runner.run(["umount", mp])
        if not res.ok:
            res = runner.run(["umount", "-l", mp])
            if not res.ok:
                errors.append(f"umount {mp}: {res.err.strip()}")
    left = under(root)
    if left:
        errors.append("still mounted: " + ", ".join(left))
    if errors:
        log.error("image.chroot.cleanup_failed", root=str(root), errors=errors)
        raise BackendError(f"cleaning up {root} failed", detail="; ".join(errors))
    log.info("image.chroot.unmounted", root=str(root))


class Chroot:
    """Mounts + policy-rc.d around work inside an image root (see module doc)."""

    def __init__(self, root: Path, runner: Runner | None = None, logfile: Path | None = None):
        self.root = Path(root).resolve()
        self.runner = runner or Runner()
        self.logfile = logfile
        self.mounted: list[Path] = []
        self.added_policy = False

    def __enter__(self) -> Chroot:
        if not (self.root / "usr").is_dir() or self.root == Path("/"):
            raise BackendError(f"{self.root} is not an image root (no usr/ directory)")
        left = _below(self.root)
        if left:
            raise BackendError(f"{self.root} already has mounts (another administration, or a crash?)",
                               detail=", ".join(left))
        try:
            self._policy_on()
            for rel, fstype, source, opts in MOUNTS:
                target = self.root / rel
                if target.is_symlink():
                    raise BackendError(f"refusing to mount on {target}: it is a symlink")
                if not _is_real_dir(target):
                    target.mkdir(mode=0o755, parents=True)
                self.runner.run(["mount", "-t", fstype, "-o", opts, source, str(target)]).check()
                self.mounted.append(target)
            log.info("image.chroot.mounted", root=str(self.root), mounts=[str(m) for m in self.mounted])
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _policy_on(self) -> None:
        p = self.root / "usr/sbin/policy-rc.d"
        if p.exists() or p.is_symlink():
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
        with os.fdopen(fd, "wb") as f:
            f.write(POLICY_RC_D)
        self.added_policy = True

    def cleanup(self) -> None:
        """Kill leftovers, unmount everything under the root, remove our policy-rc.d; verify."""
        try:
            release(self.root, self.runner, keep_root=True)
        finally:
            self.mounted.clear()
            if self.added_policy:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / "usr/sbin/policy-rc.d")
                self.added_policy = False

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the root (own mount namespace with the host's resolver)."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CHROOT_WRAPPER,
                "sidus-chroot", str(self.root), *argv]

    def run(self, argv: Sequence[str], timeout_s: float = 600, env: Mapping[str, str] | None = None,
            input: bytes | None = None) -> Result:
        """Run ``argv`` inside the root with the apt environment; output appended to the log file."""
        e = dict(APT_ENV)
        e.update(env or {})
        res = self.runner.run(self.argv(argv), timeout_s=timeout_s, env=e, input=input)
        if self.logfile is not None:
            with open(self.logfile, "ab") as f:
                f.write(f"$ {' '.join(argv)}   (rc {res.rc}, {res.duration_s:.1f} s)\n".encode())
                f.write(res.stdout)
                f.write(res.stderr)
        return res
