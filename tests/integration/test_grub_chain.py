"""The Secure Boot chain's files over real TFTP (tftpy), in the order shim and Debian's signed GRUB
ask for them (docs/boot-chain.md): ``sidusctl tftp-root populate`` puts the real signed binaries
in place (shim-signed, grub-efi-amd64-signed), then the real sidusd serves

1. ``shimx64.efi`` (the DHCP boot file), 512-byte blocks as shim's netboot.c asks;
2. ``grubx64.efi`` from the same directory (shim's DEFAULT_LOADER): grubnetx64.efi.signed;
3. ``grub/x86_64-efi/grub.cfg`` (GRUB's memdisk config tests it first): not found;
4. ``grub/grub.cfg``: it sources ``grub.cfg-01-${net_default_mac}`` under its prefix;
5. that name, expanded as GRUB does: the host's own config, with its append.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tftpy
import yaml
from daemon_fixture import REPO, SidusDaemon, base_config, free_udp_port
from grub_script import tokenize

from sidusd.preflight import SOURCES

MAC = "52:54:00:18:00:01"
SHIM = SOURCES[("uefi_x64", "shimx64.efi")].path
GRUB = SOURCES[("uefi_x64", "grubx64.efi")].path


def sha_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def daemon(tmp_path):
    for path, pkg in ((SHIM, "shim-signed"), (GRUB, "grub-efi-amd64-signed")):
        if not Path(path).is_file():
            pytest.skip(f"missing {path}: apt-get install {pkg} (scripts/setup)")
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["boot"] = {"boot_files": {"uefi_x64": "shimx64.efi"}}
    cfg["security"] = {"privsep": False}
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"profiles": {}, "hosts": []}))
    env = {**os.environ, "SIDUS_CONFIG": str(tmp_path / "sidus.yaml")}
    r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "tftp-root", "populate"], capture_output=True,
                       text=True, cwd=REPO, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    d = SidusDaemon(tmp_path, hosts=[{"mac": MAC, "profile": "default", "hostname": "sb1",
                                      "append": "sidus.marker=grub-one"}], config=cfg)
    d.tftp_port = port
    with d:
        yield d


def test_files_in_grubs_order_and_the_per_mac_config(daemon):
    root = Path(daemon.config["tftp"]["root"])
    assert sha_file(root / "shimx64.efi") == sha_file(SHIM)
    assert sha_file(root / "grubx64.efi") == sha_file(GRUB)
    assert hashlib.sha256(daemon.tftp_get("shimx64.efi", blksize=512)).hexdigest() == sha_file(SHIM)
    assert hashlib.sha256(daemon.tftp_get("grubx64.efi", blksize=512)).hexdigest() == sha_file(GRUB)
    with pytest.raises(tftpy.TftpException):
        daemon.tftp_get("grub/x86_64-efi/grub.cfg")
    default = daemon.tftp_get("grub/grub.cfg").decode("ascii")
    env = {"prefix": "(tftp,127.0.0.1)/grub", "net_default_mac": MAC}
    # root and prefix: the server this request reached (GRUB may have started on another one)
    assert tokenize(default, env)[1:3] == [["set", "root=tftp,127.0.0.1"], ["set", "prefix=(tftp,127.0.0.1)/grub"]]
    source = tokenize(default, env)[3]
    assert source[0] == "source" and source[1].startswith("(tftp,127.0.0.1)/")
    per_mac = daemon.tftp_get(source[1].split(")/", 1)[1]).decode("ascii")
    cmds = tokenize(per_mac, env)
    assert [c[0] for c in cmds] == ["set", "set", "echo", "linux", "initrd", "boot"]
    linux = cmds[3]
    assert linux[1] == "/images/demo/vmlinuz" and cmds[4] == ["initrd", "/images/demo/initrd.img"]
    assert "sidus.marker=grub-one" in linux and "sidus.hostname=sb1" in linux
    assert "console=ttyS0" in linux and linux[-1] == "BOOTIF=01-52-54-00-18-00-01"
    # upstream GRUB's own search name (dashes) is the same document
    assert daemon.tftp_get("grub/grub.cfg-01-52-54-00-18-00-01").decode("ascii") == per_mac
    # an unknown MAC: not found, and grub.cfg goes on with the default profile's target
    with pytest.raises(tftpy.TftpException):
        daemon.tftp_get("grub/grub.cfg-01-52:54:00:18:00:99")
    assert "linux '/images/demo/vmlinuz'" in default
