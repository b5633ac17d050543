"""README, "Without the Debian package": ``pipx install`` of sidusd works outside a checkout (issue
15: "installable with pipx or into a venv"; the venv and the Debian package are
tests/integration/test_packaging.py's).  pipx's own directories under the test's tmp_path; run from
/tmp with no PYTHONPATH; the code and its package data come from pipx's venv, not this checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_packaging import REPO, assert_installed_copy, clean_env, run, where

from tests.conftest import require_tool


def test_pipx_install_of_the_wheel_works_outside_the_checkout(tmp_path):
    pipx = require_tool("pipx")
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), str(REPO)],
            tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "wheel").glob("sidusd-*.whl")
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = {**clean_env(), "PIPX_HOME": str(home), "PIPX_BIN_DIR": str(bin_dir), "PIPX_MAN_DIR": str(tmp_path / "man")}
    r = subprocess.run([pipx, "install", str(wheel)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for prog in ("sidusd", "sidusctl", "sidus-image"):
        assert (bin_dir / prog).exists(), prog
    python = home / "venvs" / "sidusd" / "bin" / "python"
    assert_installed_copy(where(str(python), tmp_path), str(home / "venvs" / "sidusd"))
    r = run([str(bin_dir / "sidus-image"), "--help"], tmp_path)
    assert r.returncode == 0 and "rollback" in r.stdout, r.stderr
    # the installed example config is found and read: --check names what this machine lacks
    example = Path(where(str(python), tmp_path)["example"])
    r = run([str(bin_dir / "sidusd"), "--check", "--config", str(example)], tmp_path)
    assert r.returncode == 2 and str(example) in r.stderr, r.stderr
