"""Crash-safe files: whole-file replacement and durable appends.

:func:`atomic_write` gives readers either the old file or the new one, never a
mix, even across a power cut: the data goes to a temporary file in the same
directory, is fsync'd, gets its mode, is renamed over the target (rename(2) is
atomic within one file system), and the directory is fsync'd so the rename
itself is durable.  On any error the temporary file is removed and the old
file is untouched.

:func:`append_durable` appends one record (e.g. a JSON line of the lease
journal) with O_APPEND and fsyncs it before returning.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sidusd.errors import SidusError

_TMP_PREFIX = "."
_TMP_SUFFIX = ".sidus-tmp"


class FileWriteError(SidusError, OSError):
    """A file could not be written; the previous content is unchanged.

    It is also an :class:`OSError` (callers that catch OSError keep working):
    ``errno`` is the OS error number (``errno.ENOSPC``...), ``filename`` and
    ``path`` the target, ``strerror`` the OS message; ``str()`` reads
    ``<path>: cannot <action>: <reason>``.
    """

    def __init__(self, path: Path, err: OSError, action: str):
        reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        OSError.__init__(self, err.errno, reason, str(path))
        self.path = Path(path)
        self.message = f"{path}: cannot {action}: {reason}"

    def __str__(self) -> str:
        return self.message


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permission bits ``mode``.

    The directory must exist.  Raises :class:`FileWriteError` (old file intact,
    no temporary left behind) on any OS error, ENOSPC included.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{os.urandom(4).hex()}{_TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise FileWriteError(path, e, "create a temporary file") from e
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise FileWriteError(path, e, "write") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        _fsync_dir(directory)
    except OSError as e:
        # The new content is in place; only the durability of the rename is in doubt.
        raise FileWriteError(path, e, "fsync the directory") from e


def temp_files(path: Path) -> list[Path]:
    """The temporary files of :func:`atomic_write` for ``path`` that exist now (live or dead writers)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_TMP_PREFIX}{path.name}.*{_TMP_SUFFIX}"))


def remove_stale_temps(path: Path) -> int:
    """Remove temporary files that :func:`atomic_write` left for ``path`` when its
    writer died (kill -9, power loss).  Only files of dead writers are removed.
    Returns how many were removed."""
    path = Path(path)
    removed = 0
    for tmp in temp_files(path):
        parts = tmp.name[len(_TMP_PREFIX) + len(path.name) + 1:].split(".")
        try:
            pid = int(parts[0])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            try:
                tmp.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def append_durable(path: Path, line: bytes, mode: int = 0o600) -> None:
    """Append one record ``line`` to ``path`` and fsync it before returning.

    A newline is added if ``line`` does not end with one.  The file is created
    with permission bits ``mode`` if absent.  If the write fails part-way
    (ENOSPC), the file is truncated back to its previous length, so a journal
    never keeps half a record.  Raises :class:`FileWriteError`.
    """
    if not line.endswith(b"\n"):
        line += b"\n"
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as e:
        raise FileWriteError(path, e, "open for append") from e
    try:
        st = os.fstat(fd)
        created = st.st_size == 0
        if created:
            os.fchmod(fd, mode)
        try:
            write_all(fd, line)
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, st.st_size)
            except OSError:
                pass
            raise
        if created:
            _fsync_dir(path.parent)
    except OSError as e:
        raise FileWriteError(path, e, "append") from e
    finally:
        os.close(fd)
