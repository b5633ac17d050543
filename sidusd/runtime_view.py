"""What a network service reads from the runtime (:class:`sidusd.runtime.Runtime` and the
worker's ``WorkerRuntime`` provide it; tests may pass a small stand-in).

A service never reaches past this: it reads the live config per request,
counts and records on the observer, and asks :meth:`RuntimeView.provide` what
a requested name is served as (:mod:`sidusd.boot.provider`).
"""

from __future__ import annotations

from typing import Any, Protocol

from .boot import provider
from .boot.inventory import Inventory
from .config import Config


class ObserverView(Protocol):
    """Counters, the per-client boot timeline and the DHCP table (``observability.Observer``)."""

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""

    def timeline(self, mac: str | None, event: str, **fields: Any) -> None:
        """Add ``event`` to the boot timeline of ``mac`` (nothing when None)."""

    def mac_for_ip(self, ip: str) -> str | None:
        """The MAC that did the last DHCP exchange from ``ip``, if any."""

    def client_seen(self, mac: str, ip: str | None = None, arch: str | None = None) -> object:
        """Note that ``mac`` spoke to us (from ``ip``, with firmware ``arch``): the DHCP table."""

    def claim_attempt(self, mac: str, ip: str) -> None:
        """``ip`` stated ``mac`` against the lease table (full mode): counted and shown, no claim."""


class RuntimeView(Protocol):
    """The live state as the services see it (swapped atomically on reload)."""

    @property
    def config(self) -> Config:
        """The current config."""

    @property
    def inventory(self) -> Inventory:
        """The current inventory."""

    @property
    def observer(self) -> ObserverView:
        """Counters, timeline, DHCP table."""

    def provide(self, name: str, server_ip: str, client_ip: str) -> provider.Response | provider.Refusal:
        """What ``name`` is served as for ``client_ip`` asking on ``server_ip``."""

    def render(self, kind: str, mac: str | None, server_ip: str, client_ip: str) -> bytes | None:
        """The rendered document of a generated name, or None."""
