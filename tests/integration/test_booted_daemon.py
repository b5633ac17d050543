"""The real sidusd records which image root each machine was served (booted.json), keeps the
records across a restart, replaces a record when the machine is served another generation,
and survives a corrupt record file (kept aside as .bad).  Boot configs fetched with a real
TFTP client (tftpy) on loopback."""

from __future__ import annotations

import json
import time

import yaml

from sidusd.image.booted_store import read_table
from tests.integration.daemon_fixture import SidusDaemon, base_config, free_udp_port

MAC = "52:54:00:00:07:01"
NAME = "pxelinux.cfg/01-" + MAC.replace(":", "-")


def daemon(tmp_path, hosts) -> SidusDaemon:
    port = free_udp_port()
    d = SidusDaemon(tmp_path, hosts=hosts, config=config(tmp_path, port))
    d.tftp_port = port
    return d


def config(tmp_path, port):
    cfg = base_config(tmp_path, port)
    (tmp_path / "images" / "demo.gen-2").mkdir(parents=True, exist_ok=True)
    cfg["images"]["demo.gen-2"] = {"root": str(tmp_path / "images" / "demo.gen-2"),
                                   "kernel": "images/demo/vmlinuz", "initrd": "images/demo/initrd.img"}
    cfg["booted"] = {"file": str(tmp_path / "state" / "booted.json"), "ttl_s": 0, "max_hosts": 100}
    return cfg


def wait_record(path, mac, root, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rec = read_table(path).get(mac)
        except Exception:                       # noqa: BLE001 (mid-rename is impossible; a missing dir is not)
            rec = None
        if rec is not None and rec.root == root:
            return rec
        if time.monotonic() > deadline:
            raise AssertionError(f"no record {mac} -> {root} in {path}: "
                                 f"{path.read_text() if path.exists() else 'no file'}")
        time.sleep(0.1)


def test_daemon_records_the_served_root_across_restart_and_reboot(tmp_path):
    booted = tmp_path / "state" / "booted.json"
    host = {"mac": MAC, "hostname": "node71", "profile": "default"}
    d = daemon(tmp_path, [host])
    with d:
        assert b"images/demo" in d.tftp_get(NAME)
        rec = wait_record(booted, MAC, str(tmp_path / "images" / "demo"))
        assert (rec.image, rec.hostname) == ("demo", "node71")
        assert [e for e in d.events() if e.get("event") == "booted.recorded"]
    # SIGTERM'd and started again: the record is still there
    d2 = daemon(tmp_path, [host])
    with d2:
        assert read_table(booted).get(MAC).root == str(tmp_path / "images" / "demo")
        # the machine is pinned to another generation and reboots: its record follows
        d2.ctl("hosts", "add", MAC, "--profile", "default", "--hostname", "node71", "--image", "demo.gen-2")
        assert b"sidus.hostname=node71" in d2.tftp_get(NAME)
        wait_record(booted, MAC, str(tmp_path / "images" / "demo.gen-2"))
        assert len(read_table(booted)) == 1
        assert d2.stop() == 0                   # SIGTERM: graceful, pending records written
    assert json.loads(booted.read_text())["version"] == 1


def test_daemon_starts_with_a_corrupt_record_file_and_keeps_it_aside(tmp_path):
    booted = tmp_path / "state" / "booted.json"
    booted.parent.mkdir(parents=True)
    booted.write_bytes(b"\x00garbage{")
    d = daemon(tmp_path, [{"mac": MAC, "profile": "default"}])
    with d:
        assert b"images/demo" in d.tftp_get(NAME)
        wait_record(booted, MAC, str(tmp_path / "images" / "demo"))
        assert any(e.get("event") == "booted.load_failed" for e in d.events())
    assert (tmp_path / "state" / "booted.json.bad").read_bytes() == b"\x00garbage{"
    assert yaml.safe_load(booted.read_text())["records"][0]["mac"] == MAC
