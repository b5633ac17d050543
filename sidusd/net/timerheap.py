"""One event-loop timer for many deadlines (a heap, re-armed to the earliest).

An item (a TFTP transfer) has at most one live entry: its ``heap_at``
attribute holds the deadline of that entry; an older entry whose deadline is
no longer the item's ``heap_at`` is superseded and skipped when it comes up.
An item that wants an earlier deadline pushes a new entry; a later one waits
for its old entry to come up and is pushed again then (:meth:`push`), so the
heap holds about one entry per item.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any

TIMER_SLACK_S = 1e-3        # deadlines this close to now are due


class TimerHeap:
    """Deadlines of many items on one ``loop.call_at`` (``fire(now)`` when the earliest is due)."""

    def __init__(self, fire: Callable[[float], None], slack_s: float = TIMER_SLACK_S):
        self.loop: asyncio.AbstractEventLoop | None = None    # set by the owner when it starts
        self.slack_s = slack_s
        self._fire = fire
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def schedule(self, item: Any, at: float) -> None:
        """Give ``item`` the deadline ``at`` and arm the timer for it if it is the earliest."""
        item.heap_at = at
        heapq.heappush(self._heap, (at, next(self._seq), item))
        self.arm()

    def push(self, item: Any, at: float) -> None:
        """Like :meth:`schedule` without arming (inside ``fire``: the timer is re-armed after it)."""
        item.heap_at = at
        heapq.heappush(self._heap, (at, next(self._seq), item))

    def due(self, now: float) -> Iterator[Any]:
        """The items whose deadline has come (their ``heap_at`` cleared), earliest first."""
        heap, slack = self._heap, self.slack_s
        while heap and heap[0][0] <= now + slack:
            at, _, item = heapq.heappop(heap)
            if at != item.heap_at:
                continue                        # superseded by an earlier entry
            item.heap_at = None
            yield item

    def arm(self) -> None:
        """Arm the loop timer for the earliest deadline (if it is not armed earlier already)."""
        if not self._heap:
            return
        assert self.loop is not None
        at = self._heap[0][0]
        if self._timer is not None and self._at is not None and self._at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def cancel(self) -> None:
        """Disarm the loop timer (the entries stay)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._at = None

    def _on_timer(self) -> None:
        assert self.loop is not None
        self._timer = self._at = None
        self._fire(self.loop.time())
        self.arm()
