"""The real daemon on loopback: --check, rendering from the inventory, live
inventory edits, SIGHUP / sidusctl reload (bad config refused, old one keeps
serving, transfers in flight not cut), graceful SIGTERM."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from daemon_fixture import REPO, SidusDaemon, base_config

MAC = "52:54:00:aa:00:01"
HOST = {"mac": MAC, "hostname": "node01", "profile": "default", "append": "sidus.test=one"}


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd", "--check", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def test_check_accepts_good_config_and_refuses_bad_with_key_path(tmp_path):
    d = SidusDaemon(tmp_path, hosts=[HOST])
    ok = check(d.config_path)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "1 host" in ok.stdout
    bad = dict(d.config)
    bad["tftp"] = {**bad["tftp"], "blksize_max": 1}
    d.write_config(bad)
    r = check(d.config_path)
    assert r.returncode == 2
    assert "tftp.blksize_max" in r.stderr and "unknown key" in r.stderr
    missing = check(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_example_config_is_valid():
    # the documented example must at least parse and be strict-valid on its own
    from sidusd import config, data
    cfg = config.read(data.EXAMPLE_CONFIG)
    assert cfg.dhcp.mode in ("proxy", "full", "off")


def test_rendered_config_follows_inventory_without_restart(tmp_path):
    with SidusDaemon(tmp_path, hosts=[HOST]) as d:
        name = "pxelinux.cfg/01-" + MAC.replace(":", "-")
        text = d.tftp_get(name).decode()
        assert "sidus.test=one" in text and "console=ttyS0" in text
        assert "nfsroot=10.13.20.1:" in text and "sidus.overlay=tmpfs" in text
        d.ctl("hosts", "add", MAC, "--profile", "default", "--hostname", "node01",
              "--append", "sidus.test=two")
        text2 = d.tftp_get(name).decode()
        assert "sidus.test=two" in text2 and "sidus.test=one" not in text2
        # the inventory file on disk was rewritten too
        inv = yaml.safe_load((tmp_path / "inventory.yaml").read_text())
        assert any(h["append"] == "sidus.test=two" for h in inv["hosts"])
        # a bad MAC is refused with a clear message and changes nothing
        r = d.ctl("hosts", "add", "52:54:zz:00:00:01", "--profile", "default", check=False)
        assert r.returncode != 0 and "52:54:zz:00:00:01" in (r.stderr + r.stdout)


class PacedDownload(threading.Thread):
    """A lockstep TFTP read (RFC 1350: blksize 512, no options) that acknowledges one block at most
    every ``pace_s`` until :meth:`release`, and holds the ACK of the last block until then:
    the transfer is in flight for as long as the test needs."""

    def __init__(self, port: int, name: str, pace_s: float = 0.02):
        super().__init__(daemon=True)
        self.port, self.name, self.pace_s = port, name, pace_s
        self.data = bytearray()
        self.blocks = 0                      # blocks received and acknowledged
        self.peers: set[tuple[str, int]] = set()
        self.error: BaseException | None = None
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def run(self) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(10)
                s.sendto(b"\x00\x01" + self.name.encode() + b"\x00octet\x00", ("127.0.0.1", self.port))
                while True:
                    pkt, peer = s.recvfrom(4 + 512)
                    op, n = struct.unpack("!HH", pkt[:4])
                    if op == 5:
                        raise AssertionError(f"TFTP error {n}: {pkt[4:-1]!r}")
                    if op != 3 or n != (self.blocks + 1) & 0xFFFF:
                        continue                 # a retransmission of a block acknowledged already
                    self.peers.add(peer)
                    self.data += pkt[4:]
                    last = len(pkt) - 4 < 512
                    self._released.wait(None if last else self.pace_s)
                    s.sendto(struct.pack("!HH", 4, n), peer)
                    self.blocks += 1
                    if last:
                        return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_bad_reload_keeps_old_config_and_transfer_in_flight(tmp_path):
    with SidusDaemon(tmp_path, hosts=[HOST]) as d:
        big = Path(d.config["tftp"]["root"]) / "big.bin"
        big.write_bytes(os.urandom(1024 * 1024 + 100))         # 2049 blocks: 40 s at the paced rate
        want = hashlib.sha256(big.read_bytes()).hexdigest()
        dl = PacedDownload(d.tftp_port, "big.bin")
        seen: list[int] = []                 # blocks acknowledged at each check

        def in_flight(step: str) -> None:
            """After each reload: the transfer is listed active, its last block not acknowledged."""
            tftp_active = d.ctl_json("status").get("transfers_by_service", {}).get("tftp", 0)
            assert tftp_active == 1 and dl.is_alive() and dl.error is None, (step, tftp_active, dl.error)
            seen.append(dl.blocks)

        dl.start()
        try:
            deadline = time.monotonic() + 30
            while dl.blocks < 10:            # under way
                assert dl.is_alive() and time.monotonic() < deadline, dl.error
                time.sleep(0.01)
            # 1. a broken config via SIGHUP: refused, old one serves
            good_text = d.config_path.read_text()
            d.write_config("tftp: [this is: not a mapping\n")
            d.signal(signal.SIGHUP)
            while not any(e.get("event") == "reload.refused" for e in d.events()):
                assert time.monotonic() < deadline, d.log_tail()
                time.sleep(0.02)
            in_flight("SIGHUP, refused")
            # 2. a semantically bad one via sidusctl reload
            bad = yaml.safe_load(good_text)
            bad["images"]["demo"]["kernel"] = "../../etc/passwd"
            d.write_config(bad)
            r = d.ctl("reload", check=False)
            assert r.returncode != 0
            assert "images.demo.kernel" in (r.stdout + r.stderr)
            in_flight("sidusctl reload, refused")
            # 3. a good one (new kernel args) is applied, without cutting the transfer
            good = yaml.safe_load(good_text)
            good["images"]["demo"]["append"] = "console=ttyS0 sidus.reloaded=1"
            d.write_config(good)
            d.ctl("reload")
            in_flight("sidusctl reload, applied")
        finally:
            dl.release()
            dl.join(60)
        assert not dl.is_alive() and dl.error is None, dl.error
        assert seen[-1] > seen[0]            # it kept moving while the reloads happened
        assert len(dl.peers) == 1            # one transfer, never restarted
        assert hashlib.sha256(dl.data).hexdigest() == want
        name = "pxelinux.cfg/01-" + MAC.replace(":", "-")
        assert "sidus.reloaded=1" in d.tftp_get(name).decode()
        status = d.ctl_json("status")
        counters = status["counters"]
        assert counters.get("reload.refused", 0) >= 2 and counters.get("reload.ok", 0) >= 1
        refused = [e for e in d.events() if e.get("event") == "reload.refused"]
        assert len(refused) >= 2
        assert d.stop() == 0
        assert any(e.get("event") == "daemon.stopped" for e in d.events())


def test_startup_error_port_in_use(tmp_path):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        cfg = base_config(tmp_path, port)
        d = SidusDaemon(tmp_path, hosts=[HOST], config=cfg)
        with pytest.raises(RuntimeError) as e:
            d.start(timeout_s=10)
        assert d.proc.returncode == 1
        assert "startup.failed" in str(e.value)
