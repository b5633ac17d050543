"""bench/udpsplice.py: the copy-or-splice micro-benchmark runs, and both ways deliver the file.

Checks that it runs and reports every round for both ways (the receiver's sha256 of what
it got is checked by the bench itself, which exits non-zero on a mismatch); not how fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_udpsplice_runs_both_ways_and_checks_the_bytes() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.udpsplice", "--blksizes", "1468,65464",
                        "--rounds", "2", "--blocks", "60"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    rows = re.findall(r"blksize +(\d+) round (\d)  copy +(\d+) MB/s ([\d.]+) s/GB  splice +(\d+) MB/s ([\d.]+) s/GB",
                      r.stdout)
    assert [(int(b), int(n)) for b, n, *_ in rows] == [(1468, 0), (1468, 1), (65464, 0), (65464, 1)]
    assert all(int(c) > 0 and int(s) > 0 for _, _, c, _, s, _ in rows)
    assert not list(Path("/dev/shm").glob("sidus-udpsplice-*"))       # its file removed
