"""``tftp.fragment``: a block larger than the arrival interface's MTU, granted only when asked.

In a namespace whose loopback has MTU 1200, the real daemon (supervisor + worker) answers
a request for blksize 65464 with 1168 (one datagram per block) by default; after a reload
with ``fragment: true`` it grants 65464, and atftp (a C client) fetches a file in blocks of
65464 that the IP layer cut into fragments, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import poll_until, require_root, require_tool

from sidusd.proto import tftp

pytestmark = pytest.mark.netns


def oack(ns, log: Path) -> tftp.Packet:
    from daemon_fixture import RRQ_65464
    r = ns.run(sys.executable, "-c", RRQ_65464, check=False, timeout=60)
    assert r.returncode == 0, r.stderr + log.read_text()[-2000:]
    return tftp.decode(bytes.fromhex(r.stdout))


def test_fragment_grants_blocks_over_the_mtu_after_a_reload(tmp_path) -> None:
    require_root()
    require_tool("ip")
    require_tool("atftp")
    from daemon_fixture import REPO, base_config, base_inventory, log_events
    from netns import NetNs
    cfg = base_config(tmp_path, 6969)
    root = Path(cfg["tftp"]["root"])
    (root / "f").write_bytes(b"m" * 5000)
    data = os.urandom(400_003)                      # 7 blocks of 65464, the last one short
    (root / "big").write_bytes(data)
    conf = tmp_path / "sidus.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(base_inventory()))
    (tmp_path / "state").mkdir()
    log_path = tmp_path / "daemon.log"
    with NetNs("sidus-t-frag") as ns, open(log_path, "wb") as log:
        ns.run("ip", "link", "set", "lo", "mtu", "1200")
        ns.popen([sys.executable, "-m", "sidusd", "--config", str(conf)],
                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        assert oack(ns, log_path) == tftp.OACK((("blksize", "1168"),))

        cfg["tftp"]["fragment"] = True
        conf.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket",
                            cfg["control"]["socket_path"], "reload"],
                           capture_output=True, text=True, cwd=REPO, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert poll_until(lambda: any(e.get("event") == "reload.ok" for e in log_events(log_path)),
                          20), log_path.read_text()[-2000:]
        assert oack(ns, log_path) == tftp.OACK((("blksize", "65464"),))

        out = tmp_path / "got"
        r = ns.run("atftp", "--option", "blksize 65464", "--tftp-timeout", "2", "-g", "-r", "big",
                   "-l", str(out), "127.0.0.1", "6969", check=False, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr + log_path.read_text()[-2000:]
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()

        def done() -> list[dict]:
            return [e for e in log_events(log_path)
                    if e.get("event") == "tftp.transfer" and e.get("file") == "big"]
        poll_until(lambda: bool(done()), 10)
    assert [(e["outcome"], e["blksize"], e["bytes"]) for e in done()] == [("ok", 65464, len(data))]
