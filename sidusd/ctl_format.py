"""sidusctl's pure formatting: sizes, durations, times, aligned tables (sidusd/ctl.py renders with
them; so do ctl_inventory and ctl_import)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any


def fmt_size(n: Any) -> str:
    """``412 B``, ``1.5 KiB``, ``34.2 MiB``."""
    if not isinstance(n, (int, float)):
        return "-"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_duration(s: Any) -> str:
    """``0.01 s``, ``12.3 s``, ``4 min 5 s``, ``3 h 2 min``, ``2 d 4 h``."""
    if not isinstance(s, (int, float)):
        return "-"
    if round(s, 2) < 10:
        return f"{s:.2f} s"
    if round(s, 1) < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def fmt_time(t: Any, tz: dt.tzinfo | None = None, millis: bool = False) -> str:
    """A timestamp (seconds since the epoch) in local time (or ``tz``)."""
    if not isinstance(t, (int, float)):
        return "-"
    d = dt.datetime.fromtimestamp(t, tz)
    return d.strftime("%H:%M:%S.") + f"{d.microsecond // 1000:03d}" if millis else d.strftime("%Y-%m-%d %H:%M:%S")


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v) or "-"
    if isinstance(v, dict):
        return " ".join(f"{k}={_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> list[str]:
    """Left-aligned columns separated by two spaces (trailing spaces stripped)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))).rstrip() for r in cells]


def _keys(dicts: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> list[str]:
    keys = [k for k in first if any(k in d for d in dicts)]
    for d in dicts:
        keys += [k for k in d if k not in keys]
    return keys
