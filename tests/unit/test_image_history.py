"""Generations' history: dpkg status, diff, own/shared sizes, gc records; the upper layer applied."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from sidusd.boot.booted import BootRecord
from sidusd.image import history, layers
from sidusd.image.generations import ImageStore
from sidusd.storage.runner import RecordingRunner, Result
from tests.conftest import require_root

STATUS = """Package: base-files
Status: install ok installed
Version: 12.4
Architecture: amd64

Package: libc6
Status: install ok installed
Multi-Arch: same
Architecture: amd64
Version: 2.36-9
Description: GNU C Library
 continued: line

Package: gone
Status: deinstall ok config-files
Version: 1.0
"""


def test_parse_status_keeps_installed_packages_and_multiarch_names():
    assert history.parse_status(STATUS) == {"base-files": "12.4", "libc6:amd64": "2.36-9"}


def test_package_diff():
    d = history.package_diff({"a": "1", "b": "1", "c": "1"}, {"b": "2", "c": "1", "d": "3"})
    assert d == {"added": {"d": "3"}, "removed": {"a": "1"}, "upgraded": {"b": ["1", "2"]}}


def _tree(root):
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/share/p").mkdir(parents=True)
    (root / "etc/motd").write_text("hi\n")
    (root / "etc/same").write_text("same\n")
    (root / "usr/share/p/data").write_text("p1\n")
    (root / "var/lib/dpkg/info/p.list").write_text("/.\n/usr\n/usr/share/p\n/usr/share/p/data\n")
    (root / "var/lib/dpkg/status").write_text("Package: p\nStatus: install ok installed\nVersion: 1\n")


def test_diff_shares_inodes_and_reports_files_outside_changed_packages(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a)
    shutil.copytree(a, b, copy_function=os.link)                   # a hard-link farm
    for rel in ("usr/share/p/data", "var/lib/dpkg/status"):        # replaced, as flatten does
        (b / (rel + ".new")).write_text({"usr/share/p/data": "p2\n"}.get(rel, "Package: p\nStatus: install "
                                                                           "ok installed\nVersion: 2\n"))
        os.rename(b / (rel + ".new"), b / rel)
    (b / "etc/new").write_text("n\n")
    (b / "etc/motd").unlink()
    (b / "etc/motd").write_text("hi\n")                            # new inode, same content: unchanged
    os.unlink(b / "etc/same")
    shutil.copy2(a / "etc/same", b / "etc/same")
    os.chmod(b / "etc/same", 0o600)                                # same content, other mode: changed
    d = history.diff(a, b)
    assert d["packages"] == {"added": {}, "removed": {}, "upgraded": {"p": ["1", "2"]}}
    assert d["files"] == [["A", "etc/new"], ["M", "etc/same"]]
    assert d["package_files_changed"] == 1 and d["package_state_changed"] == 1
    assert history.changed_files(a, a) == []


def test_sharing_counts_inodes_several_generations_use_as_shared(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "d").mkdir(parents=True)
    (a / "d/big").write_bytes(os.urandom(1 << 20))
    (a / "d/mine").write_bytes(os.urandom(64 << 10))
    os.link(a / "d/mine", a / "d/mine2")                            # a link inside one generation: own
    (b / "d").mkdir(parents=True)
    os.link(a / "d/big", b / "d/big")
    (b / "d/other").write_bytes(os.urandom(128 << 10))
    s = history.sharing({1: a, 2: b})
    dirs_a = os.lstat(a).st_blocks * 512 + os.lstat(a / "d").st_blocks * 512
    dirs_b = os.lstat(b).st_blocks * 512 + os.lstat(b / "d").st_blocks * 512
    big = os.lstat(a / "d/big").st_blocks * 512
    assert s[1] == (dirs_a + os.lstat(a / "d/mine").st_blocks * 512, big)
    assert s[2] == (dirs_b + os.lstat(b / "d/other").st_blocks * 512, big)


def test_removal_record_names_message_packages_and_machines(tmp_path):
    _tree(tmp_path)
    rec = history.removal_record("deb", 3, {"kind": "run", "message": "add p", "parent": 2, "created": "t0"},
                                 tmp_path, [BootRecord("52:54:00:00:00:01", "deb", str(tmp_path), "vm1", 1.0, 2.0)],
                                 "t1")
    assert rec == {"image": "deb", "generation": 3, "removed": "t1", "kind": "run", "message": "add p",
                   "parent": 2, "created": "t0", "packages": ["p=1"],
                   "booted": [{"mac": "52:54:00:00:00:01", "hostname": "vm1", "last_served": 2.0}]}


def test_apply_upper_whiteouts_opaque_dirs_and_directory_metadata(tmp_path):
    require_root()                                  # whiteouts are char devices, opaque is a trusted xattr
    tree, upper = tmp_path / "tree", tmp_path / "upper"
    for d in ("a/keep", "a/gone-dir", "o/old", "m"):
        (tree / d).mkdir(parents=True)
    (tree / "a/file").write_text("old\n")
    (tree / "a/gone").write_text("x\n")
    (tree / "o/old/f").write_text("hidden\n")
    (tree / "m/f").write_text("stays\n")
    os.utime(tree / "m", ns=(1, 10**18))
    (upper / "a").mkdir(parents=True)
    (upper / "a/file").write_text("new\n")
    os.setxattr(upper / "a/file", "trusted.overlay.origin", b"x")   # overlayfs's own: dropped
    os.mknod(upper / "a/gone", stat.S_IFCHR | 0o000, 0)
    os.mknod(upper / "a/gone-dir", stat.S_IFCHR | 0o000, 0)
    (upper / "o").mkdir()
    os.setxattr(upper / "o", layers.OPAQUE, b"y")
    (upper / "o/new").write_text("only\n")
    (upper / "m").mkdir()
    os.chmod(upper / "m", 0o700)
    os.setxattr(upper / "m", "user.tag", b"t")
    os.utime(upper / "m", ns=(5, 5 * 10**17))
    shared = os.lstat(tree / "a/file").st_ino
    ch = layers.apply_upper(upper, tree)
    assert (tree / "a/file").read_text() == "new\n" and os.lstat(tree / "a/file").st_ino != shared
    assert os.listxattr(tree / "a/file") == []
    assert not (tree / "a/gone").exists() and not (tree / "a/gone-dir").exists() and (tree / "a/keep").is_dir()
    assert sorted(os.listdir(tree / "o")) == ["new"]
    assert layers.OPAQUE not in os.listxattr(tree / "o")
    st = os.lstat(tree / "m")
    assert stat.S_IMODE(st.st_mode) == 0o700 and os.getxattr(tree / "m", "user.tag") == b"t"
    assert st.st_mtime_ns == 5 * 10**17 and (tree / "m/f").read_text() == "stays\n"
    assert (ch.files, ch.removed, ch.dirs) == (2, 2, 3)


def test_begin_falls_back_to_a_full_copy_when_the_overlay_cannot_be_mounted(tmp_path):
    def cp(argv):
        shutil.copytree(argv[-2], argv[-1], symlinks=True)
        return Result(tuple(argv), 0)
    runner = RecordingRunner()
    runner.script(["mount"], rc=32, stderr=b"mount: unknown filesystem type 'overlay'")
    runner.results[("cp",)] = cp
    st = ImageStore(tmp_path / "images", runner)
    n, part = st.begin("x", None)
    (part / "f").write_text("1\n")
    st.commit("x", n, {})
    n, part = st.begin("x", 1)
    assert runner.calls[-1][:3] == ["cp", "-a", "--reflink=auto"]
    assert not layers.layer_dir(part).exists()
    (part / "f").write_text("2\n")
    st.commit("x", n, {})
    assert (st.path("x", 1) / "f").read_text() == "1\n" and (st.path("x", 2) / "f").read_text() == "2\n"
    assert "changes" not in st.meta("x", 2)


@pytest.mark.parametrize("dry_run", [True, False])
def test_gc_dry_run_removes_nothing_and_gc_records_what_it_removed(tmp_path, dry_run):
    from sidusd.image.build import Administrator
    st = ImageStore(tmp_path / "images", RecordingRunner(default_rc=1))     # no overlay: plain dirs
    for i in (1, 2, 3):
        n, part = st.begin("x", None)
        _tree(part)
        st.commit("x", n, {"kind": "run", "message": f"step {i}"})
    adm = Administrator(st.dir, tmp_path / "tftp")
    adm.serve("x", 3)
    root1 = os.path.realpath(st.path("x", 1))
    rec = BootRecord("52:54:00:00:00:09", "x", root1, "old-node", 1.0, 2.0)
    gone = adm.gc("x", keep=1, dry_run=dry_run, booted_by_root={root1: [rec]})
    assert gone == [1, 2]
    log = st.image_dir("x") / "meta" / "removed.jsonl"
    if dry_run:
        assert st.numbers("x") == [1, 2, 3] and not log.exists()
        return
    assert st.numbers("x") == [3]
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert [(r["generation"], r["message"], r["packages"]) for r in lines] == [(1, "step 1", ["p=1"]),
                                                                               (2, "step 2", ["p=1"])]
    assert lines[0]["booted"] == [{"mac": "52:54:00:00:00:09", "hostname": "old-node", "last_served": 2.0}]
    assert lines[1]["booted"] == []


def test_btrfs_du_output_parsed_to_own_and_shared():
    from sidusd.image import btrfs
    text = ("     Total   Exclusive  Set shared  Filename\n"
            "  10485760      4096     10481664  /srv/images/x/gen-0001\n"
            "  10489856      8192     10481664  /srv/images/x/gen 0002\n")
    assert btrfs.parse_du(text) == {"/srv/images/x/gen-0001": (4096, 10481664),
                                    "/srv/images/x/gen 0002": (8192, 10481664)}
