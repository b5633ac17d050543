"""What a network service is given by its process, instead of reaching for it.

A service in ``net/`` never opens a served file, writes the lease journal or
binds a listening socket on its own: it is built with a :class:`ServiceIO`
(``services.build_services(runtime, io)``, docs/architecture.md "The edge").
The single-process daemon passes :func:`local_io` (plain local calls); the
privilege-separated worker passes implementations that ask the supervisor,
asynchronously, so that nothing blocks the event loop.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import files


class LeaseJournal(Protocol):
    """The full-DHCP lease journal (``net.leasestore.LeaseStore`` or its remote twin)."""

    path: Path

    async def load(self, db: Any) -> tuple[int, int]:
        """Replay the journal into ``db``; ``(good, refused)`` lines."""

    async def append(self, lease: Any) -> None:
        """Returns once ``lease`` is durable (fsync); raises OSError if it is not."""

    async def append_many(self, leases: Any, sync: bool = True) -> None:
        """Write ``leases`` in order, all or nothing; with ``sync`` returns once they are
        durable (one fsync for the lot: group commit).  Raises OSError if not written."""

    def maybe_compact(self, db: Any, now: float) -> bool:
        """Rewrite the journal when it has grown; True if it did."""

    def close(self) -> None:
        """Release the journal."""


OpenFile = Callable[[Path, tuple[str, ...]], Awaitable[tuple[int, int]]]
"""``await open_file(root, parts) -> (fd, size)``; raises :class:`files.NotServable`."""


Listen = Callable[..., socket.socket]
"""``listener(service, address, port, device=None, rcvbuf=0) -> socket``: the non-blocking
listening socket of ``service`` (dhcp | tftp | http); raises :class:`~sidusd.errors.StartupError`
(:func:`sidusd.net.listeners.bind_listener`, or the worker's inherited one)."""


@dataclass(frozen=True)
class ServiceIO:
    """The file opener, the lease journal and the listening sockets of one process."""

    open_file: OpenFile
    lease_journal: Callable[[Path], LeaseJournal]
    listener: Listen
    tftp_pushers: Any = None    # net.tftp_pushers.Pool: the worker's pushers (None: none)


async def _open_local(root: Path, parts: tuple[str, ...]) -> tuple[int, int]:
    return files.open_confined(root, parts)


def local_io(**overrides: Any) -> ServiceIO:
    """The single-process implementations (privsep off, and the tests)."""
    from .leasestore import LeaseStore
    from .listeners import bind_listener
    fields: dict[str, Any] = {"open_file": _open_local, "lease_journal": LeaseStore,
                              "listener": bind_listener}
    fields.update(overrides)
    return ServiceIO(**fields)
