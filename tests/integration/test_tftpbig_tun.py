"""bench/tftpbig.py --link tun: lockstep over two TUN devices joined by bench/wiredelay.c.

Checks that the case runs end to end against sidusd and dnsmasq, that every client got the file
(sha256 of client 0, exit status of the rest), and that the relay really adds the round trip it
was given (a UDP echo from the clients' namespace takes at least that long), not how fast anyone
is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]


def test_tftpbig_over_a_delayed_tun_link(tmp_path) -> None:
    require_root()
    for tool in ("atftp", "dnsmasq", "unshare", "ip", "cc"):
        require_tool(tool)
    r = subprocess.run([sys.executable, "-m", "bench.tftpbig", "--quick", "--link", "tun", "--rtt-us", "2000",
                        "--servers", "sidusd,dnsmasq", "--blksizes", "1468,8972"],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    path = Path(re.search(r"^results: (.+)$", r.stdout, re.M).group(1))
    try:
        doc = json.loads(path.read_text())
    finally:
        path.unlink()
    runs = doc["runs"]
    assert sorted((x["server"], x["blksize"], x["clients"]) for x in runs) == sorted(
        (s, b, n) for s in ("sidusd", "dnsmasq") for b in (1468, 8972) for n in (1, 4))
    for x in runs:
        assert x["failures"] == 0 and x["sha256_ok"], x
    # the relay's added round trip, measured through it: 2 ms asked, nothing near a bare veth's
    rtt = [float(m) for m in re.findall(r"echo rtt clients -> [0-9.]+: ([0-9.]+) ms", "\n".join(doc["loads"]))]
    assert len(rtt) == 1 and 2.0 <= rtt[0] < 20.0, doc["loads"]
    # the relay stopped on SIGTERM and said what it forwarded, both ways, with nothing dropped
    counts = [ln for ln in doc["loads"] if ln.startswith("wiredelay:")]
    assert len(counts) == 1, doc["loads"]
    fwd = [int(n) for n in re.findall(r"forwarded (\d+)", counts[0])]
    assert len(fwd) == 2 and min(fwd) > 1000, counts
    assert re.findall(r"dropped (\d+)", counts[0]) == ["0", "0"], counts
    # a tiny 1 MB file at 1468 in lockstep takes >= 681 round trips of >= 2 ms
    one = [x for x in runs if x["blksize"] == 1468 and x["clients"] == 1]
    assert all(x["wall_s"] >= 681 * 0.002 for x in one), one
