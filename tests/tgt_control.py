"""The tgtd control port for a test's own tgtd (tgtadm -C N)."""

from __future__ import annotations

from pathlib import Path

TGTD_RUN = Path("/var/run/tgtd")


def free_tgt_control_port(base: int) -> int:
    """A ``tgtd -C`` number from ``base`` on whose control socket, /var/run/tgtd/socket.<N>, is not
    there: that directory is shared by every tgtd on the machine (the serial and the background
    test runs, teammates' labs), and tgt allows N <= 32767."""
    for n in range(base, min(base + 200, 32768)):
        if not any(TGTD_RUN.glob(f"socket.{n}*")):
            return n
    raise AssertionError(f"no free tgtd control port in {base}..{base + 199}")
