"""A real arm64 image built on this amd64 host: ``sidus-image build --arch arm64`` (the command
itself, in a subprocess) through qemu-user-static's binfmt_misc handler, and ``sidus-image import
--arch arm64`` of the tree it made (issue 18).

The recipe is the shortest real arm64 build that proves the path: bookworm minbase with
``initramfs-tools`` and ``busybox`` (what the initramfs with sidus's overlay hook needs) and
``linux-image-arm64``.  debootstrap's result is shared with the rest of the suite as the amd64 one
is (tests/debian_tree.py: made once by the very same command line, cached in
lab-state/image-cache/trees): a ``debootstrap`` first in the command's PATH answers from that
cache, making it with the real debootstrap (``--arch=arm64``, second stage under emulation) when it
is not there.  Every later stage runs for real in the arm64 chroot under emulation: apt-get
update + full-upgrade, the kernel's install, usermod, update-initramfs with sidus's hook.

One shortcut, for time only: the test's debootstrap also leaves
``etc/initramfs-tools/conf.d/zz-sidus-test.conf`` with ``MODULES=list`` in the tree, so each
``mkinitramfs`` under emulation packs the listed modules (sidus's ``overlay``) instead of
Debian's ``MODULES=most`` (some 1500 arm64 modules, one emulated process each: about 10 minutes
here per initrd).  Measured figures, the full build's too: docs/images.md "arm64 images".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_root, require_tool

from sidusd.image import bootarch
from sidusd.image.generations import ImageStore
from sidusd.storage.runner import Runner

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
# its own download cache: it runs beside the serial suite, whose builds fill image-cache/debootstrap
# (two debootstraps writing one cache could meet on the same arch:all .deb)
DEBS = REPO / "lab-state" / "image-cache" / "debootstrap-arm64"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
NAME = "arm64-min"

# about 11 min here at load 13-28 (debootstrap cached), 18 min from nothing: scripts/test runs it
# beside the serial suite, not in it (pyproject.toml markers)
pytestmark = pytest.mark.background
RECIPE = """# the shortest real arm64 image: minbase + what sidus's initramfs needs
name: arm64-min
suite: bookworm
variant: minbase
include: [initramfs-tools, busybox]
packages: [linux-image-arm64]
"""
WRAPPER = """#!{python}
# debootstrap for the test: the cached tree of this very command line (tests/debian_tree.py)
import os, subprocess, sys
sys.path.insert(0, {tests!r})
os.environ["PATH"] = {path!r}               # the real debootstrap, not this wrapper
from debian_tree import cached_tree
argv = ["debootstrap", *sys.argv[1:]]
tree = cached_tree(argv, log=lambda msg: print(msg, file=sys.stderr, flush=True))
os.makedirs(argv[-2], exist_ok=True)
subprocess.run(["cp", "-a", "--reflink=auto", f"{{tree}}/.", argv[-2]], check=True)
conf = os.path.join(argv[-2], "etc/initramfs-tools/conf.d")
os.makedirs(conf, exist_ok=True)
with open(os.path.join(conf, "zz-sidus-test.conf"), "w") as f:
    f.write("# tests/integration/test_arm64_image.py: the listed modules only (time under emulation)\\nMODULES=list\\n")
"""


def image_cli(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(work / "images"),
                           "--tftp-root", str(work / "tftp"), "--images-file", str(work / "images.yaml"),
                           "--cache-dir", str(DEBS), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=3600, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``sidus-image build --arch arm64`` of :data:`RECIPE`, once for the module: (workdir, output)."""
    require_root()
    for tool in ("debootstrap", "qemu-aarch64-static", "chroot", "cpio"):
        require_tool(tool)
    if not (BINFMT / "register").exists():
        # what systemd's proc-sys-fs-binfmt_misc.automount does on a booted host (CI: a container)
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True, timeout=30)
    work = tmp_path_factory.mktemp("arm64img")
    (work / "tftp").mkdir()
    bindir = work / "bin"
    bindir.mkdir()
    wrapper = bindir / "debootstrap"
    wrapper.write_text(WRAPPER.format(python=sys.executable, tests=str(TESTS), path=os.environ["PATH"]))
    wrapper.chmod(0o755)
    (work / "arm64.yaml").write_text(RECIPE)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    t0 = time.monotonic()
    r = image_cli(work, "build", str(work / "arm64.yaml"), "--arch", "arm64", env=env)
    took = time.monotonic() - t0
    print(f"arm64 build: {took:.0f} s (load {os.getloadavg()[0]:.1f})\n{r.stderr[-3000:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return work, r.stderr


def test_sidus_image_builds_an_arm64_generation_on_amd64(built):
    """Before: the build was refused while the qemu-aarch64 handler was not registered (whatever
    was installed), and nothing checked that the published kernel was arm64."""
    work, out = built
    assert "[0/" in out and "debootstrap: bookworm minbase arm64" in out, out
    assert "initramfs: overlay hook" in out and f"{NAME}: generation 1 complete" in out, out
    status = (BINFMT / "qemu-aarch64").read_text()
    assert status.startswith("enabled") and "F" in status.split("flags:")[1].split("\n")[0], status
    store = ImageStore(work / "images", Runner())
    meta = store.meta(NAME, 1)
    assert (meta["architecture"], meta["kernel_arch"]) == ("arm64", "arm64"), meta
    assert set(meta["initrd_elf"]) == {"arm64"} and meta["kver"].endswith("-arm64"), meta
    # what sidusd serves: the published copies, arm64 (kernel Image header, initrd programs + hook)
    pub = work / "tftp" / "images" / NAME / "gen-0001"
    assert bootarch.kernel_file_arch(pub / "vmlinuz") == "arm64"
    archs, names = bootarch.initrd_contents(pub / "initrd.img")
    assert set(archs) == {"arm64"} and archs["arm64"] >= 3 and bootarch.OVERLAY in names, (archs, len(names))
    assert f"{NAME}:" in (work / "images.yaml").read_text()
    # the root itself: arm64 programs, the chroot stages' work done under emulation
    root = store.path(NAME, 1).resolve()
    assert bootarch.tree_arch(root) == "arm64"
    assert not (root / "etc" / "hostname").exists() and (root / "etc" / "machine-id").read_bytes() == b""
    conf = root / "etc" / "initramfs-tools"
    assert (conf / "hooks" / "sidus-overlay").is_file() and (conf / "scripts" / "init-bottom" / "sidus-up").is_file()
    assert "overlay" in (conf / "modules").read_text().split()


def test_import_arch_refuses_the_arm64_tree_as_amd64(built):
    """The tree the build made, imported as amd64: refused before anything is copied (the accepted
    case, ``import --arch arm64`` of the lab's arm64 tree, is tests/e2e/test_arm64.py).
    Before: ``import --arch`` was an unknown option (argparse, exit 2, "unrecognized arguments")."""
    work, _ = built
    src = ImageStore(work / "images", Runner()).path(NAME, 1).resolve()
    r = image_cli(work, "import", "arm64-imp", str(src), "--arch", "amd64")
    assert r.returncode == 2, r.stderr
    assert f"--arch: {src} is an arm64 tree (its bin/sh is an arm64 program), not amd64: nothing imported" \
        in r.stderr, r.stderr
    assert not (work / "images" / "arm64-imp").exists()
