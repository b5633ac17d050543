"""Shared test helpers.

A test that needs an external tool calls ``require_tool("atftp")``: it skips
with the tool's name, and .ci/run installs every such tool so CI never skips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _structlog_config_restored():
    """Every test leaves structlog as it found it: a CLI's ``main()`` called in-process (e.g.
    sidus-image's, which sets the level to warning) must not filter the info events a later
    test captures with ``structlog.testing.capture_logs`` (the CI run of 71c7f94: 41 TFTP tests
    saw no ``tftp.transfer`` event after test_image_rollback_served ran in the same process)."""
    import structlog
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def pytest_configure(config) -> None:
    """Start every test, and every process a test starts, with the default signal dispositions.

    The tests send SIGINT (a Ctrl-C to a process group), SIGTERM and SIGHUP to
    real processes and check what they do.  An ignored disposition is inherited
    through fork and exec, and a shell cannot trap a signal ignored at its entry:
    when the suite itself is started under ``nohup`` (SIGHUP ignored) or as a
    background job of a non-interactive shell (SIGINT and SIGQUIT ignored), those
    processes would not see the signals and the tests would fail for a reason
    that is not in the code under test.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def require_tool(name: str) -> str:
    """Path of executable ``name`` or skip the test saying which tool is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if not path:
        pytest.skip(f"missing tool: {name} (installed by .ci/run)")
    return path


# A terminal control sequence: CSI (ESC [ params final), or a two-byte ESC sequence (ESC c resets).
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_c]")


def console_text(path: Path) -> str:
    """A VM's serial log as text with the terminal control sequences removed (empty if absent).

    SeaBIOS mirrors the VGA cursor to the serial port, so a line that PXELINUX prints there can be
    cut by a cursor move: the CI run of stop 26 read ``sidus-pxelinux-d18c06\x1b[25;21H\x1b[25;22Hb3``
    where the marker was ``sidus-pxelinux-d18c06b3``."""
    if not path.exists():
        return ""
    return _CONTROL.sub("", path.read_text(errors="replace"))


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("missing privilege: root (network namespaces)")


@pytest.fixture
def tool():
    return require_tool


def poll_until(condition, timeout_s: float = 5.0) -> bool:
    """Poll ``condition()`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def absolute_import(module: str | None, level: int, package: str) -> str:
    """Absolute dotted name of an import made from ``package`` (``sidusd.boot``)."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))
