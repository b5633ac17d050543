"""The rack server's local copy of the shared state (``state.local_copy``).

Written atomically (temporary file, fsync, rename: :func:`sidusd.fsutil.atomic_write`)
after every snapshot that was adopted; read at start when PostgreSQL cannot be
reached, so a rack server restarted during an outage serves what it served.
"""

from __future__ import annotations

from pathlib import Path

from sidusd.errors import ConfigError
from sidusd.fsutil import atomic_write

from . import snapshot as snap_mod


def write(path: Path, snap: snap_mod.StateSnapshot) -> None:
    """Replace the local copy with ``snap`` (mode 0600: it may name every host of the site)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, snap_mod.encode(snap), 0o600)


def read(path: Path) -> snap_mod.StateSnapshot | None:
    """The local copy, None when there is none; ConfigError when it is not a snapshot."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError("state.local_copy", f"{path}: {e.strerror}") from None
    return snap_mod.decode(data, str(path))
