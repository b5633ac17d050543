"""The bounded queue of events bound for the database (pure; time passed in).

Events wait here while the database is slow or down.  The queue holds at most
``bound`` events: a push into a full queue drops the **oldest** event and counts
it (``dropped``).  :meth:`EventQueue.due` says when a batch should go (a full
batch, or ``interval_s`` since the last flush); :meth:`take` hands out a batch
that is in flight (at most ``batch_max`` besides the bound) until :meth:`done`
(sent) or :meth:`failed` (put back in front, in order, within the bound: what
no longer fits is the oldest and is dropped and counted).
"""

from __future__ import annotations

import collections
from typing import Any


class EventQueue:
    """Bounded FIFO with drop-oldest, batches and counters (``queued``, ``sent``, ``dropped``)."""

    def __init__(self, bound: int, batch_max: int, interval_s: float):
        if bound < 1 or batch_max < 1:
            raise ValueError("bound and batch_max must be at least 1")
        self.bound = bound
        self.batch_max = batch_max
        self.interval_s = interval_s
        self._q: collections.deque[Any] = collections.deque()
        self._inflight = 0
        self.queued = 0          # pushed since start
        self.sent = 0            # confirmed written
        self.dropped = 0         # dropped because the queue was full
        self.last_flush: float | None = None

    def __len__(self) -> int:
        return len(self._q)

    @property
    def inflight(self) -> int:
        return self._inflight

    def push(self, event: Any) -> bool:
        """Queue ``event``; False when that dropped the oldest one (counted)."""
        self.queued += 1
        kept = True
        if len(self._q) >= self.bound:
            self._q.popleft()
            self.dropped += 1
            kept = False
        self._q.append(event)
        return kept

    def due(self, now: float) -> bool:
        """Whether a batch should be sent now (nothing in flight, something queued, full or late)."""
        if self._inflight or not self._q:
            return False
        if len(self._q) >= self.batch_max or self.last_flush is None:
            return True
        return now - self.last_flush >= self.interval_s

    def next_due(self, now: float) -> float | None:
        """Seconds until :meth:`due` turns true by time alone (None: nothing queued or in flight)."""
        if not self._q or self._inflight:
            return None
        if self.due(now):
            return 0.0
        assert self.last_flush is not None
        return max(0.0, self.last_flush + self.interval_s - now)

    def take(self, now: float) -> list[Any]:
        """The next batch (oldest first, at most ``batch_max``), now in flight."""
        n = min(self.batch_max, len(self._q))
        batch = [self._q.popleft() for _ in range(n)]
        self._inflight = n
        self.last_flush = now
        return batch

    def done(self) -> None:
        """The batch in flight was written."""
        self.sent += self._inflight
        self._inflight = 0

    def failed(self, batch: list[Any]) -> None:
        """The batch in flight was not written: back in front, the oldest dropped if it does not fit."""
        self._inflight = 0
        room = self.bound - len(self._q)
        if room < len(batch):
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0):]
        self._q.extendleft(reversed(batch))
