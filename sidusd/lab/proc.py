"""Stopping what the lab started: by PID, SIGTERM first, SIGKILL if it lingers."""

from __future__ import annotations

import signal
import subprocess


def terminate(proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM ``proc``, wait ``timeout_s``, then SIGKILL and wait again.
    Nothing to do if it is None or already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
