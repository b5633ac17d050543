"""The worker's observer and runtime: fed by the supervisor's snapshots, reporting back to it.

* ``ForwardingObserver`` works locally (``mac_for_ip``...) and queues what the
  supervisor shows: counter deltas, clients seen, timeline entries and booted
  records, sent in batches (``take_messages``) of at most ``ipc.MAX_MSG`` bytes;
* ``WorkerRuntime`` has the attributes the services use (config, inventory,
  snapshot, observer, render, iscsi_login) and writes no file.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ipc

MAX_PENDING_EVENTS = 20_000   # events kept while the supervisor is slow (oldest dropped, counted)


def make_observer_class() -> type:
    from ..observability import Observer

    class ForwardingObserver(Observer):
        """The worker's observer: works locally (``mac_for_ip``...) and queues what the supervisor shows."""

        def __init__(self) -> None:
            super().__init__()
            self.delta: collections.Counter[str] = collections.Counter()
            self.pending: collections.deque[list] = collections.deque(maxlen=MAX_PENDING_EVENTS)
            self.dropped = 0

        def count(self, name: str, n: int = 1) -> None:
            # the hot path (once per datagram): the totals live in the supervisor only
            self.delta[name] += n

        def queue(self, event: list) -> None:
            try:
                ipc.check_event(event)
            except ipc.RemoteProtocolError:
                self.count("privsep.events_unforwardable")
                return
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append(event)

        def client_seen(self, mac: str, ip: str | None = None, arch: str | None = None) -> Any:
            rec = super().client_seen(mac, ip, arch)
            self.queue(["seen", mac, ip if ip and ip != "0.0.0.0" else None, arch or None])
            return rec

        def timeline(self, mac: str | None, event: str, **fields: Any) -> None:
            if not mac:
                return
            super().timeline(mac, event, **fields)
            t = self.clients[mac].timeline[-1]["t"]
            self.queue(["tl", mac, t, event, {k: plain_value(v) for k, v in fields.items()}])

        def take_messages(self) -> list[bytes]:
            """The pending counters and events as datagrams of at most ``MAX_MSG`` bytes."""
            out: list[bytes] = []
            counters = dict(self.delta)
            self.delta.clear()
            dropped, self.dropped = self.dropped, 0
            budget = ipc.MAX_MSG - 1024
            batch: list[list] = []
            size = len(json.dumps(counters)) + 64
            while self.pending:
                e = self.pending[0]
                n = len(ipc.encode_worker({"e": e})) + 1
                if batch and (size + n > budget or len(batch) >= ipc.MAX_EVENTS):
                    out.append(ipc.encode_worker({"t": "events", "counters": counters, "events": batch,
                                                  "dropped": dropped}))
                    counters, dropped, batch, size = {}, 0, [], 64
                batch.append(self.pending.popleft())
                size += n
            if batch or counters or dropped:
                # counters are capped per message too
                items = list(counters.items())
                first = dict(items[:ipc.MAX_COUNTERS])
                out.append(ipc.encode_worker({"t": "events", "counters": first, "events": batch,
                                              "dropped": dropped}))
                for i in range(ipc.MAX_COUNTERS, len(items), ipc.MAX_COUNTERS):
                    out.append(ipc.encode_worker({"t": "events", "counters": dict(items[i:i + ipc.MAX_COUNTERS]),
                                                  "events": [], "dropped": 0}))
            return out

    return ForwardingObserver


def plain_value(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else None
    return str(v)


@dataclass(frozen=True)
class _Plan:
    target_iqn: str
    initiator_iqn: str
    user: str


@dataclass(frozen=True)
class _Disk:
    plan: _Plan
    secret: str


class _Disks:
    """What the worker knows of the iSCSI manager: each persistent host's login (for its config)."""

    def __init__(self, disks: dict[str, dict[str, str]]):
        self.disks = {mac: _Disk(_Plan(d["target_iqn"], d["initiator_iqn"], d["user"]), d["secret"])
                      for mac, d in disks.items()}

    def disk(self, mac: str) -> Any:
        return self.disks.get(mac)


class _ForwardBooted:
    """The worker's booted recorder: the supervisor writes the file (docs/images.md)."""

    def __init__(self, observer: Any):
        self.observer = observer

    def note(self, config: Any, mac: str | None, target: Any, now: float | None = None) -> None:
        if mac is None or target is None or getattr(config.booted, "file", None) is None:
            return
        self.observer.queue(["booted", mac, target.image, target.hostname])

    async def aclose(self) -> None:
        pass


def make_runtime_class() -> type:
    from ..runtime import Runtime

    class WorkerRuntime(Runtime):
        """The attributes the services use (config, inventory, snapshot, observer, render,
        iscsi_login), fed by the supervisor's snapshots; nothing here writes a file."""

        def __init__(self, snapshot: Any, disks: dict[str, Any] | None, observer: Any):
            super().__init__(Path(snapshot.config.source), snapshot, observer=observer, iscsi_watch_s=0)
            self.booted = _ForwardBooted(observer)
            self.update(snapshot, disks)

        def update(self, snapshot: Any, disks: dict[str, Any] | None) -> None:
            self._snap = snapshot
            self.observer.set_known(snapshot.inventory.hosts)
            # the worker's stand-in has only disk() (for iscsi_login): the supervisor owns the manager
            self.iscsi = _Disks(disks) if disks is not None else None  # type: ignore[assignment]

        async def reload(self) -> Any:            # pragma: no cover - the supervisor reloads
            raise RuntimeError("the worker does not reload: the supervisor pushes snapshots")

        async def edit_inventory(self, fn: Any) -> Any:   # pragma: no cover
            raise RuntimeError("the worker writes no state")

    return WorkerRuntime


