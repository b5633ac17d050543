"""One ``hosts.import`` batch applied to the inventory as a whole (pure; docs/migration.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from sidusd.errors import InventoryError

from .inventory import Host, Inventory


def apply_batch(inv: Inventory, hosts: Sequence[Host], sources: Sequence[str | None],
                replace_existing: bool = False) -> Inventory:
    """``inv`` with every host of the batch added (replacing the same MACs when
    ``replace_existing``), checked once as a whole; InventoryError names the batch entry's source."""
    where = {h.mac: (src or f"hosts[{i}]") for i, (h, src) in enumerate(zip(hosts, sources, strict=True))}
    if len(where) != len(hosts):
        dup = next(h.mac for i, h in enumerate(hosts) if h.mac in {x.mac for x in hosts[:i]})
        raise InventoryError("hosts", f"MAC {dup} is twice in the import")
    taken = [m for m in where if m in inv.hosts]
    if taken and not replace_existing:
        listed = ", ".join(f"{m} (from {where[m]})" for m in taken[:10]) + (" ..." if len(taken) > 10 else "")
        raise InventoryError("hosts", f"already in the inventory: {listed}; nothing imported (--replace "
                             "replaces them)")
    merged = dict(inv.hosts)
    merged.update({h.mac: h for h in hosts})
    try:
        return Inventory(inv.profiles, merged)
    except InventoryError as e:
        m = re.match(r"hosts\[([0-9a-f:]{17})\]", e.path)
        src = where.get(m.group(1)) if m else None
        raise InventoryError(e.path, e.reason + (f" (imported from {src})" if src else "")
                             + "; nothing imported") from None
