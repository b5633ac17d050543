"""`sidus-image import`: a SIDUS-style tree (tests/sidus_tree.py: a rootaufs init-bottom script,
aufs in modules, no /etc/hostname) becomes generation 1, with the REAL update-initramfs run
in the chroot; a failure puts an in-place tree back and leaves no generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, require_root, require_tool
from sidus_tree import make_tree

ROOTAUFS = "etc/initramfs-tools/scripts/init-bottom/rootaufs"


def sidus_image(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(tmp / "images"),
                           "--tftp-root", str(tmp / "tftp"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def tiny_tree(root: Path, update_initramfs: str) -> Path:
    """A busybox tree whose update-initramfs is ``update_initramfs`` (a shell script body)."""
    from sidusd.lab.image import build_root
    build_root(root)
    (root / "usr/sbin/update-initramfs").unlink(missing_ok=True)
    (root / "usr/sbin/update-initramfs").write_text("#!/bin/sh\n" + update_initramfs)
    (root / "usr/sbin/update-initramfs").chmod(0o755)
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-9-amd64").write_bytes(b"old initrd")
    (root / "lib/modules/6.1.0-9-amd64").mkdir(parents=True)
    (root / ROOTAUFS).parent.mkdir(parents=True)
    (root / ROOTAUFS).write_text("#!/bin/sh\necho rootaufs\n")
    (root / ROOTAUFS).chmod(0o755)
    return root


def test_import_in_place_disables_rootaufs_and_regenerates_the_initramfs(tmp_path):
    require_root()
    for tool in ("lsinitramfs", "update-initramfs", "busybox"):
        require_tool(tool)
    from sidusd.lab.image import newest_kernel
    kver = newest_kernel()
    tree = make_tree(tmp_path / "srv" / "nfsroot" / "sidus", kver)
    r = sidus_image(tmp_path, "import", "sidus", str(tree), "--in-place")
    assert r.returncode == 0, r.stderr[-3000:]
    # no control socket given: switched, and says it could not ask sidusd (image/publish.py)
    assert "sidus: generation 1 complete" in r.stderr and "switched; not confirmed served" in r.stderr, \
        r.stderr[-2000:]
    gen = tmp_path / "images" / "sidus" / "gen-0001"
    assert not tree.exists() and gen.is_dir()                 # moved, not copied
    assert os.readlink(tmp_path / "images" / "sidus" / "current") == "gen-0001"
    # rootaufs is out of the initramfs scripts (kept for reference), aufs out of the modules
    assert not (gen / ROOTAUFS).exists()
    assert (gen / "etc/initramfs-tools/disabled-by-sidus/init-bottom/rootaufs").read_text().count("aufs") > 2
    modules = (gen / "etc/initramfs-tools/modules").read_text()
    assert "\naufs\n" not in modules and "# aufs" in modules and "\noverlay\n" in modules, modules
    conf = (gen / "etc/initramfs-tools/initramfs.conf").read_text()
    assert "\nBOOT=nfs\n" in conf and "\nDEVICE=\n" in conf and "MODULES=netboot" in conf
    assert not (gen / "etc/hostname").exists()
    # the published initrd is the one update-initramfs made in the chroot: sidus's overlay, no rootaufs
    pub = tmp_path / "tftp" / "images" / "sidus" / "gen-0001"
    assert (pub / "vmlinuz").read_bytes() == Path(f"/boot/vmlinuz-{kver}").read_bytes()
    listing = subprocess.run(["lsinitramfs", str(pub / "initrd.img")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "scripts/init-bottom/sidus-overlay" in listing, listing[:50]
    assert any(p.endswith("/overlayfs/overlay.ko") for p in listing)
    assert not [p for p in listing if "rootaufs" in p]
    assert (gen / f"boot/initrd.img-{kver}").read_bytes() == (pub / "initrd.img").read_bytes()
    images = yaml.safe_load((tmp_path / "images" / "images.yaml").read_text())["images"]
    assert images["sidus"]["root"] == str(gen) and images["sidus"]["initrd"] == "images/sidus/gen-0001/initrd.img"
    meta = json.loads((tmp_path / "images/sidus/meta/gen-0001.json").read_text())
    assert meta["kind"] == "import" and meta["source"] == str(tree) and meta["in_place"] is True
    # generation 1 exists: a second import under that name is refused
    again = sidus_image(tmp_path, "import", "sidus", str(gen))
    assert again.returncode == 2 and "exists already" in again.stderr


@pytest.mark.parametrize("in_place", [True, False])
def test_failed_import_leaves_the_site_tree_and_no_generation(tmp_path, in_place):
    require_root()
    require_tool("busybox")
    tree = tiny_tree(tmp_path / "sidus", 'echo "update-initramfs: cannot make the initrd" >&2\nexit 1\n')
    r = sidus_image(tmp_path, "import", "sidus", str(tree), *(["--in-place"] if in_place else []))
    assert r.returncode == 1, r
    assert "stage initramfs failed" in r.stderr and "cannot make the initrd" in r.stderr, r.stderr
    assert tree.is_dir() and (tree / "boot/initrd.img-6.1.0-9-amd64").read_bytes() == b"old initrd"
    assert list((tmp_path / "images" / "sidus").glob("gen-*")) == []
    assert not (tmp_path / "tftp").exists()
    if not in_place:
        assert (tree / ROOTAUFS).exists()                     # the copy was changed, not the site's tree
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts


def test_trees_that_cannot_be_images_are_refused(tmp_path):
    require_root()
    require_tool("busybox")
    tree = tiny_tree(tmp_path / "t", "exit 0\n")
    (tree / "boot/vmlinuz-6.1.0-9-amd64").unlink()
    r = sidus_image(tmp_path, "import", "x", str(tree))
    assert r.returncode == 2 and "has no vmlinuz-*: install a kernel" in r.stderr, r.stderr
    (tree / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(b"k")
    (tree / "usr/sbin/update-initramfs").unlink()
    r = sidus_image(tmp_path, "import", "x", str(tree))
    assert r.returncode == 2 and "install initramfs-tools in the tree" in r.stderr, r.stderr
    r = sidus_image(tmp_path, "import", "x", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = sidus_image(tmp_path, "import", "x", "/")
    assert r.returncode == 2 and "own root" in r.stderr
    (tree / "usr/sbin/update-initramfs").write_text("#!/bin/sh\n")
    (tree / "proc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "t", str(tree / "proc")], check=True)
    try:
        r = sidus_image(tmp_path, "import", "x", str(tree), "--in-place")
        assert r.returncode == 2 and "unmount it first" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(tree / "proc")], check=True)
    assert not (tmp_path / "images" / "x").exists() or not list((tmp_path / "images" / "x").glob("gen-*"))


def test_sigterm_during_an_in_place_import_puts_the_tree_back(tmp_path):
    require_root()
    require_tool("busybox")
    import signal
    import time
    tree = tiny_tree(tmp_path / "sidus", "touch /update-started\nsleep 120\n")
    p = subprocess.Popen([sys.executable, "-m", "sidusd.image", "--images-dir", str(tmp_path / "images"),
                          "--tftp-root", str(tmp_path / "tftp"), "import", "sidus", str(tree), "--in-place"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "images" / "sidus" / "gen-0001.partial" / "update-started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert started.exists(), p.communicate(timeout=30)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert tree.is_dir() and (tree / "update-started").exists()          # the site's tree is back
    assert not (tmp_path / "images" / "sidus" / "gen-0001.partial").exists()
    assert list((tmp_path / "images" / "sidus").glob("gen-*")) == []
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
