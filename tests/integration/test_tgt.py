"""The iSCSI manager against a real tgtd, checked with a real initiator (libiscsi's iscsi-ls).

tgtd listens on 127.0.0.1 on a high port with its own control port, so it
does not touch a tgtd of the machine.  The initiator is libiscsi's userspace
one (package libiscsi-bin): these machines' kernel has no iscsi_tcp, so the
kernel initiator (iscsiadm/iscsistart) runs in the e2e VM instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import structlog
from conftest import require_root, require_tool
from tgt_control import free_tgt_control_port

from sidusd import config
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.errors import BackendError
from sidusd.storage import iscsi, iscsi_manager
from sidusd.storage.runner import Runner

M1, M2 = "52:54:00:00:10:01", "52:54:00:00:10:02"
PREFIX = "iqn.2026-11.org.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tgtd:
    """One tgtd in the foreground, portal 127.0.0.1:<port>, control port <cport>."""

    def __init__(self, workdir: Path, port: int, cport: int):
        self.workdir, self.port, self.cport = workdir, port, cport
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workdir / f"tgtd-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([require_tool("tgtd"), "-f", "-C", str(self.cport), "--iscsi",
                                      f"portal=127.0.0.1:{self.port}"], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = subprocess.run(["tgtadm", "-C", str(self.cport), "--lld", "iscsi", "--mode", "target",
                                "--op", "show"], capture_output=True)
            if r.returncode == 0:
                return
            assert self.proc.poll() is None, "tgtd exited at start"
            time.sleep(0.1)
        raise AssertionError("tgtd did not answer tgtadm within 60 s")

    def stop(self) -> None:
        """tgtd ignores SIGTERM while it has targets: ask it to shut down, then make sure."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(["tgtadm", "-C", str(self.cport), "--lld", "iscsi", "--mode", "system",
                        "--op", "delete"], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in Path("/var/run/tgtd").glob(f"socket.{self.cport}*"):   # tgtd leaves them behind
            p.unlink(missing_ok=True)


def ls(port: int, initiator: str, user: str | None, secret: str | None, target: str | None = None):
    auth = f"{user}%{secret}@" if user is not None else ""
    url = f"iscsi://{auth}127.0.0.1:{port}" + (f"/{target}/1" if target else "")
    tool = "iscsi-readcapacity16" if target else "iscsi-ls"
    argv = [require_tool(tool), "-i", initiator] + (["-s"] if not target else []) + [url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def lab(tmp_path):
    require_root()
    require_tool("tgtd")
    require_tool("tgtadm")
    require_tool("iscsi-ls")
    port, cport = free_port(), free_tgt_control_port(1000 + os.getpid() % 3000)
    text = f"""
state_dir: {tmp_path / 'state'}
dhcp: {{mode: off}}
tftp: {{root: {tmp_path}}}
iscsi: {{backend: tgt, iqn_prefix: {PREFIX}, default_size_mib: 32, tgt_control_port: {cport},
         portal: 127.0.0.1, port: {port}}}
images:
  demo: {{root: {tmp_path}, kernel: k, initrd: i}}
"""
    cfg = config.parse(text)
    inv = Inventory({"default": Profile("default", "demo"),
                     "persist": Profile("persist", "demo", overlay="iscsi", disk_size_mib=48)},
                    {M1: Host(M1, "persist", hostname="p1"), M2: Host(M2, "persist", hostname="p2")})
    tgtd = Tgtd(tmp_path, port, cport)
    tgtd.start()
    try:
        yield cfg, inv, tgtd, iscsi_manager.IscsiManager(cfg, Runner())
    finally:
        tgtd.stop()


def test_targets_acl_chap_restart_reset_remove(lab, tmp_path):
    cfg, inv, tgtd, mgr = lab
    done = asyncio.run(mgr.apply(cfg, inv))
    assert len(done["created"]) == 2
    secrets = json.loads(cfg.iscsi.secrets_file.read_text())
    d1, d2 = mgr.disk(M1), mgr.disk(M2)
    assert d1.secret == secrets[M1] and d2.secret == secrets[M2] and d1.secret != d2.secret

    # the right initiator with its secret sees exactly its own disk, of the profile's size
    ok = ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, d1.secret, d1.plan.target_iqn)
    assert ok.returncode == 0, ok.stderr
    assert f"Total size:{48 << 20}" in ok.stdout
    disc = ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, d1.secret)
    assert d1.plan.target_iqn in disc.stdout and d2.plan.target_iqn not in disc.stdout

    # refusals: wrong secret, no CHAP at all, host 2 with its own valid credentials on host 1's target
    wrong = d1.secret[:-1] + ("y" if d1.secret.endswith("x") else "x")     # never the secret itself
    assert wrong != d1.secret
    bad = ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, wrong, d1.plan.target_iqn)
    assert bad.returncode != 0 and "Authentication failure" in bad.stdout + bad.stderr
    anon = ls(tgtd.port, d1.plan.initiator_iqn, None, None, d1.plan.target_iqn)
    assert anon.returncode != 0
    other = ls(tgtd.port, d2.plan.initiator_iqn, d2.plan.user, d2.secret, d1.plan.target_iqn)
    assert other.returncode != 0
    other2 = ls(tgtd.port, d1.plan.initiator_iqn, d2.plan.user, d2.secret, d1.plan.target_iqn)
    assert other2.returncode != 0
    assert ls(tgtd.port, d2.plan.initiator_iqn, d2.plan.user, d2.secret, d2.plan.target_iqn).returncode == 0

    # applying again changes nothing live (a booted machine keeps its session)
    again = asyncio.run(mgr.apply(cfg, inv))
    assert again["created"] == [] and sorted(again["kept"]) == sorted([d1.plan.target_iqn, d2.plan.target_iqn])
    assert asyncio.run(mgr.ensure()) is False

    # data on the disk, then tgtd restarts (its targets are gone) and sidusd restores them
    with open(d1.plan.backing_file, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"persistent-marker")
    tgtd.stop()
    tgtd.start()
    assert ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, d1.secret, d1.plan.target_iqn).returncode != 0
    assert asyncio.run(mgr.ensure()) is True
    assert ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, d1.secret, d1.plan.target_iqn).returncode == 0
    with open(d1.plan.backing_file, "rb") as f:
        f.seek(1 << 20)
        assert f.read(17) == b"persistent-marker"

    # a new manager (sidusd restarted) keeps the secrets and the disks
    mgr2 = iscsi_manager.IscsiManager(cfg, Runner())
    asyncio.run(mgr2.apply(cfg, inv))
    assert mgr2.disk(M1).secret == d1.secret
    assert ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, d1.secret, d1.plan.target_iqn).returncode == 0

    info = asyncio.run(mgr2.info(M1))
    assert info["served"] and not info["logged_in"] and info["size_bytes"] == 48 << 20
    assert info["used_bytes"] > 0 and "secret" not in json.dumps(info).lower()
    after = asyncio.run(mgr2.reset(M1))
    assert after["size_bytes"] == 48 << 20 and after["used_bytes"] == 0
    with open(d1.plan.backing_file, "rb") as f:
        f.seek(1 << 20)
        assert f.read(17) == b"\0" * 17

    # host 2 leaves the inventory: its target goes, its disk stays
    asyncio.run(mgr2.apply(cfg, inv.without_host(M2)))
    assert ls(tgtd.port, d2.plan.initiator_iqn, d2.plan.user, d2.secret, d2.plan.target_iqn).returncode != 0
    assert d2.plan.backing_file.exists()
    with pytest.raises(BackendError, match="has no iSCSI disk"):
        asyncio.run(mgr2.info(M2))
    asyncio.run(mgr2.remove_all())
    live = asyncio.run(mgr2.backend.show())
    assert not any(iscsi.MANAGED_MARK in iqn for iqn in live)


def test_sidusctl_disk_ops_through_the_control_socket(lab, tmp_path, capsys):
    """hosts add --persistent / disk / reset-disk / remove --delete-disk, real tgtd behind them."""
    from sidusd import ctl
    from sidusd.boot.inventory import dump_inventory
    from sidusd.control.server import ControlServer
    from sidusd.observability import Observer, setup_logging
    from sidusd.runtime import Runtime, Snapshot

    cfg, inv, tgtd, _ = lab
    base = Inventory(inv.profiles, {M1: inv.hosts[M1]})
    cfg.inventory_file.parent.mkdir(parents=True, exist_ok=True)
    cfg.inventory_file.write_text(dump_inventory(base))
    sock = tmp_path / "control.sock"
    M3 = "52:54:00:00:10:03"

    def sidusctl(*argv: str) -> tuple[int, str, str]:
        rc = ctl.main(["--socket", str(sock), *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    setup_logging("json", "info")      # logs to stderr: stdout is sidusctl's alone

    async def scenario():
        rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, base, 1), observer=Observer(), iscsi_watch_s=0)
        await rt.apply_backends()
        assert rt.backend_status["iscsi"]["ok"], rt.backend_status
        server = ControlServer(rt, {}, socket_path=sock)
        await server.start()
        try:
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "add", M3, "--profile", "default",
                                                   "--persistent")
            assert rc == 1 and "--persistent needs a profile with overlay: iscsi" in err
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "add", M3, "--profile", "persist",
                                                   "--hostname", "p3", "--persistent")
            assert rc == 0, err
            size_line = next(ln for ln in out.splitlines() if ln.startswith("size:"))
            assert "disk-525400001003.img" in out and "48" in size_line, out
            secret3 = rt.iscsi.disk(M3).secret
            assert secret3 not in out
            assert ls(tgtd.port, rt.iscsi.disk(M3).plan.initiator_iqn, rt.iscsi.disk(M3).plan.user, secret3,
                      rt.iscsi.disk(M3).plan.target_iqn).returncode == 0

            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "disk", M3)
            assert rc == 0 and "logged in:   no" in out and secret3 not in out, out
            rc, out, err = await asyncio.to_thread(sidusctl, "--json", "hosts", "disk", M3, "--show-secret")
            assert rc == 0 and json.loads(out)["secret"] == secret3
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "reset-disk", M3)
            assert rc == 0 and out.startswith("disk wiped"), err
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "disk", "52:54:00:00:99:99")
            assert rc == 1 and "has no iSCSI disk" in err

            plan3 = rt.iscsi.disk(M3).plan
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "remove", M3, "--delete-disk")
            assert rc == 0 and "(disk deleted)" in out, err
            assert not plan3.backing_file.exists()
            assert M3 not in json.loads(cfg.iscsi.secrets_file.read_text())
            assert plan3.target_iqn not in await rt.iscsi.backend.show()
            # host 1 untouched
            assert ls(tgtd.port, rt.iscsi.disk(M1).plan.initiator_iqn, rt.iscsi.disk(M1).plan.user,
                      rt.iscsi.disk(M1).secret, rt.iscsi.disk(M1).plan.target_iqn).returncode == 0
        finally:
            await server.stop()
            await rt.remove_backends()

    try:
        asyncio.run(scenario())
    finally:
        structlog.reset_defaults()


def test_sidusctl_rotate_secret_and_clear_conflict_after_a_suspected_theft(lab, tmp_path, capsys):
    """Issue 14 item 14: after a CONFLICT, the admin clears it and rotates the host's CHAP secret;
    the old secret (the thief's copy) no longer logs in to the real tgtd target, the new one does."""
    from sidusd import ctl
    from sidusd.boot.inventory import dump_inventory
    from sidusd.control.server import ControlServer
    from sidusd.observability import Observer, setup_logging
    from sidusd.runtime import Runtime, Snapshot

    cfg, inv, tgtd, _ = lab
    cfg.inventory_file.parent.mkdir(parents=True, exist_ok=True)
    cfg.inventory_file.write_text(dump_inventory(inv))
    sock = tmp_path / "control.sock"

    def sidusctl(*argv: str) -> tuple[int, str, str]:
        rc = ctl.main(["--socket", str(sock), *argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    setup_logging("json", "info")

    async def scenario():
        obs = Observer()
        rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, inv, 1), observer=obs, iscsi_watch_s=0)
        await rt.apply_backends()
        server = ControlServer(rt, {}, socket_path=sock)
        await server.start()
        try:
            d1 = rt.iscsi.disk(M1)
            old = d1.secret
            obs.client_seen(M1, "10.0.0.5")
            obs.client_seen(M1, "10.0.0.66")                 # the spoofed claim: a conflict
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "clear-conflict", M1)
            assert rc == 0 and "claimed from 10.0.0.66, 10.0.0.5; a CONFLICT" in out, (out, err)
            assert obs.clients[M1].as_dict()["conflict"] is False
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "clear-conflict", "52:54:00:00:99:99")
            assert rc == 1 and "no machine with MAC" in err

            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "rotate-secret", M1)
            assert rc == 0 and f"new CHAP secret set on {d1.plan.target_iqn}" in out, (out, err)
            assert '"event": "control.secret_rotated"' in err and old not in err    # the audit line
            new = rt.iscsi.disk(M1).secret
            assert new != old and json.loads(cfg.iscsi.secrets_file.read_text())[M1] == new
            assert new not in out + err and old not in out
            stolen = ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, old, d1.plan.target_iqn)
            assert stolen.returncode != 0 and "Authentication failure" in stolen.stdout + stolen.stderr
            assert ls(tgtd.port, d1.plan.initiator_iqn, d1.plan.user, new, d1.plan.target_iqn).returncode == 0
            assert rt.iscsi_login(M1, "127.0.0.1").secret == new          # the next boot config's
            d2 = rt.iscsi.disk(M2)                                         # host 2 untouched
            assert ls(tgtd.port, d2.plan.initiator_iqn, d2.plan.user, d2.secret, d2.plan.target_iqn).returncode == 0
            rc, out, err = await asyncio.to_thread(sidusctl, "hosts", "rotate-secret", "52:54:00:00:99:99")
            assert rc == 1 and "has no iSCSI disk" in err
        finally:
            await server.stop()
            await rt.remove_backends()

    try:
        asyncio.run(scenario())
    finally:
        structlog.reset_defaults()
