"""``sidusctl watch``: the live terminal view (curses), a thin shell around :func:`sidusd.liveview.screen`.

Every ``interval`` seconds it asks the control socket for ``status``,
``clients`` and ``hosts.list`` (three requests; the daemon answers each from
memory) and draws the page.  Keys: ``/`` types a filter (MAC, hostname,
profile or state; Enter keeps it, Esc clears it), ``q`` quits.  A daemon that
stops answering is shown on the page, and the view keeps retrying.
"""

from __future__ import annotations

import curses
import os
import time
from collections.abc import Callable
from typing import Any

from .control import messages as m
from .liveview import screen

Fetch = Callable[[str], m.Response]


def snapshot(fetch: Fetch) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(status, hosts, clients) from the daemon (``fetch(op)``: its response to ``op``)."""
    out = []
    for op in (m.OP_STATUS, m.OP_HOSTS_LIST, m.OP_CLIENTS):
        resp = fetch(op)
        if not resp.ok:
            raise RuntimeError(f"{op}: {resp.error}")
        out.append(resp.result)
    return out[0], out[1], out[2]


class Keys:
    """The filter being typed (pure: fed one key at a time)."""

    def __init__(self) -> None:
        self.filter = ""
        self.typing = False
        self.quit = False

    def feed(self, key: int | str) -> None:
        ch = key if isinstance(key, str) else (chr(key) if 0 <= key < 0x110000 else "")
        if self.typing:
            if ch in ("\n", "\r") or key == curses.KEY_ENTER:
                self.typing = False
            elif ch == "\x1b":
                self.typing, self.filter = False, ""
            elif ch in ("\x7f", "\b") or key == curses.KEY_BACKSPACE:
                self.filter = self.filter[:-1]
            elif ch.isprintable() and len(self.filter) < 64:
                self.filter += ch
        elif ch == "/":
            self.typing = True
        elif ch in ("q", "Q"):
            self.quit = True
        elif ch == "\x1b":
            self.filter = ""


def run(fetch: Fetch, interval: float = 1.0) -> int:
    """Draw until ``q`` (the curses main loop); returns 0."""
    for var in ("COLUMNS", "LINES"):   # the terminal's size (and its resizes), not one inherited from a parent
        os.environ.pop(var, None)
    return int(curses.wrapper(_loop, fetch, interval))


def _loop(win: Any, fetch: Fetch, interval: float) -> int:
    curses.curs_set(0)
    win.timeout(100)
    keys = Keys()
    data: tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None = None
    error: str | None = None
    next_at = 0.0
    while not keys.quit:
        now = time.monotonic()
        if now >= next_at:
            next_at = now + interval
            try:
                data, error = snapshot(fetch), None
            except Exception as exc:  # noqa: BLE001 (shown on the page; the view keeps retrying)
                error = str(exc)
        h, w = win.getmaxyx()
        lines = screen(*data, now=time.time(), filt=keys.filter, width=w - 1, height=h - 1,
                       typing=keys.typing) if data else ["waiting for sidusd..."]
        if error:
            lines = [f"sidusd: {error}"[:w - 1]] + lines[:h - 2]
        win.erase()
        for y, line in enumerate(lines[:h - 1]):
            try:
                win.addstr(y, 0, line)
            except curses.error:
                pass
        win.refresh()
        try:
            key = win.get_wch()
        except curses.error:
            continue
        keys.feed(key)
    return 0
