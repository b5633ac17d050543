"""The shared state as one schema'd snapshot, and what changed between two (pure).

A :class:`StateSnapshot` holds the documents the database stores: profiles by
name, hosts (each an inventory file entry), images by name, and the database's
revision.  Its envelope is a msgspec struct (the one schema mechanism); each
entry is checked by the inventory's and the config's own declarations when
:func:`to_inventory` / :func:`image_configs` build the objects that serve, so a
document the YAML files would refuse is refused here too, with its path.

Pure: no I/O (the local copy and the database read and write bytes elsewhere).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from sidusd.boot.inventory import Inventory, inventory_from_doc
from sidusd.errors import ConfigError

MAX_HOSTS = 100_000


class StateSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One consistent read of the shared state (``revision``: the database's counter)."""
    revision: int = 0
    profiles: dict[str, dict[str, Any]] = {}
    hosts: list[dict[str, Any]] = []
    images: dict[str, dict[str, Any]] = {}


class Changes(msgspec.Struct, frozen=True):
    """What a new snapshot changes (for the log line and the metrics of a swap)."""
    hosts_added: tuple[str, ...] = ()
    hosts_removed: tuple[str, ...] = ()
    hosts_changed: tuple[str, ...] = ()
    profiles_changed: tuple[str, ...] = ()
    images_changed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.hosts_added or self.hosts_removed or self.hosts_changed
                    or self.profiles_changed or self.images_changed)

    def summary(self) -> dict[str, int]:
        return {"hosts_added": len(self.hosts_added), "hosts_removed": len(self.hosts_removed),
                "hosts_changed": len(self.hosts_changed), "profiles_changed": len(self.profiles_changed),
                "images_changed": len(self.images_changed)}


def encode(snap: StateSnapshot) -> bytes:
    """The local copy's bytes (JSON)."""
    return msgspec.json.encode(snap)


def decode(data: bytes, source: str = "<state>") -> StateSnapshot:
    """A snapshot from :func:`encode`'s bytes; ConfigError naming ``source`` if it is not one."""
    try:
        return msgspec.json.decode(data, type=StateSnapshot)
    except msgspec.DecodeError as e:         # ValidationError is a DecodeError
        raise ConfigError(source, f"not a state snapshot: {e}") from None


def to_inventory(snap: StateSnapshot, source: str = "<state>") -> Inventory:
    """The inventory of ``snap``, checked as the inventory file is (InventoryError with the path)."""
    if len(snap.hosts) > MAX_HOSTS:
        raise ConfigError(f"{source}.hosts", f"more than {MAX_HOSTS} hosts")
    # the inventory file's checks and messages, without its YAML parser (1,000 hosts: 0.5 s of it)
    return inventory_from_doc({"profiles": snap.profiles, "hosts": snap.hosts})


def images_text(snap: StateSnapshot) -> str:
    """The images as an images file's text (``sidusd.config.merge_images_file`` reads it)."""
    return json.dumps({"images": snap.images})


def _mac(doc: dict[str, Any]) -> str:
    mac = doc.get("mac")
    return mac.lower().replace("-", ":") if isinstance(mac, str) else repr(mac)


def diff(old: StateSnapshot | None, new: StateSnapshot) -> Changes:
    """What ``new`` changes compared with ``old`` (None: everything in ``new`` is added)."""
    before = {_mac(h): {**h, "mac": _mac(h)} for h in (old.hosts if old else [])}
    after = {_mac(h): {**h, "mac": _mac(h)} for h in new.hosts}
    op = old.profiles if old else {}
    oi = old.images if old else {}
    return Changes(
        hosts_added=tuple(sorted(after.keys() - before.keys())),
        hosts_removed=tuple(sorted(before.keys() - after.keys())),
        hosts_changed=tuple(sorted(m for m in after.keys() & before.keys() if after[m] != before[m])),
        profiles_changed=tuple(sorted(n for n in op.keys() | new.profiles.keys()
                                      if op.get(n) != new.profiles.get(n))),
        images_changed=tuple(sorted(n for n in oi.keys() | new.images.keys() if oi.get(n) != new.images.get(n))))
