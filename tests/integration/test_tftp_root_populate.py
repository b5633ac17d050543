"""`sidusctl tftp-root populate`: the boot files from their Debian packages into tftp.root, after
which `sidusd --check` finds what a boot needs (the real files of pxelinux, syslinux-common,
syslinux-efi and ipxe, installed by scripts/setup)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon_fixture import REPO

from sidusd.preflight import SOURCES


def need_sources(*names: str) -> None:
    for (_, name), src in SOURCES.items():
        if name in names and not Path(src.path).is_file():
            pytest.skip(f"missing {src.path}: apt-get install {src.package} (scripts/setup)")


def sidusctl(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd.ctl", "tftp-root", "populate", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "SIDUS_CONFIG": str(config)})


def write_config(tmp: Path, boot: dict | None = None) -> Path:
    (tmp / "tftp").mkdir(exist_ok=True)
    (tmp / "inventory.yaml").write_text(yaml.safe_dump({"profiles": {}, "hosts": []}))
    cfg = {"state_dir": str(tmp), "inventory_file": str(tmp / "inventory.yaml"),
           "dhcp": {"mode": "off", "unknown_hosts": "ignore"},
           "tftp": {"root": str(tmp / "tftp")}, "security": {"privsep": False}, "boot": boot or {},
           "http": {"enabled": bool(boot)}}
    path = tmp / "sidus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd", "--check", "--config", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_populate_then_check_passes(tmp_path):
    need_sources("pxelinux.0", "ldlinux.c32", "syslinux.efi", "ldlinux.e64")
    config = write_config(tmp_path)
    before = check(config)
    assert before.returncode == 2 and "tftp-root populate" in before.stderr, before
    r = sidusctl(config)
    assert r.returncode == 0, r
    for name, src in [("pxelinux.0", "/usr/lib/PXELINUX/pxelinux.0"),
                      ("ldlinux.c32", "/usr/lib/syslinux/modules/bios/ldlinux.c32"),
                      ("syslinux.efi", "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
                      ("ldlinux.e64", "/usr/lib/syslinux/modules/efi64/ldlinux.e64")]:
        dest = tmp_path / "tftp" / name
        assert dest.read_bytes() == Path(src).read_bytes(), name
        assert oct(dest.stat().st_mode & 0o777) == "0o644"
        assert f"copied   {dest}  (from {src}" in r.stdout
    assert check(config).returncode == 0
    again = sidusctl(config)
    assert again.returncode == 0 and again.stdout.count("kept ") == 4 and "copied" not in again.stdout


def test_ipxe_chain_gets_the_ipxe_binaries_into_a_given_directory(tmp_path):
    need_sources("undionly.kpxe", "snponly.efi")
    config = write_config(tmp_path, {"ipxe_chain": True})
    other = tmp_path / "elsewhere"
    r = sidusctl(config, str(other))
    assert r.returncode == 0, r
    assert sorted(p.name for p in other.iterdir()) == ["snponly.efi", "undionly.kpxe"]
    assert (other / "undionly.kpxe").read_bytes() == Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()


def test_a_boot_file_of_unknown_origin_is_said(tmp_path):
    need_sources("syslinux.efi", "ldlinux.e64")
    config = write_config(tmp_path, {"boot_files": {"bios": "mine/custom.0"}})
    r = sidusctl(config)
    assert r.returncode == 1, r
    assert f"MISSING  {tmp_path}/tftp/mine/custom.0  (boot.boot_files.bios: no Debian source known" in r.stdout


def test_no_config_and_no_directory(tmp_path):
    r = sidusctl(tmp_path / "nope.yaml")
    assert r.returncode == 2 and "give the TFTP root" in r.stderr
