"""Overlay views as the generation store (sidusd/image/views.py): a generation is its layer
served through a read-only overlay view; flattened beyond the depth; layers kept while a stack
needs them; views mounted again after a reboot; exported by nfs-ganesha; refused when unusable.
The immutability of every kind of write with views: test_generations.py (``ext4-views``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidusd.errors import BackendError
from sidusd.image import views
from sidusd.image.chroot import mounts_under
from sidusd.image.generations import ImageStore
from sidusd.storage.runner import Runner
from tests.conftest import require_root, require_tool
from tests.integration.test_generations import NAME, REPO, WRITES, busybox_root, make_root, snapshot


@pytest.fixture
def images(tmp_path):
    require_root()
    d = tmp_path / "images"
    yield d
    views.umount_all(d)
    assert mounts_under(tmp_path) == []


def _store(images: Path, depth: int = 8) -> ImageStore:
    st = ImageStore(images, views=True, view_depth=depth)
    n, part = st.begin(NAME, None)
    make_root(part)
    st.commit(NAME, n, {"kind": "build"})
    st.switch(NAME, n)
    return st


def _gen(st: ImageStore, parent: int, kind: str, tmp: Path) -> int:
    n, part = st.begin(NAME, parent)
    WRITES[kind](part, tmp)
    st.commit(NAME, n, {"kind": "run"})
    return n


def test_views_stack_flatten_beyond_depth_and_gc_keeps_what_a_stack_needs(images, tmp_path):
    st = _store(images, depth=2)
    d = st.image_dir(NAME)
    assert _gen(st, 1, "append", tmp_path) == 2 and _gen(st, 2, "sed-i", tmp_path) == 3
    assert views.stack_of(d, 2) == [2, 1] and views.stack_of(d, 3) == [3, 2, 1]
    assert os.path.ismount(st.path(NAME, 3)) and st.meta(NAME, 3)["mechanism"] == "overlay-view"
    snaps = {g: snapshot(st.path(NAME, g)) for g in (1, 2, 3)}
    assert _gen(st, 3, "chmod-chown", tmp_path) == 4          # a third layer > depth 2: flattened
    g1, g4 = st.path(NAME, 1), st.path(NAME, 4)
    assert st.meta(NAME, 4)["mechanism"] == "overlay+hardlinks" and not os.path.ismount(g4)
    assert views.stack_of(d, 4) is None and (g4 / "etc/motd").read_text() == "hello\nmore\n"
    assert "alpha=9" in (g4 / "etc/config").read_text() and os.stat(g4 / "usr/bin/tool").st_mode & 0o7777 == 0o700
    assert os.lstat(g4 / "opt/sparse").st_ino == os.lstat(g1 / "opt/sparse").st_ino        # the base's inode
    assert os.lstat(g4 / "etc/motd").st_ino == os.lstat(d / "gen-0002.ovl/layer/etc/motd").st_ino  # layer 2's
    assert {g: snapshot(st.path(NAME, g)) for g in (1, 2, 3)} == snaps, "flattening changed a generation"
    st.switch(NAME, 3)                                        # rollback to a view: a symlink
    st.remove(NAME, 2)                                        # 3 stacks on 2's layer: kept
    assert st.numbers(NAME) == [1, 3, 4] and (d / "gen-0002.ovl/layer").is_dir() and not (d / "gen-0002").exists()
    st.remove(NAME, 1)                                        # 3's base: kept as gen-0001.base
    assert st.numbers(NAME) == [3, 4] and (d / "gen-0001.base/opt/sparse").exists()
    views.umount_all(images)                                  # a reboot: the views come back over the kept ones
    assert views.mount_all(images) == [(NAME, 3, "mounted")]
    assert snapshot(st.path(NAME, 3)) == snaps[3]
    n5, _ = st.begin(NAME, 3)                                 # never the number of a kept layer
    assert n5 == 5
    st.abort(NAME, n5)
    st.switch(NAME, 4)
    st.remove(NAME, 3)                                        # no stack needs 1, 2, 3 any more: freed
    left = sorted(p.name for p in d.iterdir() if p.name.startswith("gen-"))
    assert left == ["gen-0004"], left
    assert (g4 / "etc/motd").read_text() == "hello\nmore\n"


def test_views_refused_with_the_reason(images, tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        ImageStore(images, views=True, btrfs_snapshots=True)
    for bad in (0, 33):
        with pytest.raises(ValueError, match=r"must be 1\.\.32"):
            ImageStore(images, views=True, view_depth=bad)

    class NoIndex(Runner):                                    # a kernel that refuses the view's options
        def run(self, argv, timeout_s=30, **kw):
            if argv[:2] == ["mount", "-t"] and "nfs_export=on" in argv[4]:
                argv = [*argv[:4], argv[4].replace("index=on", "index=bogus"), *argv[5:]]
            return super().run(argv, timeout_s, **kw)
    st = _store(images)
    bad = ImageStore(images, NoIndex(), views=True)
    with pytest.raises(BackendError, match="overlay views refused"):
        bad.begin(NAME, 1)
    assert bad.leftovers(NAME) == () and st.numbers(NAME) == [1] and mounts_under(images) == []
    r = _cli(images, tmp_path / "tftp", "--views", "--btrfs-snapshots", "list")
    assert r.returncode == 2 and "exclude each other" in r.stderr


def _cli(images: Path, tftp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(images), "--tftp-root",
                           str(tftp), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_sidus_image_views_run_list_diff_gc_and_mount_views(images, tmp_path):
    """`--views run`, then what a reboot needs (`mount-views`, idempotent), `list` OWN/SHARED and
    `diff` compared on the layers (a view has its own st_dev), `gc` keeping the base a view needs."""
    bb = require_tool("busybox")
    tftp = tmp_path / "tftp"
    st = ImageStore(images, views=True)
    n, part = st.begin(NAME, None)
    busybox_root(part, bb)
    st.commit(NAME, n, {"kind": "build", "message": "first"})
    st.switch(NAME, n)
    r = _cli(images, tftp, "--views", "run", NAME, "-m", "more", "--", "sh", "-c", "echo more >> /etc/motd")
    assert r.returncode == 0, r.stderr
    g2 = st.path(NAME, 2)
    assert os.path.ismount(g2) and st.meta(NAME, 2)["mechanism"] == "overlay-view"
    views.umount_all(images)                                  # the boot host rebooted
    assert os.listdir(g2) == []
    r = _cli(images, tftp, "mount-views")
    assert r.returncode == 0 and f"{NAME} generation 2: view mounted" in r.stderr, r.stderr
    r = _cli(images, tftp, "mount-views")
    assert r.returncode == 0 and "generation 2: view already mounted" in r.stderr, r.stderr
    assert (g2 / "etc/motd").read_text() == "hello\nmore\n"
    rows = {x["generation"]: x for x in json.loads(_cli(images, tftp, "list", NAME, "--json").stdout)}
    bb_bytes = os.lstat(st.path(NAME, 1) / "bin/busybox").st_blocks * 512
    for g in (1, 2):                                          # busybox: one inode in the base, seen by both
        assert rows[g]["shared_bytes"] >= bb_bytes > 500_000, rows
        assert rows[g]["own_bytes"] < 64 << 10, rows          # each its own motd; the directories shared
    r = _cli(images, tftp, "diff", NAME, "1", "2", "--json")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["files"]                    # (+ the chroot's mount points, as A)
    assert [f for f in files if f[0] != "A"] == [["M", "etc/motd"]], files
    r = _cli(images, tftp, "gc", NAME, "--keep", "1")
    assert "removed generation(s) 1" in r.stdout, r.stdout + r.stderr
    assert (st.image_dir(NAME) / "gen-0001.base/bin/busybox").exists()
    assert (g2 / "etc/motd").read_text() == "hello\nmore\n" and (g2 / "bin/busybox").exists()


@pytest.mark.netns
def test_ganesha_exports_a_view_mounted_after_it_started(images, tmp_path):
    """nfs-ganesha (VFS, NFSv3 client libnfs nfs-cat) exports generation 2's view, mounted after
    ganesha started: reads the file changed in 2 and one unchanged from 1.  The lab's ganesha
    runs in a mount namespace of its own; started as a slave of a shared mount holding the
    images directory, it sees views mounted later (Debian's nfs-ganesha.service shares the host's)."""
    import asyncio

    from netns import NetNs

    from sidusd import config as config_mod
    from sidusd.lab.ganesha import GaneshaServer
    from sidusd.storage.nfs import NfsManager
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare", "nfs-cat"):
        require_tool(t)
    images.mkdir()
    subprocess.run(["mount", "--bind", str(images), str(images)], check=True)
    subprocess.run(["mount", "--make-shared", str(images)], check=True)
    ip = "10.13.22.1"
    try:
        st = _store(images)
        with NetNs("sidus-t-view") as ns:
            ns.run("ip", "link", "add", "vv0", "type", "veth", "peer", "name", "vv1")
            ns.run("ip", "addr", "add", f"{ip}/24", "dev", "vv0")
            ns.run("ip", "link", "set", "vv0", "up")
            ns.run("ip", "link", "set", "vv1", "up")
            server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "exports.conf", ip,
                                   propagation="slave")
            try:
                server.start()
                server.wait_ready(timeout_s=60)
                assert _gen(st, 1, "append", tmp_path) == 2           # its view mounted now
                g1, g2 = st.path(NAME, 1), st.path(NAME, 2)
                cfg = config_mod.parse(
                    "dhcp: {mode: 'off'}\n" f"tftp: {{root: {tmp_path}}}\n"
                    f"nfs: {{backend: ganesha, client_networks: [10.13.22.0/24], ganesha_config: "
                    f"{server.exports_file}, ganesha_pid_file: {server.pid_file}}}\n"
                    f"images:\n  g1: {{root: {g1}, kernel: k, initrd: i}}\n"
                    f"  g2: {{root: {g2}, kernel: k, initrd: i}}\n",
                    "test.yaml", tmp_path)
                asyncio.run(NfsManager(cfg, Runner()).apply(cfg))
                for g in (g1, g2):
                    server.wait_exported(g, timeout_s=30)

                def cat(root: Path, rel: str) -> bytes:
                    r = subprocess.run(["ip", "netns", "exec", ns.name, "nfs-cat",
                                        f"nfs://{ip}{root}/{rel}?version=3"], capture_output=True, timeout=60)
                    assert r.returncode == 0, r.stderr
                    return r.stdout
                assert cat(g2, "etc/motd") == b"hello\nmore\n"               # changed in 2 (its layer)
                assert cat(g2, "opt/shared-a") == b"one inode, two names\n"  # unchanged from 1 (the base)
                assert cat(g2, "usr/share/doc/base/README") == b"doc\n"
                assert cat(g1, "etc/motd") == b"hello\n"
            finally:
                log = server.log_tail()
                server.stop()
                print(log)
    finally:
        views.umount_all(images)
        subprocess.run(["umount", str(images)], check=False)
