"""A generation whose kernel and initrd did not change costs no new TFTP bytes (issue 16).

A busybox root with a (made-up, 1 MiB each) kernel and initrd is generation 1.  The real
``sidus-image run`` (a new process, a real chroot) makes the next generations:

* ``true``: nothing under /boot changes -> gen 2's ``vmlinuz`` and ``initrd.img`` are the very
  inodes of gen 1's published files (hard links: ``st_nlink`` 2), no new bytes;
* an append to the initrd (``>>``: a new inode in the overlay) -> gen 3 gets a new initrd
  file with the new bytes, and its kernel is still gen 1's inode;
* the kernel rewritten with the same bytes (``cp`` + ``mv``: a new inode in the root, same
  content) -> still a link (compared by bytes);

and every published file of an earlier generation keeps its bytes, mode, size and mtime
(immutability), ``gc`` of the old generations leaves the newer one's linked files whole, and
``list`` counts a linked kernel as shared, not own.  Before, every generation got copies
(``st_nlink`` 1, new inodes).  The same real run shows what the command imports: neither
structlog, asyncio nor msgspec (tests/unit/test_image_imports.py has the rest).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidusd.image import publish
from sidusd.image.build import Administrator
from sidusd.image.chroot import mounts_under
from tests.conftest import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]
NAME = "img"
KVER = "6.1.0-1-amd64"


@pytest.fixture
def adm(tmp_path):
    require_root()
    bb = require_tool("busybox")
    require_tool("chroot")
    require_tool("unshare")
    a = Administrator(tmp_path / "images", tmp_path / "tftp", out=io.StringIO())
    n, part = a.store.begin(NAME, None)
    for d in ("bin", "etc", "usr", "root", "boot", "tmp"):
        (part / d).mkdir()
    shutil.copy2(bb, part / "bin/busybox")
    for app in ("sh", "true", "cp", "mv", "cat"):
        os.symlink("busybox", part / "bin" / app)
    (part / f"boot/vmlinuz-{KVER}").write_bytes(os.urandom(1 << 20))
    (part / f"boot/initrd.img-{KVER}").write_bytes(os.urandom(1 << 20))
    a.store.commit(NAME, n, {"kind": "build", "kernel": f"vmlinuz-{KVER}"})
    publish.publish_generation(a.store.path(NAME, n), a.tftp_root, NAME, n)
    a.serve(NAME, n)
    yield a
    assert mounts_under(tmp_path) == []


def cli(adm: Administrator, *args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "sidusd.image",
                          "--images-dir", str(adm.store.dir), "--tftp-root", str(adm.tftp_root), *args],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def boot(adm: Administrator, n: int, f: str) -> Path:
    return publish.tftp_dir(adm.tftp_root, NAME) / f"gen-{n:04d}" / f


def snapshot(adm: Administrator, n: int) -> dict[str, tuple]:
    out = {}
    for f in ("vmlinuz", "initrd.img"):
        p = boot(adm, n, f)
        st = os.stat(p)
        out[f] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def test_an_unchanged_kernel_is_a_link_a_changed_one_a_new_file(adm):
    gen1 = snapshot(adm, 1)
    res = cli(adm, "run", NAME, "--", "true", importtime=True)
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "sidusd.image.build" in imported                       # -X importtime did list the imports
    assert not imported & {"structlog", "asyncio", "msgspec", "sidusd.observability"}, \
        sorted(imported & {"structlog", "asyncio", "msgspec", "sidusd.observability"})
    assert adm.store.current(NAME) == 2
    for f in ("vmlinuz", "initrd.img"):
        s1, s2 = os.stat(boot(adm, 1, f)), os.stat(boot(adm, 2, f))
        assert os.path.samestat(s1, s2), f                         # the same inode: no new bytes
        assert s2.st_nlink == 2
    assert snapshot(adm, 1) == gen1

    # the initrd changes (an append in the chroot), the kernel does not
    cli(adm, "run", NAME, "--", "sh", "-c", f"echo more >> /boot/initrd.img-{KVER}")
    assert adm.store.current(NAME) == 3
    gen2 = snapshot(adm, 2)
    assert not os.path.samestat(os.stat(boot(adm, 3, "initrd.img")), os.stat(boot(adm, 2, "initrd.img")))
    assert os.stat(boot(adm, 3, "initrd.img")).st_nlink == 1
    assert boot(adm, 3, "initrd.img").read_bytes() == boot(adm, 1, "initrd.img").read_bytes() + b"more\n"
    assert os.path.samestat(os.stat(boot(adm, 3, "vmlinuz")), os.stat(boot(adm, 1, "vmlinuz")))
    assert os.stat(boot(adm, 1, "vmlinuz")).st_nlink == 3
    assert {k: v[:4] for k, v in snapshot(adm, 1).items()} == {k: v[:4] for k, v in gen1.items()}
    assert snapshot(adm, 2) == gen2

    # the kernel rewritten with the same bytes: a new inode in the root, still a link in the TFTP tree
    cli(adm, "run", NAME, "--", "sh", "-c", f"cp /boot/vmlinuz-{KVER} /tmp/k && mv /tmp/k /boot/vmlinuz-{KVER}")
    r3, r4 = adm.store.path(NAME, 3), adm.store.path(NAME, 4)
    assert not os.path.samestat(os.stat(r3 / f"boot/vmlinuz-{KVER}"), os.stat(r4 / f"boot/vmlinuz-{KVER}"))
    assert os.path.samestat(os.stat(boot(adm, 4, "vmlinuz")), os.stat(boot(adm, 1, "vmlinuz")))
    assert os.path.samestat(os.stat(boot(adm, 4, "initrd.img")), os.stat(boot(adm, 3, "initrd.img")))
    assert not list(boot(adm, 4, "vmlinuz").parent.glob(".*"))   # no temporary name left

    # list: the linked files are shared, not own; gc of 1-3 leaves gen 4's files whole
    rows = {r["generation"]: r for r in json.loads(cli(adm, "list", NAME, "--json").stdout)}
    shares = publish.boot_sharing(adm.tftp_root, NAME, [1, 2, 3, 4])
    for n in (1, 2, 3, 4):          # every file is linked by another generation here: shared
        assert shares[n][0] < 64 * 1024 and shares[n][1] >= 2 << 20, shares   # own: the directory only
    root_shares = adm.store.own_shared(NAME, [1, 2, 3, 4])
    for n in (1, 2, 3, 4):
        assert rows[n]["own_bytes"] == root_shares[n][0] + shares[n][0]
        assert rows[n]["shared_bytes"] == root_shares[n][1] + shares[n][1]
    kernel = boot(adm, 4, "vmlinuz").read_bytes()
    initrd = boot(adm, 4, "initrd.img").read_bytes()
    cli(adm, "gc", NAME, "--keep", "1")
    assert adm.store.numbers(NAME) == [4]
    assert not boot(adm, 1, "vmlinuz").exists() and not boot(adm, 3, "initrd.img").exists()
    assert boot(adm, 4, "vmlinuz").read_bytes() == kernel and boot(adm, 4, "initrd.img").read_bytes() == initrd
    assert os.stat(boot(adm, 4, "vmlinuz")).st_nlink == 1
    assert publish.boot_sharing(adm.tftp_root, NAME, [4])[4][0] >= 2 << 20     # alone now: its own


def test_a_parent_without_published_files_or_another_size_means_a_copy(tmp_path):
    """publish_generation alone: no parent's file -> a copy; a parent's file of another size or
    other bytes -> a copy; the parent's file is never written."""
    tftp = tmp_path / "tftp"
    roots = {}
    for n, kbytes in ((1, b"k" * 5000), (2, b"k" * 5000), (3, b"k" * 4999 + b"x"), (4, b"k" * 6000)):
        r = tmp_path / f"root{n}"
        (r / "boot").mkdir(parents=True)
        (r / f"boot/vmlinuz-{KVER}").write_bytes(kbytes)
        (r / f"boot/initrd.img-{KVER}").write_bytes(b"i" * 3000)
        roots[n] = r
    publish.publish_generation(roots[2], tftp, NAME, 2, parent=1, parent_root=roots[1])   # gen 1 unpublished
    assert os.stat(publish.tftp_dir(tftp, NAME) / "gen-0002/vmlinuz").st_nlink == 1
    before = (publish.tftp_dir(tftp, NAME) / "gen-0002/vmlinuz").read_bytes()
    for n in (3, 4):
        publish.publish_generation(roots[n], tftp, NAME, n, parent=2, parent_root=roots[2])
        d = publish.tftp_dir(tftp, NAME) / f"gen-{n:04d}"
        assert (d / "vmlinuz").read_bytes() == (roots[n] / f"boot/vmlinuz-{KVER}").read_bytes()
        assert os.stat(d / "vmlinuz").st_nlink == 1                                    # a copy
        assert os.path.samestat(os.stat(d / "initrd.img"),                              # same bytes: a link
                                os.stat(publish.tftp_dir(tftp, NAME) / "gen-0002/initrd.img"))
    assert (publish.tftp_dir(tftp, NAME) / "gen-0002/vmlinuz").read_bytes() == before
    # published again (same number): still one inode, nothing left behind
    publish.publish_generation(roots[4], tftp, NAME, 4, parent=2, parent_root=roots[2])
    assert sorted(p.name for p in (publish.tftp_dir(tftp, NAME) / "gen-0004").iterdir()) == ["initrd.img", "vmlinuz"]
