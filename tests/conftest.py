"""Shared test helpers.

A test that needs an external tool calls ``require_tool("atftp")``: it skips
with the tool's name, and .ci/run installs every such tool so CI never skips.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def require_tool(name: str) -> str:
    """Path of executable ``name`` or skip the test saying which tool is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if not path:
        pytest.skip(f"missing tool: {name} (installed by .ci/run)")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("missing privilege: root (network namespaces)")


@pytest.fixture
def tool():
    return require_tool
