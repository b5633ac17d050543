"""Generations share their parent's files and never change them (sidusd/image/layers.py).

A synthetic root (files with modes, owners, xattrs, a sparse file, hard links,
a symlink, a fifo, a device, a dpkg database) is generation 1.  Each kind of
write is done in the overlay of a new generation by the real tools (dpkg
--root with a .deb built here by dpkg-deb, sh ``>>``, sed -i, chmod, chown,
setfattr, ln, mv, rm -rf + mkdir, dd conv=notrunc into a hard-linked file),
then the generation is published.  Every file of the parent is hashed before
and after: content, type, mode, owner, size, mtime, symlink target, device
number and xattrs.  Link count and ctime may change (a hard link to a shared
inode adds a link and sets its ctime: the mechanism itself), nothing else.
The published tree equals the merged view the tools saw.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sidusd.image import btrfs, layers, views
from sidusd.image.build import Administrator
from sidusd.image.chroot import mounts_under
from sidusd.image.generations import ImageStore
from tests.conftest import poll_until, require_root, require_tool

NAME = "synth"
REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything of every entry under ``root`` but inode number, link count, atime, ctime and a
    directory's st_size (overlayfs shows the upper directory's; btrfs counts names)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, ""] if dirpath == str(root) else [*dirnames, *filenames]:
            p = os.path.join(dirpath, n) if n else dirpath
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = f"dev {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                body = ""
            xattrs = tuple(sorted((a, os.getxattr(p, a, follow_symlinks=False))
                                  for a in os.listxattr(p, follow_symlinks=False)))
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size    # a directory's size is the fs's business
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, size,
                                             st.st_mtime_ns, body, xattrs)
    return out


def make_root(root: Path) -> None:
    for d in ("usr/bin", "etc/sub", "opt/d", "var/lib/dpkg/info", "var/lib/dpkg/updates",
              "var/lib/dpkg/triggers", "usr/share/doc/base", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/config").write_text("alpha=1\nbeta=2\n")
    (root / "etc/sub/secret").write_text("s\n")
    os.chmod(root / "etc/sub/secret", 0o600)
    os.chown(root / "etc/sub/secret", 1234, 4321)
    os.setxattr(root / "etc/config", "user.kept", b"1")
    os.setxattr(root / "etc/sub", "trusted.dirmark", b"d")
    os.setxattr(root / "usr/bin", "user.dir", b"u")
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + os.urandom(4000))
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.setxattr(root / "usr/bin/tool", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "opt/shared-a").write_text("one inode, two names\n")
    os.link(root / "opt/shared-a", root / "opt/shared-b")
    (root / "opt/d/f").write_text("old\n")
    (root / "usr/share/doc/base/README").write_text("doc\n")
    os.symlink("../etc/motd", root / "usr/motd-link")
    os.mkfifo(root / "dev/fifo")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with open(root / "opt/sparse", "wb") as f:
        f.truncate(64 << 20)
        f.write(b"head")
    (root / "var/lib/dpkg/status").write_text("")
    (root / "var/lib/dpkg/available").write_text("")
    os.chmod(root, 0o755)


def build_deb(tmp: Path, version: str, body: str) -> Path:
    pkg = tmp / f"pkg-{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/share/sidus-test").mkdir(parents=True)
    (pkg / "etc").mkdir()
    (pkg / "DEBIAN/control").write_text(f"Package: sidus-test\nVersion: {version}\nArchitecture: all\n"
                                        "Maintainer: sidus <sidus@example.org>\nDescription: test package\n")
    (pkg / "DEBIAN/conffiles").write_text("/etc/sidus-test.conf\n")
    (pkg / "usr/share/sidus-test/data").write_text(body)
    (pkg / "etc/sidus-test.conf").write_text(f"conf {version}\n")
    out = tmp / f"sidus-test_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(params=["ext4", "ext4-views", "btrfs", "btrfs-snapshots"])
def images_dir(request, tmp_path):
    """The images directory on this machine's file system (ext4: overlay + hard-link farm;
    ext4-views: each generation its layer + an overlay view, sidusd.image.views) or on a
    loop-mounted btrfs (the same, or with ``btrfs_snapshots`` the snapshot fast path)."""
    require_root()
    if request.param.startswith("ext4"):
        assert btrfs._fstype(tmp_path) == 0xEF53, "tmp_path is expected on ext4 here"
        yield tmp_path / "images"
        views.umount_all(tmp_path / "images")
        return
    require_tool("mkfs.btrfs")
    require_tool("btrfs")
    img, mnt = tmp_path / "btrfs.img", tmp_path / "btrfs"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    sh("mkfs.btrfs", "-q", str(img))
    mnt.mkdir()
    sh("mount", "-o", "loop", str(img), str(mnt))
    try:
        yield mnt / "images"
    finally:
        views.umount_all(mnt / "images")
        sh("umount", str(mnt))


@pytest.fixture
def store(images_dir, tmp_path, request):
    require_tool("setfattr")
    require_tool("dpkg-deb")
    kind = request.node.callspec.params["images_dir"]
    st = ImageStore(images_dir, btrfs_snapshots=kind == "btrfs-snapshots", views=kind.endswith("-views"))
    n, part = st.begin(NAME, None)
    make_root(part)
    st.commit(NAME, n, {"kind": "build"})
    st.switch(NAME, n)
    yield st
    views.umount_all(images_dir)
    assert mounts_under(images_dir) == []


def sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


def dpkg(root: Path, *args: str) -> None:
    sh("dpkg", f"--root={root}", "--force-script-chrootless", "--force-not-root", "--no-triggers",
       "--path-exclude=/usr/share/doc/*", *args)


WRITES = {
    "append": lambda m, t: sh("sh", "-c", f"echo more >> {m}/etc/motd"),
    "sed-i": lambda m, t: sh("sed", "-i", "s/alpha=1/alpha=9/", f"{m}/etc/config"),
    "chmod-chown": lambda m, t: (sh("chmod", "0700", f"{m}/usr/bin/tool"),
                                 sh("chown", "0:0", f"{m}/etc/sub/secret"), sh("chmod", "0700", f"{m}/etc")),
    "setfattr": lambda m, t: (sh("setfattr", "-n", "user.new", "-v", "x", f"{m}/etc/motd"),
                              sh("setfattr", "-x", "trusted.dirmark", f"{m}/etc/sub"),
                              sh("setfattr", "-n", "trusted.t", "-v", "y", f"{m}/opt/d/f")),
    "hard-link": lambda m, t: (sh("ln", f"{m}/etc/motd", f"{m}/etc/motd2"),
                               sh("sh", "-c", f"echo via-link >> {m}/etc/motd2")),
    "rename": lambda m, t: (sh("mv", f"{m}/etc/config", f"{m}/etc/config.old"),
                            sh("mv", f"{m}/usr/share/doc/base", f"{m}/usr/share/doc/moved")),
    "rm-and-recreate-dir": lambda m, t: (sh("rm", "-rf", f"{m}/opt/d"), sh("mkdir", f"{m}/opt/d"),
                                         sh("sh", "-c", f"echo new > {m}/opt/d/g"),
                                         sh("rm", f"{m}/usr/motd-link", f"{m}/dev/fifo")),
    "write-through-shared-link": lambda m, t: (
        sh("dd", "if=/dev/zero", f"of={m}/opt/shared-a", "bs=1", "count=3", "conv=notrunc"),
        sh("dd", "if=/dev/urandom", f"of={m}/opt/sparse", "bs=4096", "count=1", "seek=1000", "conv=notrunc"),
        sh("truncate", "-s", "0", f"{m}/usr/bin/tool-alias")),
    "dpkg-install": lambda m, t: dpkg(m, "-i", str(build_deb(t, "1.0", "v1\n"))),
}


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_parent_generation_is_immutable_and_child_is_what_the_tools_wrote(store, tmp_path, kind):
    parent = store.path(NAME, 1)
    before = snapshot(parent)
    n, part = store.begin(NAME, 1)
    on_btrfs = btrfs.is_subvolume(parent)
    if on_btrfs:
        assert btrfs.is_subvolume(part) and mounts_under(part) == []          # a writable snapshot
    else:
        assert mounts_under(part) == [str(part)]                   # the overlay, lower = generation 1
    WRITES[kind](part, tmp_path)
    merged = snapshot(part)
    assert merged != before
    store.commit(NAME, n, {"kind": "run"})
    child = store.path(NAME, n)
    assert snapshot(parent) == before, "the parent generation changed"
    assert snapshot(child) == merged, "the published generation differs from what the tools wrote"
    assert not layers.layer_dir(store.image_dir(NAME) / f"gen-{n:04d}.partial").exists()
    if on_btrfs:                                                   # published read-only
        assert store.meta(NAME, n)["mechanism"] == "btrfs-snapshot"
        with pytest.raises(OSError, match="Read-only file system"):
            (child / "etc/motd").write_text("no")
        return
    if store.views:                                                # the layer + a read-only view
        assert store.meta(NAME, n)["mechanism"] == "overlay-view" and os.path.ismount(child)
        with pytest.raises(OSError, match="Read-only file system"):
            (child / "etc/motd").write_text("no")
        layer = views.ovl_dir(store.image_dir(NAME), n) / "layer"
        assert not (layer / "usr/bin/tool").exists() or kind == "chmod-chown"    # only what changed
        views.umount(store.image_dir(NAME), n, store.runner)      # after a reboot: the view comes back
        assert os.listdir(child) == []
        assert views.mount_all(store.dir) == [(NAME, n, "mounted")]
        assert snapshot(child) == merged and snapshot(parent) == before
        if kind not in ("write-through-shared-link",):                # unchanged: the parent's inode
            assert os.lstat(child / "opt/sparse").st_ino == os.lstat(parent / "opt/sparse").st_ino
        return
    # unchanged files are shared (same inode), at no cost
    assert store.meta(NAME, n)["mechanism"] == "overlay+hardlinks"
    assert os.lstat(child / "usr/share/doc").st_ino != os.lstat(parent / "usr/share/doc").st_ino   # own dirs
    if kind not in ("write-through-shared-link",):
        assert os.lstat(child / "opt/sparse").st_ino == os.lstat(parent / "opt/sparse").st_ino


def test_dpkg_install_upgrade_purge_each_a_generation(store, tmp_path):
    v1, v2 = build_deb(tmp_path, "1.0", "v1\n"), build_deb(tmp_path, "2.0", "v2 data\n")
    steps = [("-i", str(v1)), ("-i", str(v2)), ("--purge", "sidus-test")]
    for i, args in enumerate(steps, start=1):
        gens = {g: snapshot(store.path(NAME, g)) for g in store.numbers(NAME)}
        n, part = store.begin(NAME, i)
        dpkg(part, *args)
        store.commit(NAME, n, {"kind": "run"})
        store.switch(NAME, n)
        for g, snap in gens.items():
            assert snapshot(store.path(NAME, g)) == snap, f"generation {g} changed by step {args}"
    g2, g3, g4 = (store.path(NAME, g) for g in (2, 3, 4))
    assert (g2 / "usr/share/sidus-test/data").read_text() == "v1\n"
    assert (g3 / "usr/share/sidus-test/data").read_text() == "v2 data\n"
    assert (g3 / "etc/sidus-test.conf").read_text() == "conf 2.0\n"
    assert not (g4 / "usr/share/sidus-test").exists() and not (g4 / "etc/sidus-test.conf").exists()
    assert "Version: 2.0" in (g3 / "var/lib/dpkg/status").read_text()
    assert "sidus-test" not in (g4 / "var/lib/dpkg/status").read_text().replace("Status: purge", "")


def test_the_check_catches_a_publish_that_writes_into_a_shared_inode(tmp_path):
    """The deliberately broken variant: flatten copies the changed content INTO the existing name
    (following the hard link to the parent's inode) instead of renaming over it."""
    require_root()

    def write_in_place(src: str, dst: str) -> None:
        if os.path.lexists(dst) and not os.path.isdir(dst):
            with open(src, "rb") as s, open(dst, "r+b") as d:     # the bug: the shared inode is written
                d.truncate(0)
                d.write(s.read())
            os.unlink(src)
        else:
            layers.replace_entry(src, dst)

    st = ImageStore(tmp_path / "images", replace=write_in_place)
    n, part = st.begin(NAME, None)
    make_root(part)
    st.commit(NAME, n, {"kind": "build"})
    before = snapshot(st.path(NAME, 1))
    n, part = st.begin(NAME, 1)
    WRITES["append"](part, tmp_path)
    st.commit(NAME, n, {"kind": "run"})
    assert snapshot(st.path(NAME, 1)) != before
    assert (st.path(NAME, 1) / "etc/motd").read_text() == "hello\nmore\n"     # what the check saw


def busybox_root(part: Path, bb: str) -> None:
    make_root(part)
    (part / "bin").mkdir()
    shutil.copy2(bb, part / "bin/busybox")
    for app in ("sh", "sed", "chmod", "ln", "mv", "cat"):
        os.symlink("busybox", part / "bin" / app)


def test_administrator_run_in_a_chroot_shares_and_keeps_the_parent(tmp_path):
    """The whole path: `run` in a chroot (busybox sh inside) on the overlay, then published."""
    require_root()
    bb = require_tool("busybox")
    adm = Administrator(tmp_path / "images", tmp_path / "tftp", out=io.StringIO())
    n, part = adm.store.begin(NAME, None)
    busybox_root(part, bb)
    adm.store.commit(NAME, n, {"kind": "build"})
    adm.serve(NAME, n)
    before = snapshot(adm.store.path(NAME, 1))
    adm.run(NAME, ["/bin/sh", "-c", "echo x >> /etc/motd; sed -i s/beta/gamma/ /etc/config; "
                                    "chmod 600 /usr/bin/tool; ln /etc/motd /etc/m2; mv /opt/d /opt/e; "
                                    "cat /proc/self/mounts > /root-mounts"])
    assert adm.store.current(NAME) == 2 and mounts_under(tmp_path) == []
    g1, g2 = adm.store.path(NAME, 1), adm.store.path(NAME, 2)
    assert snapshot(g1) == before
    assert (g2 / "etc/motd").read_text() == "hello\nx\n" and "gamma=2" in (g2 / "etc/config").read_text()
    assert os.stat(g2 / "etc/motd").st_ino == os.stat(g2 / "etc/m2").st_ino
    assert (g2 / "opt/e/f").read_text() == "old\n" and not (g2 / "opt/d").exists()
    assert " /proc " in (g2 / "root-mounts").read_text()
    assert not (g2 / "usr/sbin/policy-rc.d").exists()
    assert os.stat(g2 / "opt/sparse").st_ino == os.stat(g1 / "opt/sparse").st_ino
    meta = adm.store.meta(NAME, 2)
    assert meta["changes"]["files"] >= 4 and meta["changes"]["bytes"] < 1 << 20


@pytest.mark.netns
@pytest.mark.parametrize("images_dir", ["ext4", "btrfs"], indirect=True)
def test_ganesha_exports_a_generation_and_its_child_while_the_next_is_built(store, tmp_path):
    """nfs-ganesha (VFS) serves generation 1 and its child 2 (hard-link farm, or btrfs snapshot)
    side by side: an NFSv3
    client (libnfs's nfs-cat) reads the shared inode through both exports and each generation's
    own version of the changed file; generation 1 keeps serving while 3 is in its overlay."""
    import asyncio

    from netns import NetNs

    from sidusd import config as config_mod
    from sidusd.lab.ganesha import GaneshaServer
    from sidusd.storage.nfs import NfsManager
    from sidusd.storage.runner import Runner
    for t in ("ganesha.nfsd", "rpcbind", "showmount", "unshare", "nfs-cat"):
        require_tool(t)
    n, part = store.begin(NAME, 1)
    WRITES["append"](part, tmp_path)
    store.commit(NAME, n, {"kind": "run"})
    g1, g2 = store.path(NAME, 1), store.path(NAME, 2)
    ip = "10.13.21.1"
    with NetNs("sidus-t-gen") as ns:
        ns.run("ip", "link", "add", "gv0", "type", "veth", "peer", "name", "gv1")
        ns.run("ip", "addr", "add", f"{ip}/24", "dev", "gv0")
        ns.run("ip", "link", "set", "gv0", "up")
        ns.run("ip", "link", "set", "gv1", "up")
        server = GaneshaServer(ns.name, tmp_path / "ganesha", tmp_path / "exports.conf", ip)
        try:
            server.start()
            server.wait_ready(timeout_s=60)
            cfg = config_mod.parse(
                "dhcp: {mode: 'off'}\n" f"tftp: {{root: {tmp_path}}}\n"
                f"nfs: {{backend: ganesha, client_networks: [10.13.21.0/24], ganesha_config: "
                f"{server.exports_file}, ganesha_pid_file: {server.pid_file}}}\n"
                f"images:\n  g1: {{root: {g1}, kernel: k, initrd: i}}\n  g2: {{root: {g2}, kernel: k, initrd: i}}\n",
                "test.yaml", tmp_path)
            asyncio.run(NfsManager(cfg, Runner()).apply(cfg))
            for g in (g1, g2):
                server.wait_exported(g, timeout_s=30)

            def cat(root: Path, rel: str) -> bytes:
                r = subprocess.run(["ip", "netns", "exec", ns.name, "nfs-cat",
                                    f"nfs://{ip}{root}/{rel}?version=3"], capture_output=True, timeout=60)
                assert r.returncode == 0, r.stderr
                return r.stdout
            n3, part3 = store.begin(NAME, 2)                                # the next one, being built
            WRITES["sed-i"](part3, tmp_path)
            assert cat(g1, "etc/motd") == b"hello\n" and cat(g2, "etc/motd") == b"hello\nmore\n"
            assert cat(g1, "opt/shared-a") == cat(g2, "opt/shared-b") == b"one inode, two names\n"
            assert cat(g2, "etc/config") == b"alpha=1\nbeta=2\n"
            store.commit(NAME, n3, {"kind": "run"})
            assert cat(g2, "etc/config") == b"alpha=1\nbeta=2\n"           # 2 unchanged by 3's publish
        finally:
            log = server.log_tail()
            server.stop()
            print(log)


def test_cli_message_list_sizes_diff_and_gc_record(tmp_path):
    """`run -m`, `list --json` (message, own/shared), `diff`, `gc --dry-run`, `gc` and its record."""
    require_root()
    bb = require_tool("busybox")
    require_tool("dpkg-deb")
    images, tftp = tmp_path / "images", tmp_path / "tftp"
    adm = Administrator(images, tftp, out=io.StringIO())
    n, part = adm.store.begin(NAME, None)
    busybox_root(part, bb)
    adm.store.commit(NAME, n, {"kind": "build", "message": "first"})
    adm.serve(NAME, n)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(images),
                               "--tftp-root", str(tftp), *args], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
    r = cli("run", NAME, "-m", "motd says more", "--", "sh", "-c", "echo more >> /etc/motd")
    assert r.returncode == 0, r.stderr
    n, part = adm.store.begin(NAME, 2)                                  # a package, as dpkg does it
    dpkg(part, "-i", str(build_deb(tmp_path, "1.0", "v1\n")))
    adm.store.commit(NAME, n, {"kind": "run", "parent": 2, "message": "sidus-test"})
    adm.serve(NAME, n)
    rows = {r["generation"]: r for r in json.loads(cli("list", NAME, "--json").stdout)}
    assert [rows[g]["message"] for g in (1, 2, 3)] == ["first", "motd says more", "sidus-test"]
    bb_bytes = os.lstat(adm.store.path(NAME, 1) / "bin/busybox").st_blocks * 512
    for g in (1, 2, 3):
        assert rows[g]["shared_bytes"] >= bb_bytes > 500_000            # busybox: one inode, 3 names
        assert rows[g]["own_bytes"] < 300_000 and rows[g]["size_bytes"] > bb_bytes
    text = cli("list", NAME).stdout
    assert "OWN" in text and "SHARED" in text and "motd says more" in text
    r = cli("diff", NAME, "1", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "+ sidus-test 1.0" in lines and "M /etc/motd" in lines
    assert not any("usr/share/sidus-test" in ln or "var/lib/dpkg" in ln for ln in lines[:-1])
    assert "3 file(s) of the changed packages" in lines[-1], r.stdout
    d = json.loads(cli("diff", NAME, "2", "3", "--json").stdout)
    assert d["packages"]["added"] == {"sidus-test": "1.0"} and d["files"] == []
    r = cli("gc", NAME, "--keep", "1", "--dry-run")
    assert "would remove generation(s) 1, 2" in r.stdout and adm.store.numbers(NAME) == [1, 2, 3]
    r = cli("gc", NAME, "--keep", "1")
    assert "removed generation(s) 1, 2" in r.stdout and adm.store.numbers(NAME) == [3]
    recs = [json.loads(x) for x in (images / NAME / "meta/removed.jsonl").read_text().splitlines()]
    assert [(x["generation"], x["message"], x["kind"]) for x in recs] == [(1, "first", "build"),
                                                                        (2, "motd says more", "run")]
    assert recs[0]["packages"] == [] and recs[1]["parent"] == 1
    assert (adm.store.path(NAME, 3) / "etc/motd").read_text() == "hello\nmore\n"       # gc freed, 3 intact


def _farmed(farm: Path, parent: Path) -> bool:
    """``farm`` holds every entry of ``parent``, non-directories as the same inodes."""
    try:
        for dirpath, dirnames, filenames in os.walk(parent):
            rel = os.path.relpath(dirpath, parent)
            for n in filenames:
                if os.lstat(os.path.join(farm, rel, n)).st_ino != os.lstat(os.path.join(dirpath, n)).st_ino:
                    return False
            for n in dirnames:
                if not os.path.isdir(os.path.join(farm, rel, n)):
                    return False
    except FileNotFoundError:
        return False
    return True


@pytest.mark.parametrize("images_dir", ["ext4"], indirect=True)
def test_the_farm_is_made_while_the_work_runs(store, tmp_path):
    """begin() starts the parent's hard-link farm next to the overlay (gen-N.farm), so commit only
    applies the upper layer; the farm becomes the generation, the used-up layer (gen-N.spent) is
    removed by the next generation's farm thread, and an aborted or crashed one's farm is removed."""
    n, part = store.begin(NAME, 1)
    farm = layers.farm_dir(part)
    assert os.path.ismount(part)                                       # the work's overlay is still there
    assert poll_until(lambda: _farmed(farm, store.path(NAME, 1)), timeout_s=120), \
        f"no farm of generation 1 at {farm} while generation {n} is worked on"
    WRITES["append"](part, tmp_path)
    store.commit(NAME, n, {"kind": "run"})
    g1, g2 = store.path(NAME, 1), store.path(NAME, n)
    assert not farm.exists() and store.leftovers(NAME) == ()
    assert os.lstat(g2 / "opt/shared-a").st_ino == os.lstat(g1 / "opt/shared-a").st_ino
    assert (g2 / "etc/motd").read_text() == "hello\nmore\n" and (g1 / "etc/motd").read_text() == "hello\n"
    spent = layers.spent_dir(part)                                     # the used-up layer, left for later
    assert spent.is_dir() and not layers.layer_dir(part).exists()
    n3, part3 = store.begin(NAME, n)                                   # its Farm removes it, off the clock
    assert poll_until(lambda: not spent.exists(), timeout_s=120), f"{spent} not removed by the next farm"
    store.abort(NAME, n3)                                              # aborted: its farm goes too
    assert store.leftovers(NAME) == () and not layers.farm_dir(part3).exists()
    crashed = store.image_dir(NAME) / "gen-0009.farm"                  # a crash's farm: removed by begin
    shutil.copytree(g1 / "etc", crashed)
    assert "gen-0009.farm" in store.leftovers(NAME)
    n4, _ = store.begin(NAME, n)
    assert not crashed.exists()
    store.abort(NAME, n4)


@pytest.mark.parametrize("images_dir", ["ext4"], indirect=True)
def test_a_failed_farm_fails_the_commit_and_leaves_the_parent(store, tmp_path):
    """cp failing in the farm's thread is raised by commit; abort leaves nothing, generation 1 intact."""
    from sidusd.errors import BackendError
    from sidusd.storage.runner import Runner

    class NoFarm(Runner):
        def run(self, argv, timeout_s=30, **kw):
            if argv[:3] == ["cp", "-a", "-l"]:
                argv = ["cp", "-a", "-l", "/nonexistent-sidus-farm-source", argv[-1]]
            return super().run(argv, timeout_s, **kw)
    before = snapshot(store.path(NAME, 1))
    st = ImageStore(store.dir, NoFarm())
    n, part = st.begin(NAME, 1)
    WRITES["append"](part, tmp_path)
    with pytest.raises(BackendError):
        st.commit(NAME, n, {"kind": "run"})
    st.abort(NAME, n)
    assert st.numbers(NAME) == [1] and st.leftovers(NAME) == () and snapshot(store.path(NAME, 1)) == before
