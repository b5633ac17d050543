"""`sidusctl hosts import` against the real daemon (tests/integration/daemon_fixture.py): the
documentation's dhcpd.conf, /etc/ethers, a CSV and a pxelinux.cfg/ directory
(tests/golden/migration/) become inventory hosts in one write, all or nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from daemon_fixture import SidusDaemon

from sidusd.boot.inventory import parse_inventory

G = Path(__file__).resolve().parent.parent / "golden" / "migration"
OLD = "52:54:00:12:00:02"          # node02 of the golden dhcpd.conf, already in the inventory


@pytest.fixture
def daemon(tmp_path):
    d = SidusDaemon(tmp_path, hosts=[{"mac": OLD, "hostname": "oldname", "profile": "default"}])
    inv = yaml.safe_load((tmp_path / "inventory.yaml").read_text())
    inv["profiles"]["persistent"] = {"image": "demo", "overlay": "tmpfs", "append": "sidus.p=1"}
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inv))
    with d:
        yield d


def inventory(d: SidusDaemon):
    return parse_inventory((d.tmp / "inventory.yaml").read_text())


def writes(d: SidusDaemon) -> int:
    return sum(1 for e in d.events() if e.get("event") == "inventory.written")


def test_import_is_all_or_nothing_then_one_write(daemon, tmp_path):
    files = [str(G / "dhcpd.conf"), str(G / "ethers"), str(G / "hosts.csv"), str(G / "pxelinux.cfg")]
    before = (tmp_path / "inventory.yaml").read_bytes()
    # node02 is in the inventory already: refused with the file and line, nothing written
    r = daemon.ctl("hosts", "import", *files, "--profile", "default", check=False)
    assert r.returncode == 2, r
    assert f"dhcpd.conf:21: MAC {OLD} is already in the inventory (host oldname, profile default)" in r.stderr
    assert "nothing imported" in r.stderr
    assert (tmp_path / "inventory.yaml").read_bytes() == before
    # a hosts file without profiles needs --profile: every such host is named
    r = daemon.ctl("hosts", "import", str(G / "ethers"), check=False)
    assert r.returncode == 2 and r.stderr.count("no profile") == 3, r.stderr

    r = daemon.ctl("hosts", "import", *files, "--profile", "default", "--iscsi-profile", "persistent",
                   "--replace")
    assert "imported 12 host(s): 11 added, 1 replaced" in r.stdout, r.stdout
    assert "2 pxelinux APPEND line(s) lost the arguments" in r.stdout
    inv = inventory(daemon)
    assert len(inv.hosts) == 12
    assert writes(daemon) == 1                                 # one atomic inventory change
    assert inv.hosts[OLD].hostname == "node02" and str(inv.hosts[OLD].ip) == "10.13.20.202"
    assert inv.hosts["52:54:00:12:00:03"].hostname == "gpu03"
    assert inv.hosts["52:54:00:12:00:22"].hostname == "node22"
    assert inv.hosts["52:54:00:12:00:32"].profile == "persistent"          # from the CSV column
    assert inv.hosts["52:54:00:12:00:32"].append == "console=ttyS0 quiet"
    n41, n42 = inv.hosts["52:54:00:12:00:41"], inv.hosts["52:54:00:12:00:42"]
    assert n41.append == "console=tty1 nouveau.modeset=0 console=ttyS0,115200" and n41.profile == "default"
    assert n42.profile == "persistent" and n42.append == "console=tty1"      # aufs=iscsi
    # sidusd serves what was imported: node41's per-MAC file carries its extra arguments once
    cfg = daemon.tftp_get("pxelinux.cfg/01-52-54-00-12-00-41").decode()
    assert "nouveau.modeset=0" in cfg and "initrd=initrd.img-Sidus" not in cfg, cfg


def test_daemon_refusal_names_the_source_and_changes_nothing(daemon, tmp_path):
    csv = tmp_path / "clash.csv"
    csv.write_text("mac,hostname,profile\n52:54:00:77:00:01,fresh,default\n52:54:00:77:00:02,OLDNAME,default\n")
    before = (tmp_path / "inventory.yaml").read_bytes()
    r = daemon.ctl("hosts", "import", str(csv), check=False)
    assert r.returncode == 1, r
    assert "duplicate host name 'OLDNAME'" in r.stderr and f"(imported from {csv}:3)" in r.stderr, r.stderr
    assert (tmp_path / "inventory.yaml").read_bytes() == before and writes(daemon) == 0
    bad = tmp_path / "pxe"
    shutil.copytree(G / "pxelinux.cfg", bad)
    (bad / "01-52-54-00-12-00-43").write_text("DEFAULT a\nLABEL a\nAPPEND root=/dev/nfs sidus.x=$(reboot)\n")
    r = daemon.ctl("hosts", "import", str(bad), "--profile", "default", check=False)
    assert r.returncode == 2 and f"{bad}/01-52-54-00-12-00-43:3: contains '$'" in r.stderr, r.stderr
    assert writes(daemon) == 0
    r = daemon.ctl("hosts", "import", str(G / "dhcpd.conf"), "--profile", "default", "--dry-run", "--replace")
    assert "dry run: 4 host(s) would be imported" in r.stdout and writes(daemon) == 0
