"""Chroot administration on a real bookworm minbase root built by the builder.

The root is bootstrapped once per module with debootstrap (packages cached in
lab-state/image-cache/debootstrap, git-ignored, so later runs reuse the
download).  Every test checks /proc/self/mountinfo: nothing stays mounted
under the images directory after success, failure, Ctrl-C or SIGTERM; the
image lock refuses a second administration; processes left running inside the
root are stopped.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidusd import data
from sidusd.image.build import Administrator, StageFailed
from sidusd.image.chroot import ImageLock, LockBusy, mounts_under, processes_in
from sidusd.image.recipe import read_recipe
from tests.conftest import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "lab-state" / "image-cache" / "debootstrap"
WAIT_S = 300


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require_root()
    require_tool("debootstrap")
    require_tool("chroot")
    base = tmp_path_factory.mktemp("img")
    adm = Administrator(base / "images", base / "tftp", out=io.StringIO(), cache_dir=CACHE)
    number = adm.build(read_recipe(data.RECIPES / "minimal.yaml"))
    assert number == 1
    yield adm
    assert mounts_under(base) == []


def cli(adm: Administrator, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(adm.store.dir),
                           "--tftp-root", str(adm.tftp_root), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=WAIT_S, **kw)


def spawn(adm: Administrator, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sidusd.image", "--images-dir", str(adm.store.dir),
                             "--tftp-root", str(adm.tftp_root), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)


def wait_for(cond, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def partials(adm: Administrator) -> list[str]:
    return [p.name for p in adm.store.image_dir("minimal").iterdir() if p.name.endswith((".partial", ".layer"))]


def test_build_made_a_shared_root(built):
    root = built.store.served_path("minimal")
    assert built.store.current("minimal") == 1 and mounts_under(built.store.dir) == []
    assert not (root / "etc/hostname").exists()
    assert (root / "etc/resolv.conf").read_text().startswith("# sidus: static resolv.conf")
    assert "iface lo inet loopback" in (root / "etc/network/interfaces").read_text()
    assert not (root / "usr/sbin/policy-rc.d").exists()         # only there while administering
    assert (root / "etc/machine-id").read_bytes() == b""
    assert not list((root / "etc").glob("ssh/ssh_host_*"))
    shadow_root = (root / "etc/shadow").read_text().splitlines()[0].split(":")
    assert shadow_root[0] == "root" and shadow_root[1] == "*"       # no password: locked
    log = built.store.log_path("minimal", 1).read_text()
    assert "$ debootstrap" in log and "$ apt-get -q update" in log
    # no fixed name: the boot-time namer is enabled; /etc/hosts names only localhost
    wants = root / "etc/systemd/system/sysinit.target.wants/sidus-hostname.service"
    assert os.readlink(wants) == "/etc/systemd/system/sidus-hostname.service"
    assert os.access(root / "usr/lib/sidus/sidus-hostname", os.X_OK)
    assert "127.0.1.1" not in (root / "etc/hosts").read_text()
    # the security archive (the host's) and -updates; `apt-get update` inside fetched them
    sources = (root / "etc/apt/sources.list").read_text()
    assert " bookworm-updates main" in sources and " bookworm-security main" in sources
    lists = [p.name for p in (root / "var/lib/apt/lists").iterdir()]
    assert any("bookworm-security" in n and n.endswith("_InRelease") for n in lists), lists


def test_run_mounts_policy_and_kills_leftovers(built):
    cmd = ("cat /proc/self/mountinfo > /root/mounts-inside; "
           "/usr/sbin/policy-rc.d; echo policy=$? > /root/policy; "
           "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > /root/leftover-pid; "
           "echo two > /etc/sidus-generation")
    r = cli(built, "run", "minimal", "--", "sh", "-c", cmd)
    assert r.returncode == 0, r.stderr
    n = built.store.current("minimal")
    assert n == 2
    root = built.store.path("minimal", 2)
    inside = (root / "root/mounts-inside").read_text()
    for mp in (" /proc ", " /sys ", " /dev/pts ", " /dev/shm "):
        assert mp in inside, mp
    assert (root / "root/policy").read_text().strip() == "policy=101"
    pid = int((root / "root/leftover-pid").read_text())
    assert processes_in(root) == []
    try:
        assert os.readlink(f"/proc/{pid}/root") != str(root)
    except FileNotFoundError:
        pass                                                        # killed and reaped
    assert mounts_under(built.store.dir) == [] and partials(built) == []
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert not (built.store.path("minimal", 1) / "etc/sidus-generation").exists()   # gen 1 untouched
    meta = built.store.meta("minimal", 2)                   # overlay + hard links: a few files changed
    assert meta["mechanism"] == "overlay+hardlinks" and meta["changes"]["bytes"] < 1 << 20, meta
    g1, g2 = built.store.path("minimal", 1), root
    assert os.stat(g1 / "usr/bin/dpkg").st_ino == os.stat(g2 / "usr/bin/dpkg").st_ino


def test_failed_command_leaves_nothing_and_keeps_serving(built):
    before = built.store.current("minimal")
    with pytest.raises(StageFailed, match="exited with status 3"):
        built.run("minimal", ["sh", "-c", "touch /half-done; exit 3"])
    assert built.store.current("minimal") == before
    assert mounts_under(built.store.dir) == [] and partials(built) == []
    assert not (built.store.served_path("minimal") / "half-done").exists()


@pytest.mark.parametrize("sig,rc", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_interrupt_unmounts_everything(built, sig, rc):
    before = built.store.current("minimal")
    proc = spawn(built, "run", "minimal", "--", "sh", "-c", "sleep 600 & sleep 600")
    try:
        wait_for(lambda: len(mounts_under(built.store.dir)) >= 4, "the chroot mounts", proc)
        wait_for(lambda: processes_in(built.store.image_dir("minimal")), "the command inside", proc)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)   # Ctrl-C hits the group
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == rc, err
    assert mounts_under(built.store.dir) == []
    assert processes_in(built.store.image_dir("minimal")) == []
    assert partials(built) == [] and built.store.current("minimal") == before


def test_lock_refuses_a_second_administration(built):
    with ImageLock(built.store.image_dir("minimal"), "test"):
        r = cli(built, "run", "minimal", "--", "true")
        assert r.returncode == 75 and "busy" in r.stderr and f"pid {os.getpid()}" in r.stderr
        with pytest.raises(LockBusy):
            built.update("minimal")
    proc = spawn(built, "run", "minimal", "--", "sleep", "600")
    try:
        wait_for(lambda: processes_in(built.store.image_dir("minimal")), "the first administration", proc)
        r = cli(built, "update", "minimal")
        assert r.returncode == 75, r.stderr
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mounts_under(built.store.dir) == []


def test_update_list_rollback_gc(built):
    start = built.store.current("minimal")
    r = cli(built, "update", "minimal")
    assert r.returncode == 0, r.stderr
    assert "upgrade" in r.stderr and "served" in r.stderr
    new = built.store.current("minimal")
    assert new > start and mounts_under(built.store.dir) == []
    rows = json.loads(cli(built, "list", "minimal", "--json").stdout)
    assert [r["generation"] for r in rows if r["served"]] == [new]
    assert all(r["size_bytes"] > 10_000_000 for r in rows)          # a real Debian root each
    assert rows[-1]["kind"] == "update"
    r = cli(built, "rollback", "minimal")
    assert r.returncode == 0 and built.store.current("minimal") == start
    r = cli(built, "gc", "minimal", "--keep", "0")
    assert r.returncode == 0, r.stderr
    assert built.store.numbers("minimal") == [start]                 # only the served one is left
    assert cli(built, "rollback", "minimal", "--to", "999").returncode == 1


def test_ctrl_c_during_debootstrap_releases_its_mounts(built, tmp_path):
    """debootstrap mounts /proc and /sys in its target itself: a Ctrl-C in the middle must not leave them."""
    adm = Administrator(tmp_path / "images", tmp_path / "tftp")
    proc = subprocess.Popen([sys.executable, "-m", "sidusd.image", "--images-dir", str(adm.store.dir),
                             "--tftp-root", str(adm.tftp_root), "--cache-dir", str(CACHE),
                             "build", str(data.RECIPES / "minimal.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        wait_for(lambda: mounts_under(tmp_path / "images"), "debootstrap's own mounts", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert mounts_under(tmp_path) == []
    assert processes_in(tmp_path) == []
    assert adm.store.numbers("minimal") == [] and adm.store.current("minimal") is None
    assert not any(p.name.endswith(".partial") for p in adm.store.image_dir("minimal").iterdir())


def test_a_fresh_build_has_no_pending_upgrade(built):
    """Issue 15: "a new image has 11 pending upgrades".  The build's upgrade stage ran the full
    upgrade against -updates and -security; asked again now, inside (apt-get update, then a
    simulated full-upgrade), apt finds nothing to do.  The served generation is the build's or a
    ``run`` over it that installed nothing; the check is a ``run --no-switch``, dropped after."""
    served = built.store.current("minimal")
    r = cli(built, "run", "--no-switch", "minimal", "--", "sh", "-c",
            "apt-get -q update >/dev/null && apt-get -s -o Debug::NoLocking=1 full-upgrade")
    assert r.returncode == 0, r.stderr
    assert "0 upgraded, 0 newly installed, 0 to remove" in r.stderr, r.stderr[-2000:]
    assert "\nInst " not in r.stderr, r.stderr[-2000:]
    check = max(built.store.numbers("minimal"))
    assert built.store.current("minimal") == served != check
    assert cli(built, "drop", "minimal", str(check)).returncode == 0
