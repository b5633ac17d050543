"""The control socket file: bound safely, and who is on the other end (Linux ``AF_UNIX``).

Safety of the socket file (``config.control.socket_path``):

* the parent directory is created with mode 0755 when missing;
* the socket is bound inside a private 0700 temporary directory next to the final
  path, set to mode 0600, then renamed into place: it is never reachable with
  wider permissions and ``rename`` replaces a stale socket without following a
  symlink;
* an existing path that is not a socket (a regular file, a symlink...) is never
  removed: start-up fails and says why; a socket another process still listens
  on is left alone (another sidusd is running);
* peers are also checked with ``SO_PEERCRED`` (:func:`peer_uid`): the server lets
  only root (or the daemon's own user) talk to it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path

from ..errors import StartupError


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end of ``writer`` (``SO_PEERCRED``), None if unknown."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def bind_safely(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from its first instant."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o755, parents=True)
            os.chmod(parent, 0o755)
        except OSError as exc:
            raise StartupError(f"control socket: cannot create {parent}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"control socket {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
            raise StartupError(f"control socket {path} exists and is {kind}: refusing to replace it "
                               "(remove it by hand if it is yours)")
        if is_live(path):
            raise StartupError(f"control socket {path} is in use: is another sidusd running?")
    try:
        tmpdir = tempfile.mkdtemp(prefix=".sidus-ctl-", dir=parent)   # mode 0700
    except OSError as exc:
        raise StartupError(f"control socket: cannot write in {parent}: {exc.strerror}") from None
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, path)            # atomic; replaces a stale socket, never follows a link
    except OSError as exc:
        sock.close()
        raise StartupError(f"control socket {path}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.rmdir(tmpdir)
    sock.setblocking(False)
    return sock


def is_live(path: Path) -> bool:
    """Whether a process still accepts connections on the socket at ``path`` (unsure: True)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True         # cannot tell (e.g. EAGAIN on a full backlog): do not take it over
    else:
        return True
    finally:
        probe.close()
