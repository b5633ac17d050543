"""``sidus-image push --to host:/path``: a push to a rack over ssh (sidusd/image/rollout_remote.py;
docs/scale.md "Image rollout").

A real OpenSSH server (Debian's openssh-server) in a network namespace the test makes, listening on
that namespace's loopback only; the push runs inside the same namespace (no packet leaves it).  The
rack's steps after rsync (the manifest check, the renames, the marker, the images file) run on the
rack side, in ``sidus-image rack-receive`` over the same ssh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import poll_until, require_root, require_tool
from test_rollout import build, cli, make_gen, rsync_child, served_roots  # noqa: F401 -- build: the fixture

from bench.racksroll import SSHD, sshd_setup
from sidusd.image import rollout
from tests.netns import NetNs

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
PORT = 2222

pytestmark = pytest.mark.netns


class Sshd:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ns = NetNs("sidus-t-ssh")
        self.proc: subprocess.Popen | None = None
        self.ssh: list[str] = []

    def start(self) -> None:
        cfg, self.ssh = sshd_setup(self.tmp, ["127.0.0.1"], PORT)
        self.ns.__enter__()
        log = open(self.tmp / "sshd.log", "ab")
        self.proc = self.ns.popen([_sshd(), "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        assert poll_until(lambda: self.ns.run(*self.ssh, "root@127.0.0.1", "true", check=False,
                                              timeout=30).returncode == 0, timeout_s=30), \
            (self.tmp / "sshd.log").read_text()

    def push_args(self, rack: Path) -> list[str]:
        return ["--to", f"root@127.0.0.1:{rack}", "--ssh", " ".join(self.ssh),
                "--remote-cmd", f"env PYTHONPATH={REPO} {sys.executable} -m sidusd.image"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.ns.close()


def _sshd() -> str:
    return SSHD or require_tool("sshd")          # Debian's openssh-server (scripts/setup)


@pytest.fixture
def sshd(tmp_path):
    require_root()
    for tool in ("ssh", "ssh-keygen", "rsync", "ip"):
        require_tool(tool)
    _sshd()
    d = tmp_path / "ssh"
    d.mkdir()
    s = Sshd(d)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def test_push_over_ssh_sends_only_the_changed_files_and_the_rack_side_commits(build, sshd, tmp_path):  # noqa: F811 -- build: test_rollout's fixture
    store, tftp, rack_dir = build
    t0 = time.monotonic()
    r = sshd.ns.run(*cli(tmp_path, "push", "demo", *sshd.push_args(rack_dir)), timeout=120, cwd=REPO)
    t1 = time.monotonic()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generation 1 arrived" in r.stdout and "(full copy); served" in r.stdout, r.stdout
    make_gen(store, tftp, 2, {"etc/motd": b"two, a longer line\n", "usr/lib/new.bin": b"N" * 1000}, 1)
    t2 = time.monotonic()
    r = sshd.ns.run(*cli(tmp_path, "push", "demo", *sshd.push_args(rack_dir)), timeout=120, cwd=REPO)
    print(f"\npush over ssh: generation 1 (8 MiB, full copy) {t1 - t0:.2f} s, generation 2 (2 files) "
          f"{time.monotonic() - t2:.2f} s, load {os.getloadavg()[0]:.1f}")
    assert r.returncode == 0, r.stdout + r.stderr
    changed = len(b"two, a longer line\n") + 1000
    assert f"2 file(s), {changed} bytes sent (unchanged files linked from generation 1); served" in r.stdout, r.stdout
    rack = rollout.Rack(rack_dir)
    g1, g2 = rack.store.path("demo", 1), rack.store.path("demo", 2)
    assert os.stat(g1 / "usr/lib/big.bin").st_ino == os.stat(g2 / "usr/lib/big.bin").st_ino
    assert rack.arrived("demo", verify=True) == [1, 2]
    marker = json.loads(rack.marker_path("demo", 2).read_bytes())
    assert marker["source"] == str(store.path("demo", 2)), marker
    assert served_roots(rack_dir) == {"demo": str(g2.resolve()), "demo.gen-1": str(g1.resolve()),
                                      "demo.gen-2": str(g2.resolve())}


def test_an_interrupted_push_over_ssh_is_never_served_and_resumes(build, sshd, tmp_path):  # noqa: F811 -- build: test_rollout's fixture
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    r = sshd.ns.run(*cli(tmp_path, "push", "demo", *sshd.push_args(rack_dir)), timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    make_gen(store, tftp, 2, {"usr/lib/big.bin": os.urandom(12 * MIB)}, 1)
    proc = sshd.ns.popen(cli(tmp_path, "push", "demo", *sshd.push_args(rack_dir), "--rsync-arg=--bwlimit=1000"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lib = rack_dir / "images" / "demo" / "gen-0002.incoming" / "usr" / "lib"
    try:
        assert poll_until(lambda: lib.is_dir() and any(p.stat().st_size > 0 for p in lib.glob(".big.bin*")),
                          timeout_s=60), "rsync never started writing"
        pid = rsync_child(proc.pid)                  # `ip netns exec` execs: the push's own pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, out + err
    assert "does not serve it" in err, err
    assert not rack.store.path("demo", 2).exists() and rack.marker("demo", 2) is None
    assert set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}
    assert served_roots(rack_dir)["demo"] == str(rack.store.path("demo", 1).resolve())
    # the rack side went away with the session (its lock is free): the next push completes it
    t = time.monotonic()
    r = sshd.ns.run(*cli(tmp_path, "push", "demo", *sshd.push_args(rack_dir)), timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr + f" after {time.monotonic() - t:.1f} s"
    assert rack.arrived("demo", verify=True) == [1, 2]
    assert (rack.store.path("demo", 2) / "usr/lib/big.bin").read_bytes() == \
        (store.path("demo", 2) / "usr/lib/big.bin").read_bytes()
    assert served_roots(rack_dir)["demo"] == str(rack.store.path("demo", 2).resolve())


def _receive(tmp_path: Path, rack_dir: Path, manifest: str, entries: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sidusd.image", "--images-dir", str(rack_dir / "images"),
                             "--tftp-root", str(rack_dir / "tftp"), "rack-receive", str(rack_dir), "demo", "2",
                             "--parent", "1", "--manifest", manifest, "--entries", str(entries)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_the_rack_side_commits_only_what_matches_the_manifest_and_only_when_told(build, tmp_path):  # noqa: F811 -- build: test_rollout's fixture
    """rack-receive alone (what push runs over ssh): a session that ends without "commit" leaves
    the generation in staging; a tree that differs from the build host's manifest (here: one file
    short) is refused; neither is served.  The right manifest then commits it."""
    store, tftp, rack_dir = build
    rack = rollout.Rack(rack_dir)
    rollout.push(store, tftp, "demo", 1, rack, serve=True)
    make_gen(store, tftp, 2, {"etc/motd": b"two\n"}, 1)
    from sidusd.image import publish
    src_boot = publish.tftp_dir(tftp, "demo") / "gen-0002"
    manifest, count = rollout.tree_manifest(store.path("demo", 2), src_boot)

    p = _receive(tmp_path, rack_dir, manifest, count)
    plan = json.loads(p.stdout.readline())["plan"]
    assert plan["link_dest"] == 1 and plan["staging_root"].endswith("gen-0002.incoming"), plan
    for src, stg in ((src_boot, plan["staging_boot"]), (store.path("demo", 2), plan["staging_root"])):
        subprocess.run(["rsync", "-aH", "--numeric-ids", f"{src}/", f"{stg}/"], check=True)
    os.unlink(Path(plan["staging_root"]) / "etc/motd")           # one file short of what was pushed
    p.stdin.write("commit\n")
    p.stdin.flush()
    answer = json.loads(p.stdout.readline())
    assert p.wait(60) == 1 and "differs from the source" in answer["error"], answer
    assert rack.marker("demo", 2) is None and set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}

    p = _receive(tmp_path, rack_dir, manifest, count)                # the session dies before "commit"
    json.loads(p.stdout.readline())
    p.stdin.close()
    assert p.wait(60) == 1 and "went away" in p.stderr.read()
    assert rack.marker("demo", 2) is None and set(served_roots(rack_dir)) == {"demo", "demo.gen-1"}

    subprocess.run(["rsync", "-aH", "--numeric-ids", f"{store.path('demo', 2)}/", plan["staging_root"] + "/"],
                   check=True)
    p = _receive(tmp_path, rack_dir, manifest, count)
    json.loads(p.stdout.readline())
    out, _ = p.communicate("commit\n", timeout=60)
    assert p.returncode == 0 and json.loads(out) == {"ok": True, "served": True}, out
    assert rack.arrived("demo", verify=True) == [1, 2]
    assert served_roots(rack_dir)["demo"] == str(rack.store.path("demo", 2).resolve())
