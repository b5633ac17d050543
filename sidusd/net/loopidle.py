"""How long the C engine may keep the event loop's thread, and what ends that early.

``Engine.pump`` waits for the ACKs of the DATA it just sent (the GIL released) instead of
going back to the event loop: every trip back costs a turn of asyncio in Python, which was a
fifth of sidusd's CPU for one lockstep client on a LAN (py-spy, ``bench.tftpbig --link tun``,
N = 1).  What the wait must not hold up:

* other I/O for the loop: it makes the loop's epoll descriptor readable, and the wait
  watches that descriptor (``wake_fd``) and ends at once;
* a callback already queued (``call_soon``, or the next handles of this loop turn): then
  only the short wait (``short_us``) is allowed, as before;
* a timer (a retransmission, a lease, an idle timeout): the wait ends before it is due.

These are asyncio's ``BaseEventLoop`` internals (``_selector``, ``_ready``, ``_scheduled``),
read, never written; a loop without them (another implementation) gets the short wait and
no ``wake_fd``, as before this module.
"""

from __future__ import annotations

import asyncio
from typing import Any


def idle_budget(loop: asyncio.AbstractEventLoop, now: float, long_us: int,
                short_us: int) -> tuple[int, int]:
    """``(wait_us, wake_fd)`` for one ``Engine.pump`` call made at loop time ``now``."""
    selector: Any = getattr(loop, "_selector", None)
    ready = getattr(loop, "_ready", None)
    scheduled = getattr(loop, "_scheduled", None)
    fileno = getattr(selector, "fileno", None)
    if fileno is None or ready is None or scheduled is None:
        return short_us, -1
    try:
        wake_fd = int(fileno())
    except (OSError, ValueError, TypeError):
        return short_us, -1
    if ready:
        return short_us, wake_fd
    wait_us = long_us
    if scheduled:
        due_us = int((scheduled[0].when() - now) * 1_000_000)
        wait_us = max(0, min(wait_us, due_us))
    return wait_us, wake_fd
