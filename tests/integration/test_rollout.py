"""Image rollout to a rack server with real rsync (sidusd.image.rollout; docs/scale.md "Image rollout").

The build host's generations are made as sidus-image publishes them (gen N+1 a hard-link farm of
gen N with the changed files replaced), without a chroot; the "rack" is a local directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import poll_until, require_tool

from sidusd import config
from sidusd.fsutil import atomic_write
from sidusd.image import publish, rollout
from sidusd.image.generations import ImageStore
from sidusd.storage.nfs import plan_exports

MIB = 1024 * 1024


def make_gen(store: ImageStore, tftp: Path, number: int, files: dict[str, bytes], parent: int | None) -> Path:
    d = store.image_dir("demo")
    (d / "meta").mkdir(parents=True, exist_ok=True)
    g = store.path("demo", number)
    if parent is None:
        (g / "boot").mkdir(parents=True)
        (g / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"K" * 4096)
        (g / "boot" / "initrd.img-6.1.0-test").write_bytes(b"I" * 8192)
        (g / "etc").mkdir()
        os.symlink("../boot/vmlinuz-6.1.0-test", g / "etc" / "kernel")
    else:
        subprocess.run(["cp", "-a", "-l", str(store.path("demo", parent)), str(g)], check=True)
    for rel, data in files.items():          # replaced by a new inode, as layers.flatten does
        p = g / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".new")
        tmp.write_bytes(data)
        t = 1_700_000_000 + 60 * number      # written at another time than the parent's file, as a
        os.utime(tmp, (t, t))                # build is: rsync's quick check is size + mtime
        os.replace(tmp, p)
    atomic_write(d / "meta" / f"gen-{number:04d}.json", json.dumps({"parent": parent}).encode())
    publish.publish_generation(g, tftp, "demo", number)
    for f in (publish.tftp_dir(tftp, "demo") / f"gen-{number:04d}").iterdir():
        t = 1_700_000_000 + 60 * number + 1  # published anew per generation: the same kernel, a new mtime
        os.utime(f, (t, t))
    store.switch("demo", number)
    return g


@pytest.fixture
def build(tmp_path):
    require_tool("rsync")
    store = ImageStore(tmp_path / "build" / "images")
    tftp = tmp_path / "build" / "tftp"
    big = os.urandom(8 * MIB)
    make_gen(store, tftp, 1, {"usr/lib/big.bin": big, "etc/motd": b"one\n"}, None)
    return store, tftp, tmp_path / "rack"


def rack_config(rack: Path) -> config.Config:
    text = f"""
dhcp: {{mode: proxy, interfaces: [eth1]}}
tftp: {{root: {rack / 'tftp'}}}
nfs: {{backend: kernel, client_networks: [10.0.0.0/8]}}
images_file: {rack / 'images' / 'images.yaml'}
"""
    path = rack / "sidus.yaml"
    path.write_text(text)
    return config.read(path)             # merges the images file, as sidusd does at start and reload


def served_roots(rack: Path) -> dict[str, str]:
    cfg = rack_config(rack)
    exported = {str(e.path) for e in plan_exports(cfg)}
    return {name: str(img.root) for name, img in cfg.images.items() if str(img.root) in exported}


def cli(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sidusd.image", "--images-dir", str(tmp / "build" / "images"),
            "--tftp-root", str(tmp / "build" / "tftp"), *args]


def test_second_push_sends_only_the_changed_files(build):
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    first = rollout.push(store, tftp, "demo", 1, rack, serve=True)
    assert first.link_dest is None and first.stats.transferred_bytes >= 8 * MIB
    make_gen(store, tftp, 2, {"etc/motd": b"two, a longer line\n", "usr/lib/new.bin": b"N" * 1000}, 1)
    second = rollout.push(store, tftp, "demo", 2, rack, serve=True)
    changed = len(b"two, a longer line\n") + 1000
    # rsync --stats: only the two changed files of the root travel (the boot files, the same
    # contents with a new mtime, do not: compared by checksum)
    assert second.link_dest == 1 and second.stats.files == 2
    assert second.stats.transferred_bytes == changed, second.stats
    g1, g2 = rack.store.path("demo", 1), rack.store.path("demo", 2)
    assert os.stat(g1 / "usr/lib/big.bin").st_ino == os.stat(g2 / "usr/lib/big.bin").st_ino
    assert (g2 / "etc/motd").read_bytes() == b"two, a longer line\n" and (g1 / "etc/motd").read_bytes() == b"one\n"
    assert os.readlink(g2 / "etc" / "kernel") == "../boot/vmlinuz-6.1.0-test"
    assert rack.arrived("demo", verify=True) == [1, 2]
    roots = served_roots(rack_dir)
    assert roots == {"demo": str(g2.resolve()), "demo.gen-1": str(g1.resolve()), "demo.gen-2": str(g2.resolve())}
    assert (rack_dir / "tftp" / "images" / "demo" / "gen-0002" / "vmlinuz").read_bytes() == b"K" * 4096
    again = rollout.push(store, tftp, "demo", 2, rack, serve=True)
    assert again.already and again.stats.transferred_bytes == 0


def rsync_child(pid: int) -> int | None:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):     # push runs each rack's rsync from a thread
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            continue
    for k in kids:
        try:
            if Path(f"/proc/{k}/comm").read_text().strip() == "rsync":
                return int(k)
        except OSError:
            continue
    return None


def interrupted_push(tmp_path: Path, rack_dir: Path) -> tuple[int, str]:
    """``sidus-image push demo 2`` with its rsync killed (SIGKILL) in the middle of big.bin."""
    proc = subprocess.Popen(cli(tmp_path, "push", "demo", "2", "--to", str(rack_dir), "--rsync-arg=--bwlimit=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = rack_dir / "images" / "demo" / "gen-0002.incoming"
    try:
        # the root's rsync is under way (the boot files went first) and has written part of big.bin
        assert poll_until(lambda: staging.is_dir() and any(
            p.name.startswith(".big.bin") and p.stat().st_size > 0 for p in (staging / "usr/lib").glob(".big.bin*"))
            if (staging / "usr/lib").is_dir() else False, timeout_s=60), "rsync never started writing"
        pid = rsync_child(proc.pid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out + err


def test_interrupted_push_is_never_served_and_the_next_push_completes_it(build, tmp_path):
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=True)
    make_gen(store, tftp, 2, {"usr/lib/big.bin": os.urandom(12 * MIB), "usr/lib/other.bin": os.urandom(MIB)}, 1)
    rc, err = interrupted_push(tmp_path, rack_dir)
    assert rc == 1, err
    assert "does not serve it" in err
    assert not rack.store.path("demo", 2).exists() and rack.marker("demo", 2) is None
    assert rack.arrived("demo") == [1]
    roots = served_roots(rack_dir)
    assert roots == {"demo": str(rack.store.path("demo", 1).resolve()),
                     "demo.gen-1": str(rack.store.path("demo", 1).resolve())}
    assert not any("incoming" in r for r in roots.values())
    # a rescan does not let it in either
    r = subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(rack_dir / "images"),
                        "--tftp-root", str(rack_dir / "tftp"), "rack-scan", str(rack_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}
    # the next push resumes into the same staging directory and completes it
    done = subprocess.run(cli(tmp_path, "push", "demo", "2", "--to", str(rack_dir)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "generation 2 arrived" in done.stdout and "served" in done.stdout
    assert rack.arrived("demo", verify=True) == [1, 2] and not (rack_dir / "images/demo/gen-0002.incoming").exists()
    assert served_roots(rack_dir)["demo"] == str(rack.store.path("demo", 2).resolve())
    assert (rack.store.path("demo", 2) / "usr/lib/big.bin").read_bytes() == \
        (store.path("demo", 2) / "usr/lib/big.bin").read_bytes()


def test_a_generation_without_a_valid_marker_or_changed_on_the_rack_is_not_served(build):
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=True)
    make_gen(store, tftp, 2, {"etc/motd": b"two\n"}, 1)
    rollout.push(store, tftp, "demo", 2, rack, serve=False)
    assert set(served_roots(rack_dir)) == {"demo", "demo.gen-1", "demo.gen-2"}
    assert served_roots(rack_dir)["demo"].endswith("gen-0001")            # --no-serve: the rack keeps gen 1
    # copied by hand (no marker) -> not served; a torn marker -> not served
    shutil.copytree(rack.store.path("demo", 2), rack.store.path("demo", 3), symlinks=True)
    shutil.copytree(rack.boot_dir("demo", 2), rack.boot_dir("demo", 3))
    rack.write_images_file()
    assert "demo.gen-3" not in served_roots(rack_dir)
    rack.marker_path("demo", 3).write_bytes(rack.marker_path("demo", 2).read_bytes()[:40])
    rack.write_images_file()
    assert "demo.gen-3" not in served_roots(rack_dir)
    # a file of an arrived generation changed on the rack: the verifying scan drops it (gen 2's
    # own motd; gen 1, which does not share that file, stays)
    motd1, motd2 = (rack.store.path("demo", n) / "etc/motd" for n in (1, 2))
    assert os.stat(motd1).st_ino != os.stat(motd2).st_ino
    (rack.store.path("demo", 2) / "etc/motd").write_bytes(b"tampered\n")
    rack.write_images_file(verify=True)
    assert set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}


def test_a_crash_between_rename_and_marker_is_not_served_and_resumed_without_resending(build):
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=False)
    rack.marker_path("demo", 1).unlink()            # renamed into place, marker never written
    rack.write_images_file()
    assert served_roots(rack_dir) == {} and rack.arrived("demo") == []
    res = rollout.push(store, tftp, "demo", 1, rack, serve=True)
    assert not res.already and res.stats.files == 0 and res.stats.transferred_bytes == 0, res
    assert rack.arrived("demo", verify=True) == [1] and set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}


def test_a_rack_sidusd_serves_only_arrived_generations_across_reloads(build, tmp_path):
    """The real sidusd of a rack: its images_file is the rack's; the boot config it renders names
    gen 1 while gen 2's push is interrupted, gen 2 once it arrived (after `sidusctl reload`)."""
    from daemon_fixture import SidusDaemon, base_config, populate_tftp_root
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=True)
    rack_tmp = tmp_path / "racksidusd"
    rack_tmp.mkdir()
    d = SidusDaemon(rack_tmp)
    cfg = base_config(rack_tmp, d.tftp_port)
    populate_tftp_root(rack_dir / "tftp", image="stand-in")
    cfg.pop("images")
    cfg["tftp"]["root"] = str(rack_dir / "tftp")
    cfg["images_file"] = str(rack.images_file)
    d.config = cfg
    d.write_config(cfg)
    pxe = "pxelinux.cfg/01-52-54-00-00-00-01"
    g1, g2 = (str(rack.store.path("demo", n).resolve()) for n in (1, 2))
    with d:
        body = d.tftp_get(pxe).decode()
        assert f"nfsroot=10.13.20.1:{g1}," in body and "images/demo/gen-0001/vmlinuz" in body
        assert d.tftp_get("images/demo/gen-0001/vmlinuz") == b"K" * 4096
        make_gen(store, tftp, 2, {"usr/lib/big.bin": os.urandom(12 * MIB)}, 1)
        rc, err = interrupted_push(tmp_path, rack_dir)
        assert rc == 1, err
        d.ctl("reload")
        body = d.tftp_get(pxe).decode()
        assert f"nfsroot=10.13.20.1:{g1}," in body and "gen-0002" not in body
        assert rollout.push(store, tftp, "demo", 2, rack, serve=True).generation == 2
        d.ctl("reload")
        body = d.tftp_get(pxe).decode()
        assert f"nfsroot=10.13.20.1:{g2}," in body and "images/demo/gen-0002/initrd.img" in body


def test_a_crash_between_the_two_renames_is_resumed(build):
    """Boot files renamed into place, the root still in staging, no marker: not served, and the
    next push completes it (the final boot directory is taken back, not in the way)."""
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=True)
    make_gen(store, tftp, 2, {"etc/motd": b"two\n"}, 1)
    rollout.push(store, tftp, "demo", 2, rack, serve=False)
    rack.marker_path("demo", 2).unlink()
    os.rename(rack.store.path("demo", 2), rack_dir / "images" / "demo" / "gen-0002.incoming")
    rack.write_images_file()
    assert set(served_roots(rack_dir)) == {"demo", "demo.gen-1"} and rack.boot_dir("demo", 2).is_dir()
    res = rollout.push(store, tftp, "demo", 2, rack, serve=True)
    assert res.stats.transferred_bytes == 0 and rack.arrived("demo", verify=True) == [1, 2]
    assert served_roots(rack_dir)["demo"] == str(rack.store.path("demo", 2).resolve())


def test_a_second_push_to_the_same_rack_image_is_refused_while_one_runs(build, tmp_path):
    from sidusd.image.chroot import ImageLock
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    with ImageLock(rack.store.image_dir("demo"), "push of generation 1"):
        r = subprocess.run(cli(tmp_path, "push", "demo", "--to", str(rack_dir)), capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 75 and "busy" in r.stderr, (r.returncode, r.stderr)
    assert rack.arrived("demo") == [] and not (rack_dir / "images" / "demo" / "gen-0001.incoming").exists()


def test_a_rack_that_fails_does_not_stop_the_push_to_the_next_racks(build, tmp_path):
    """`push --to A --to B` with A busy (its lock held) and C not a directory one can write: B
    still gets the generation and serves it; the exit status says a rack failed, each named."""
    from sidusd.image.chroot import ImageLock
    store, tftp, rack_a = build
    rack_b, rack_c = tmp_path / "rack-b", tmp_path / "rack-c"
    rack_c.write_text("not a directory\n")
    with ImageLock(rollout.Rack(rack_a).store.image_dir("demo"), "push of generation 1"):
        r = subprocess.run(cli(tmp_path, "push", "demo", "--to", str(rack_a), "--to", str(rack_c),
                               "--to", str(rack_b)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"{rack_a}: image demo is busy" in r.stderr and f"{rack_c}:" in r.stderr, r.stderr
    assert f"{rack_b}: demo generation 1 arrived" in r.stdout, r.stdout
    assert rollout.Rack(rack_b).arrived("demo", verify=True) == [1]
    assert set(served_roots(rack_b)) == {"demo", "demo.gen-1"}
    assert rollout.Rack(rack_a).arrived("demo") == []


def test_racks_are_pushed_side_by_side(build, tmp_path):
    """`push --to A --to B` (slowed by --bwlimit): both racks' rsyncs write at the same moment,
    so a slow rack does not hold back the next one; both then serve the generation."""
    store, tftp, rack_a = build
    rack_b = tmp_path / "rack-b"
    for rd in (rack_a, rack_b):
        rollout.push(store, tftp, "demo", 1, rollout.Rack(rd), serve=True)
    make_gen(store, tftp, 2, {"usr/lib/big.bin": os.urandom(3 * MIB)}, 1)

    def writing(rd: Path) -> bool:
        lib = rd / "images" / "demo" / "gen-0002.incoming" / "usr" / "lib"
        return lib.is_dir() and any(p.stat().st_size > 0 for p in lib.glob(".big.bin*"))

    proc = subprocess.Popen(cli(tmp_path, "push", "demo", "--to", str(rack_a), "--to", str(rack_b),
                                "--rsync-arg=--bwlimit=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: list[bool] = []
        poll_until(lambda: bool(seen.append(writing(rack_a) and writing(rack_b)) or seen[-1])
                   or proc.poll() is not None, timeout_s=60)
        both = any(seen)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert both, "the second rack's rsync did not run beside the first's"
    assert proc.returncode == 0, out + err
    for rd in (rack_a, rack_b):
        assert f"{rd}: demo generation 2 arrived" in out, out
        assert rollout.Rack(rd).arrived("demo", verify=True) == [1, 2]


def test_ctrl_c_during_a_push_to_two_racks_stops_both_and_serves_neither(build, tmp_path):
    """SIGINT while two racks' rsyncs run side by side: push exits 130, no rsync of it is left,
    neither rack has the generation in place or a marker, both keep serving gen 1."""
    store, tftp, rack_a = build
    rack_b = tmp_path / "rack-b"
    for rd in (rack_a, rack_b):
        rollout.push(store, tftp, "demo", 1, rollout.Rack(rd), serve=True)
    make_gen(store, tftp, 2, {"usr/lib/big.bin": os.urandom(12 * MIB)}, 1)

    def writing(rd: Path) -> bool:
        lib = rd / "images" / "demo" / "gen-0002.incoming" / "usr" / "lib"
        return lib.is_dir() and any(p.stat().st_size > 0 for p in lib.glob(".big.bin*"))

    proc = subprocess.Popen(cli(tmp_path, "push", "demo", "--to", str(rack_a), "--to", str(rack_b),
                                "--rsync-arg=--bwlimit=1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert poll_until(lambda: writing(rack_a) and writing(rack_b), timeout_s=60)
        kids = [k for task in Path(f"/proc/{proc.pid}/task").glob("*/children") for k in task.read_text().split()]
        rsyncs = [int(k) for k in kids if Path(f"/proc/{k}/comm").read_text().strip() == "rsync"]
        assert len(rsyncs) == 2, kids
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert poll_until(lambda: not any(Path(f"/proc/{p}").exists() for p in rsyncs), timeout_s=10), rsyncs
    for rd in (rack_a, rack_b):
        rack = rollout.Rack(rd)
        assert rack.marker("demo", 2) is None and not rack.store.path("demo", 2).exists()
        assert set(served_roots(rd)) == {"demo", "demo.gen-1"}
