"""What the worker reports on its ctl channel, applied in the supervisor (already checked by ipc).

Counter deltas are added to the supervisor's observer (at most
``MAX_COUNTER_NAMES`` distinct names: memory bound), clients seen and timeline
entries go to its client history (``Observer.record``: the history journal and
the boot metrics listen there), and a served boot config becomes a booted
record (the supervisor writes the file: docs/images.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_COUNTER_NAMES = 4096     # distinct counters the worker may create (memory bound)


@dataclass(frozen=True)
class _BootedTarget:
    image: str
    image_root: Path
    hostname: str | None
    mac: str | None = None          # set when the MAC is in the inventory (BootTarget.mac)


def apply_events(runtime: Any, refusals: Any, b: dict[str, Any]) -> None:
    """Apply one checked ``events`` message: counter deltas, clients seen, timeline entries, boots."""
    obs = runtime.observer
    for name, n in b["counters"].items():
        if name not in obs.counters and len(obs.counters) >= MAX_COUNTER_NAMES:
            refusals.refuse("bad_field", f"counter {name}: more than {MAX_COUNTER_NAMES} counter names")
            continue
        obs.count(name, n)
    if b["dropped"]:
        obs.count("privsep.events_dropped", b["dropped"])
    cfg = runtime.config
    for e in b["events"]:
        if e[0] == "seen":
            obs.client_seen(e[1], e[2], e[3])
        elif e[0] == "tl":
            # through the observer, so its listeners (history journal, boot metrics) hear it
            obs.record(e[1], round(e[2], 3), e[3], dict(e[4]))
        elif e[0] == "booted":
            img = cfg.images.get(e[2])
            if img is None:
                obs.count("privsep.refused.bad_field")
                continue
            # known: the MAC is an inventory host (an unknown one never evicts a known one)
            known = e[1] in runtime.inventory.hosts
            target = _BootedTarget(e[2], img.root, e[3], e[1] if known else None)
            runtime.booted.note(cfg, e[1], target)
