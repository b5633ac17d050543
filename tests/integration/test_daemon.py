"""The real daemon on loopback: --check, rendering from the inventory, live
inventory edits, SIGHUP / sidusctl reload (bad config refused, old one keeps
serving, transfers in flight not cut), graceful SIGTERM."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import require_tool
from daemon_fixture import REPO, SidusDaemon, base_config, free_udp_port

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
    from sidusd import config
    cfg = config.read(REPO / "config" / "sidus.yaml")
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


def test_bad_reload_keeps_old_config_and_transfer_in_flight(tmp_path):
    curl = require_tool("curl")
    with SidusDaemon(tmp_path, hosts=[HOST]) as d:
        big = Path(d.config["tftp"]["root"]) / "big.bin"
        big.write_bytes(os.urandom(24 * 1024 * 1024))
        want = hashlib.sha256(big.read_bytes()).hexdigest()
        out = tmp_path / "out.bin"
        dl = subprocess.Popen([curl, "-s", "--tftp-blksize", "512", "-o", str(out),
                               f"tftp://127.0.0.1:{d.tftp_port}/big.bin"])
        time.sleep(0.5)
        # 1. a broken config via SIGHUP: refused, old one serves
        good_text = d.config_path.read_text()
        d.write_config("tftp: [this is: not a mapping\n")
        d.signal(signal.SIGHUP)
        # 2. a semantically bad one via sidusctl reload
        bad = yaml.safe_load(good_text)
        bad["images"]["demo"]["kernel"] = "../../etc/passwd"
        d.write_config(bad)
        r = d.ctl("reload", check=False)
        assert r.returncode != 0
        assert "images.demo.kernel" in (r.stdout + r.stderr)
        # 3. a good one (new kernel args) is applied, without cutting the transfer
        good = yaml.safe_load(good_text)
        good["images"]["demo"]["append"] = "console=ttyS0 sidus.reloaded=1"
        d.write_config(good)
        d.ctl("reload")
        assert dl.wait(120) == 0
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want
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
