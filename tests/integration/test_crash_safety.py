"""Crash safety of the state sidusd writes, against the real daemon.

* kill -9 at random moments while ``hosts.add`` writes stream in over the
  control socket (the client library sidusctl uses): after every kill the
  inventory file parses, holds every acknowledged record (the write in flight
  may or may not have landed: old or new, never partial), and the daemon
  restarts; the figures are printed.
* disk full (a tiny tmpfs holds the inventory): sidusd keeps serving TFTP and
  status, refuses the write with a clear error (sidusctl exits 1 and says so),
  and the file on disk is byte-for-byte the old one; once space is back,
  writes work again.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import require_root, require_tool
from daemon_fixture import SidusDaemon
from hardening_util import tracebacks
from sidusd import ctl
from sidusd.boot.inventory import parse_inventory

MACS = [f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}" for i in range(48)]
TARGET_WRITES = 2000
MAX_ROUNDS = 80


class Writer(threading.Thread):
    """Streams hosts.add until the daemon dies; remembers what was acknowledged."""

    def __init__(self, sock: str, seq0: int, acked: dict[str, str]):
        super().__init__(daemon=True)
        self.sock, self.seq, self.acked = sock, seq0, acked
        self.in_flight: tuple[str, str] | None = None
        self.writes = 0

    def run(self) -> None:
        while True:
            mac, name = MACS[self.seq % len(MACS)], f"h{self.seq}"
            self.in_flight = (mac, name)
            try:
                r = ctl.call(self.sock, "hosts.add", {"mac": mac, "profile": "default", "hostname": name},
                             timeout_s=10)
            except ctl.CtlError:
                return                                   # the daemon is gone
            assert r.ok, r.error
            self.acked[mac] = name
            self.in_flight = None
            self.writes += 1
            self.seq += 1


def check_inventory(path: Path, acked: dict[str, str], in_flight: tuple[str, str] | None) -> None:
    inv = parse_inventory(path.read_text(), str(path))         # must parse after every kill
    got = {mac: h.hostname for mac, h in inv.hosts.items()}
    for mac, name in acked.items():
        ok = got.get(mac) == name or (in_flight is not None and in_flight == (mac, got.get(mac)))
        assert ok, f"acknowledged {mac}={name} lost: file has {got.get(mac)}"
    for mac, name in got.items():                                 # nothing never sent
        assert mac in acked or (in_flight and in_flight[0] == mac), (mac, name)
    if in_flight is not None and got.get(in_flight[0]) == in_flight[1]:
        acked[in_flight[0]] = in_flight[1]     # landed before the kill: durable from now on


def test_kill_9_during_inventory_writes(tmp_path):
    d = SidusDaemon(tmp_path)
    inv_path = tmp_path / "inventory.yaml"
    rng = random.Random(8)
    acked: dict[str, str] = {}
    total, rounds, seq, mid_write_kills = 0, 0, 0, 0
    try:
        while total < TARGET_WRITES and rounds < MAX_ROUNDS:
            d.log_path = tmp_path / f"sidusd-{rounds}.log"     # start() waits for this run's ready
            d.start(timeout_s=60)                               # every restart must succeed
            assert not tracebacks(d.events())
            w = Writer(str(d.socket_path), seq, acked)
            w.start()
            time.sleep(rng.uniform(0.05, 1.0))
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
            d._log.close()
            w.join(30)
            assert not w.is_alive()
            check_inventory(inv_path, acked, w.in_flight)
            mid_write_kills += w.in_flight is not None
            total, rounds, seq = total + w.writes, rounds + 1, w.seq + 1
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".sidus-tmp")]
        d.log_path = tmp_path / "sidusd-final.log"
        d.start(timeout_s=60)
        listed = {h["mac"]: h["hostname"] for h in d.ctl_json("hosts", "list")}
        assert listed == acked
        print(f"\ncrash safety: {total} acknowledged writes, {rounds} kill -9, {mid_write_kills} with a "
              f"write in flight, 0 lost, {len(leftovers)} temp files left by killed writes")
        assert total >= TARGET_WRITES, f"only {total} writes in {rounds} rounds"
        assert not tracebacks(d.events())
    finally:
        d.stop()
        if getattr(d, "_log", None):
            d._log.close()


@pytest.fixture
def tiny_fs(tmp_path):
    require_root()
    mnt = tmp_path / "state-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "sidus-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_serving_and_refuses_writes(tmp_path, tiny_fs):
    require_tool("mount")
    d = SidusDaemon(tmp_path)
    d.config["state_dir"] = str(tiny_fs)
    d.config["inventory_file"] = str(tiny_fs / "inventory.yaml")
    d.write_config(d.config)
    (tiny_fs / "inventory.yaml").write_text((tmp_path / "inventory.yaml").read_text())
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(os.urandom(100_000))
    with d:
        d.ctl("hosts", "add", "52:54:00:00:00:01", "--profile", "default", "--hostname", "before")
        before = (tiny_fs / "inventory.yaml").read_bytes()
        filler = tiny_fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)   # fill the file system
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        r = d.ctl("hosts", "add", "52:54:00:00:00:02", "--profile", "default", "--hostname", "after",
                  check=False)
        print(f"\ndisk full: sidusctl rc={r.returncode} stderr={r.stderr.strip()!r}")
        assert r.returncode == ctl.EXIT_ERROR
        assert "no space" in r.stderr.lower(), r.stderr
        assert (tiny_fs / "inventory.yaml").read_bytes() == before            # never truncated
        assert not [p for p in tiny_fs.iterdir() if p.name.endswith(".sidus-tmp")]
        assert len(d.tftp_get("images/demo/vmlinuz")) == 100_000               # keeps serving
        assert d.ctl_json("status")["counters"]
        filler.unlink()
        d.ctl("hosts", "add", "52:54:00:00:00:02", "--profile", "default", "--hostname", "after")
        hosts = {h["mac"]: h["hostname"] for h in d.ctl_json("hosts", "list")}
        assert hosts == {"52:54:00:00:00:01": "before", "52:54:00:00:00:02": "after"}
        assert d.proc.poll() is None
    assert not tracebacks(d.events())
