"""Open a file below a root so that nothing outside the root can ever be read.

:func:`open_confined` walks the validated components of
:class:`sidusd.boot.content.StaticPath` one at a time, each relative to the
descriptor of the directory before it (``openat``), with ``O_NOFOLLOW``:

* **any symbolic link on the way is refused**, even one pointing inside the
  root.  This is the simplest rule that is obviously safe (no resolution,
  no race between a check and the open); put real files (or hard links, or
  bind mounts) in the TFTP root instead of symlinks;
* the final component must be a regular file: directories, FIFOs, sockets
  and device nodes are refused *before* they are opened (``fstatat`` without
  following), then the opened descriptor is checked again with ``fstat``
  (same device and inode) so a swap in between is caught;
* the file is opened ``O_NONBLOCK`` so that a FIFO swapped in at the last
  moment can never block the event loop.

The root itself is the operator's choice and may be reached through a
symlink.  Hard links inside the root to files elsewhere cannot be detected and
are the operator's responsibility.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import SidusError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class NotServable(SidusError):
    """The path cannot be served; ``missing`` tells "not found" from "refused"."""

    def __init__(self, reason: str, missing: bool = False):
        self.reason = reason
        self.missing = missing
        super().__init__(reason)


def _fail(exc: OSError, what: str) -> NotServable:
    if exc.errno == errno.ENOENT:
        return NotServable(f"{what}: no such file", missing=True)
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return NotServable(f"{what}: symbolic link refused")
    if exc.errno == errno.ENOTDIR:
        return NotServable(f"{what}: not a directory (or a symbolic link)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NotServable(f"{what}: permission denied")
    return NotServable(f"{what}: {exc.strerror}")


def open_confined(root: Path | str, parts: tuple[str, ...]) -> tuple[int, int]:
    """Open ``root/parts...`` read-only without leaving ``root``; return ``(fd, size)``.

    Raises :class:`NotServable` (``missing=True`` when a component does not
    exist).  The caller owns and must close the returned descriptor.
    """
    if not parts:
        raise NotServable("empty path")
    for p in parts:
        if not p or p in (".", "..") or "/" in p or "\x00" in p:
            raise NotServable(f"invalid path component {p!r}")
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise NotServable(f"tftp root {root}: {exc.strerror}",
                          missing=exc.errno == errno.ENOENT) from None
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                raise _fail(exc, "/".join(parts[:i + 1])) from None
            os.close(dfd)
            dfd = nfd
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            raise _fail(exc, "/".join(parts)) from None
        if stat.S_ISLNK(st.st_mode):
            raise NotServable(f"{'/'.join(parts)}: symbolic link refused")
        if not stat.S_ISREG(st.st_mode):
            raise NotServable(f"{'/'.join(parts)}: not a regular file")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise _fail(exc, "/".join(parts)) from None
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise NotServable(f"{'/'.join(parts)}: changed while opening")
        return fd, st2.st_size
    finally:
        os.close(dfd)


class FileSource:
    """A transfer source reading an open descriptor with ``os.pread`` (no shared offset)."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    def read_block(self, offset: int, size: int) -> bytes:
        if offset >= self.size:
            return b""
        want = min(size, self.size - offset)
        data = os.pread(self.fd, want, offset)
        if len(data) != want:
            raise OSError(errno.EIO, "file shrank during the transfer")
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReadAheadSource(FileSource):
    """A :class:`FileSource` that reads ``readahead`` bytes at a time and serves blocks from them.

    A lockstep transfer asks for one block (e.g. 1468 bytes) per ACK: one
    ``pread`` per block is a system call per datagram.  This source reads
    ahead (64 KiB: about 44 such blocks) and slices; memory stays bounded by
    one buffer per transfer.  A window is asked for at once (``contiguous``).
    A file that shrinks below what the transfer still needs raises ``OSError``
    (``EIO``) as soon as a read comes up short, as :class:`FileSource` does.
    """

    __slots__ = ("_buf", "_at", "readahead")
    contiguous = True

    def __init__(self, fd: int, size: int, readahead: int = 64 * 1024):
        super().__init__(fd, size)
        self._buf = b""
        self._at = 0
        self.readahead = readahead

    def read_block(self, offset: int, size: int) -> bytes:
        rel = offset - self._at
        end = offset + size
        if end > self.size:
            end = self.size
        if 0 <= rel and end - self._at <= len(self._buf):
            return self._buf[rel:end - self._at]
        if offset >= self.size:
            return b""
        want = min(max(size, self.readahead), self.size - offset)
        data = os.pread(self.fd, want, offset)
        if len(data) != want:
            raise OSError(errno.EIO, "file shrank during the transfer")
        self._buf, self._at = data, offset
        return data[:end - offset] if end - offset < want else data
