"""sidusd.net.http_conns.Gate: a refused peer that reset between our 503 and our half-close.

The race (the peer's RST lands between ``send()`` and ``shutdown(SHUT_WR)``)
is a window of microseconds between two system calls that no real client can
hit on purpose; the attack run hit it 44 times in 535 000 refused
connections.  So this unit test gives Gate a transport whose ``write_eof``
fails the way the kernel does then (ENOTCONN).
"""

from __future__ import annotations

import errno
from types import SimpleNamespace
from typing import Any

from sidusd.net.http_conns import BUSY, Gate
from sidusd.observability import Observer


class ResetTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True


def test_write_eof_on_a_reset_refused_peer_is_not_an_unhandled_error() -> None:
    obs = Observer()
    svc: Any = SimpleNamespace(_admit=lambda transport: None, _refusing=0, _loop=None,
                               runtime=SimpleNamespace(observer=obs))
    gate, transport = Gate(svc), ResetTransport()
    gate.connection_made(transport)                 # before: OSError out of the loop callback
    assert transport.written == [BUSY] and transport.aborted
    assert obs.counters["http.refused.reset"] == 1
    gate.connection_lost(None)
    assert svc._refusing == 0                       # the lingering count is given back
