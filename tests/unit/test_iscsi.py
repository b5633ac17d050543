"""iSCSI disks of persistent hosts: plan, secrets, tgt and LIO command plans, render, runtime.

The tgt plan is also run against a real tgtd in tests/integration/test_tgt.py;
here the commands are checked with a RecordingRunner and a golden
``tgtadm --op show`` text captured from tgt 1.0.85 (Debian 12).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys

import pytest
import structlog

from sidusd import config
from sidusd.boot import inventory as inv_mod
from sidusd.boot import render
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.errors import BackendError, InventoryError
from sidusd.observability import Observer, setup_logging
from sidusd.runtime import Runtime, Snapshot
from sidusd.storage import iscsi, iscsi_manager
from sidusd.storage.runner import RecordingRunner

M1, M2, M3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"


def cfg_text(state: str, backend: str = "tgt") -> str:
    return f"""
state_dir: {state}
dhcp: {{mode: proxy, interfaces: [eth1]}}
tftp: {{root: /srv/tftp}}
iscsi: {{backend: {backend}, iqn_prefix: iqn.2026-11.org.example, default_size_mib: 64}}
images:
  demo: {{root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img}}
"""


def make_inv() -> Inventory:
    return Inventory(
        {"default": Profile("default", "demo"),
         "persist": Profile("persist", "demo", overlay="iscsi", disk_size_mib=128, fallback="stop"),
         "small": Profile("small", "demo", overlay="iscsi")},
        {M1: Host(M1, "persist", hostname="vm1"), M2: Host(M2, "small", hostname="vm2"),
         M3: Host(M3, "default", hostname="vm3")})


@pytest.fixture
def cfg(tmp_path):
    return config.parse(cfg_text(str(tmp_path / "state")))


# -- plan ---------------------------------------------------------------------

def test_plan_only_iscsi_hosts_with_their_names_and_sizes(cfg, tmp_path):
    plans = iscsi.plan_disks(cfg, make_inv())
    assert [p.mac for p in plans] == [M1, M2]
    p1, p2 = plans
    assert p1.target_iqn == "iqn.2026-11.org.example:sidus-disk-525400000001"
    assert p1.initiator_iqn == "iqn.2026-11.org.example:sidus-host-525400000001"
    assert p1.user == "sidus-525400000001"
    assert p1.size_bytes == 128 << 20 and p2.size_bytes == 64 << 20   # profile, then config default
    assert p1.backing_file == tmp_path / "state" / "iscsi" / "disk-525400000001.img"
    for p in plans:
        iscsi.check_iqn("t", p.target_iqn)
        iscsi.check_iqn("i", p.initiator_iqn)


def test_inventory_iscsi_needs_a_backend_and_cannot_be_the_unknown_hosts_profile(tmp_path):
    inv = make_inv()
    inv_mod.check_against(inv, config.parse(cfg_text(str(tmp_path))))
    with pytest.raises(InventoryError, match="set iscsi.backend"):
        inv_mod.check_against(inv, config.parse(cfg_text(str(tmp_path), backend="none")))
    bad = Inventory({"default": Profile("default", "demo", overlay="iscsi")}, {})
    with pytest.raises(InventoryError, match="cannot be boot.default_profile"):
        inv_mod.check_against(bad, config.parse(cfg_text(str(tmp_path))))


@pytest.mark.parametrize("text,path,reason", [
    ("profiles: {p: {image: demo, overlay: tmpfs, disk_size_mib: 64}}", "profiles.p.disk_size_mib", "iscsi only"),
    ("profiles: {p: {image: demo, overlay: tmpfs, fallback: stop}}", "profiles.p.fallback", "iscsi only"),
    ("profiles: {p: {image: demo, overlay: iscsi, fallback: shell}}", "profiles.p.fallback", "must be one of"),
    ("profiles: {p: {image: demo, overlay: iscsi, disk_size_mib: 1}}", "profiles.p.disk_size_mib", "out of range"),
    ("profiles: {p: {image: demo, overlay: iscsi, disk_size_mib: '64'}}", "profiles.p.disk_size_mib",
     "expected an integer"),
])
def test_inventory_iscsi_keys_are_strict(text, path, reason):
    with pytest.raises(InventoryError) as exc:
        inv_mod.parse_inventory(text)
    assert exc.value.path == path and reason in exc.value.reason


def test_inventory_iscsi_profile_round_trips():
    inv = make_inv()
    back = inv_mod.parse_inventory(inv_mod.dump_inventory(inv))
    assert back == inv
    assert back.profiles["persist"].fallback == "stop" and back.profiles["persist"].disk_size_mib == 128


# -- secrets ------------------------------------------------------------------

def test_secrets_are_long_private_stable_and_distinct(tmp_path):
    store = iscsi.SecretStore(tmp_path / "d" / "secrets.json")
    a = store.ensure([M1, M2])
    assert set(a) == {M1, M2} and a[M1] != a[M2]
    assert all(len(s) >= 16 and len(s.encode()) >= 16 for s in a.values())
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.ensure([M2, M1]) == a                       # stable
    new = store.rotate(M1)
    assert new != a[M1] and store.load()[M1] == new and store.load()[M2] == a[M2]
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    store.forget(M1)
    assert M1 not in store.load()


def test_a_corrupt_secrets_file_is_refused_without_echoing_it(tmp_path):
    path = tmp_path / "secrets.json"
    path.write_text('{"52:54:00:00:00:01": "hunter2-hunter2-hunter2", oops')
    with pytest.raises(BackendError) as exc:
        iscsi.SecretStore(path).load()
    assert "hunter2" not in str(exc.value) + str(exc.value.detail or "")
    path.write_text('["not", "a", "map"]')
    with pytest.raises(BackendError, match="not a JSON object"):
        iscsi.SecretStore(path).load()


def test_disk_repr_hides_the_secret(cfg):
    plan = iscsi.plan_disks(cfg, make_inv())[0]
    d = iscsi.Disk(plan, "s3cr3t-s3cr3t-s3cr3t")
    assert "s3cr3t" not in repr(d)
    login = render.IscsiLogin("iqn.2026-11.org.x:sidus-disk-1", "10.0.0.1", 3260, "iqn.2026-11.org.x:h",
                              "u", "s3cr3t-s3cr3t-s3cr3t")
    assert "s3cr3t" not in repr(login)


def test_backing_file_is_sparse_private_and_created_once(tmp_path):
    path = tmp_path / "d" / "disk.img"
    assert iscsi_manager.create_backing_file(path, 64 << 20)
    st = path.stat()
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 1 << 20
    assert stat.S_IMODE(st.st_mode) == 0o600
    path.write_bytes(b"data")
    assert not iscsi_manager.create_backing_file(path, 64 << 20)
    assert path.read_bytes() == b"data"


# -- tgt ----------------------------------------------------------------------

SHOW = """\
Target 1: iqn.2026-11.org.example:sidus-disk-525400000001
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 1
            Initiator: iqn.2026-11.org.example:sidus-host-525400000001 alias: none
            Connection: 0
                IP Address: 10.0.0.5
    LUN information:
        LUN: 0
            Type: controller
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            Size: 67 MB, Block size: 512
            Backing store type: rdwr
            Backing store path: {state}/iscsi/disk-525400000001.img
            Backing store flags: 
    Account information:
        sidus-525400000001
    ACL information:
        iqn.2026-11.org.example:sidus-host-525400000001
Target 2: iqn.2001-04.com.example:someone-elses
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
        ALL
Target 3: iqn.2026-11.org.example:sidus-disk-5254000000ff
    System information:
        Driver: iscsi
    I_T nexus information:
    LUN information:
    Account information:
        sidus-5254000000ff
    ACL information:
        iqn.2026-11.org.example:sidus-host-5254000000ff
"""


def test_parse_tgt_show(tmp_path):
    t = iscsi.parse_tgt_show(SHOW.format(state=tmp_path))
    assert sorted(x.tid for x in t.values()) == [1, 2, 3]
    one = t["iqn.2026-11.org.example:sidus-disk-525400000001"]
    assert one.backing == [f"{tmp_path}/iscsi/disk-525400000001.img"]
    assert one.accounts == ["sidus-525400000001"] and one.sessions == 1
    assert one.acls == ["iqn.2026-11.org.example:sidus-host-525400000001"]
    assert t["iqn.2001-04.com.example:someone-elses"].acls == ["ALL"]
    assert iscsi.parse_tgt_show("garbage\n\x00\nTarget x: y\n") == {}


def test_create_commands_admit_the_initiator_last_and_never_open(cfg):
    d = iscsi.Disk(iscsi.plan_disks(cfg, make_inv())[0], "secret-secret-secret-1")
    cmds = iscsi.tgt_create_commands(7, d)
    ops = [(c[1], c[3]) for c in cmds]
    assert ops == [("account", "delete"), ("account", "new"), ("target", "new"), ("logicalunit", "new"),
                   ("account", "bind"), ("target", "bind")]
    assert cmds[-1][-2:] == ["--initiator-name", d.plan.initiator_iqn]
    assert not any("ALL" in c or "--initiator-address" in c for c in cmds)


def run_apply(backend, disks, refresh=()):
    return asyncio.run(backend.apply(disks, refresh))


def test_tgt_apply_keeps_matching_removes_stale_creates_missing(tmp_path):
    cfg = config.parse(cfg_text(str(tmp_path / "state")))
    r = RecordingRunner()
    r.script(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "target", "--op", "show"],
             stdout=SHOW.format(state=tmp_path / "state").encode())
    disks = [iscsi.Disk(p, f"secret-for-{p.user}") for p in iscsi.plan_disks(cfg, make_inv())]
    done = run_apply(iscsi.TgtBackend(r), disks)
    assert done == {"created": [disks[1].plan.target_iqn], "kept": [disks[0].plan.target_iqn],
                    "removed": ["iqn.2026-11.org.example:sidus-disk-5254000000ff"]}
    calls = [c[5:] for c in r.calls]
    assert ["--mode", "target", "--op", "delete", "--force", "--tid", "3"] in calls
    assert not any("--tid" in c and c[c.index("--tid") + 1] in ("1", "2") for c in calls[1:])  # kept + foreign
    # the new target gets the lowest free tid (1 and 2 are live)
    assert ["--mode", "target", "--op", "new", "--tid", "3", "--targetname", disks[1].plan.target_iqn] in calls

    r.calls.clear()
    run_apply(iscsi.TgtBackend(r), disks, refresh=[disks[0].plan.target_iqn])   # new secret for vm1
    calls = [c[5:] for c in r.calls]
    assert ["--mode", "account", "--op", "new", "--user", "sidus-525400000001", "--password",
            "secret-for-sidus-525400000001"] in calls
    assert ["--mode", "account", "--op", "bind", "--tid", "1", "--user", "sidus-525400000001"] in calls
    assert not any(c[1:4] == ["target", "--op", "delete"] and c[-1] == "1" for c in calls)


def test_tgt_failure_is_reported_without_the_password(tmp_path, cfg):
    r = RecordingRunner()
    r.script(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "account", "--op", "new"], rc=22,
             stderr=b"tgtadm: invalid request")
    d = iscsi.Disk(iscsi.plan_disks(cfg, make_inv())[0], "do-not-show-this-secret")
    with pytest.raises(BackendError) as exc:
        run_apply(iscsi.TgtBackend(r), [d])
    assert "do-not-show-this-secret" not in f"{exc.value} {exc.value.detail}"
    assert "account --op new" in str(exc.value)


def test_tgt_not_running_is_a_backend_error(cfg):
    r = RecordingRunner()
    r.script(["tgtadm"], rc=107, stderr=b"tgtadm: can't send the request to the tgt daemon")
    with pytest.raises(BackendError, match="failed"):
        asyncio.run(iscsi.TgtBackend(r).show())


# -- LIO plan -----------------------------------------------------------------

def test_lio_plan_has_auth_on_acl_only_and_the_secret_in_one_place(cfg):
    d = iscsi.Disk(iscsi.plan_disks(cfg, make_inv())[0], "lio-secret-lio-secret")
    cmds = iscsi.lio_commands(d, portal="10.0.0.1", port=3260)
    flat = [" ".join(c) for c in cmds]
    assert all(c[0] == "targetcli" for c in cmds)
    attrs = next(c for c in cmds if "attribute" in c)
    assert {"authentication=1", "generate_node_acls=0", "demo_mode_write_protect=1"} <= set(attrs)
    acl_i = next(i for i, c in enumerate(cmds) if c[1].endswith("/acls") and c[2] == "create")
    assert d.plan.initiator_iqn in cmds[acl_i]
    assert cmds.index(attrs) < acl_i                        # auth required before anyone is admitted
    assert sum("lio-secret-lio-secret" in f for f in flat) == 1
    assert f"file_or_dev={d.plan.backing_file}" in cmds[0] and f"size={d.plan.size_bytes}" in cmds[0]
    assert ["targetcli", f"/iscsi/{d.plan.target_iqn}/tpg1/portals", "create", "10.0.0.1", "3260"] in cmds
    dels = iscsi.lio_delete_commands(d.plan)
    assert dels[0] == ["targetcli", "/iscsi", "delete", d.plan.target_iqn]


# -- render + runtime ---------------------------------------------------------

def test_render_iscsi_args_and_refusals(cfg):
    target = make_inv().resolve(M1, cfg)
    ctx = render.RenderContext(server_ip="10.0.0.1", nfs_server="10.0.0.1")
    with pytest.raises(render.RenderError, match="without the host's disk login"):
        render.kernel_cmdline(target, ctx)
    login = render.IscsiLogin("iqn.2026-11.org.example:sidus-disk-525400000001", "10.0.0.1", 3260,
                              "iqn.2026-11.org.example:sidus-host-525400000001", "sidus-525400000001",
                              "AbC_-0123456789xyzXYZ")
    line = render.kernel_cmdline(target, ctx, login)
    assert ("sidus.overlay=iscsi sidus.iscsi.target=iqn.2026-11.org.example:sidus-disk-525400000001 "
            "sidus.iscsi.portal=10.0.0.1:3260 sidus.iscsi.initiator=iqn.2026-11.org.example:sidus-host-525400000001 "
            "sidus.iscsi.user=sidus-525400000001 sidus.iscsi.secret=AbC_-0123456789xyzXYZ sidus.fallback=stop") in line
    for bad in ("short", "has space in it!!!!", "semi;colon;semi;colon"):
        with pytest.raises(render.RenderError):
            render.kernel_cmdline(target, ctx, render.IscsiLogin(login.target_iqn, "10.0.0.1", 3260,
                                                                 login.initiator_iqn, login.user, bad))


def make_runtime(tmp_path) -> Runtime:
    cfg = config.parse(cfg_text(str(tmp_path / "state")))
    r = RecordingRunner()       # tgtd answers "no targets": every target is created

    def factory(c):
        return iscsi_manager.IscsiManager(c, r)
    rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, make_inv(), 1), observer=Observer(),
                 iscsi_factory=factory, iscsi_watch_s=0)
    rt.test_runner = r
    return rt


def test_runtime_serves_credentials_only_to_the_dhcp_address_and_never_logs_them(tmp_path, capsys):
    setup_logging("json", "debug")
    try:
        rt = make_runtime(tmp_path)
        asyncio.run(rt.apply_backends())
        assert rt.backend_status["iscsi"]["ok"], rt.backend_status
        secret = json.loads((tmp_path / "state" / "iscsi" / "secrets.json").read_text())[M1]
        assert stat.S_IMODE(os.stat(tmp_path / "state" / "iscsi" / "secrets.json").st_mode) == 0o600
        # the tgtadm calls did carry it (that is how tgt takes a password)
        assert any(secret in c for c in rt.test_runner.calls)

        rt.observer.client_seen(M1, "10.0.0.5")
        rt.observer.client_seen(M2, "10.0.0.6")
        doc = rt.render("pxelinux", M1, "10.0.0.1", "10.0.0.5")
        assert doc is not None and f"sidus.iscsi.secret={secret}".encode() in doc
        assert b"sidus.iscsi.portal=10.0.0.1:3260" in doc
        assert rt.render("ipxe", M1, "10.0.0.1", "10.0.0.5") is not None
        # another machine's address, an unknown address: refused and counted
        assert rt.render("pxelinux", M1, "10.0.0.1", "10.0.0.6") is None
        assert rt.render("ipxe", M1, "10.0.0.1", "10.0.0.99") is None
        assert rt.observer.snapshot()["render.secret_refused"] == 2
        # a tmpfs host is served to anyone (no secret in it)
        assert rt.render("pxelinux", M3, "10.0.0.1", "10.0.0.99") is not None
        asyncio.run(rt.remove_backends())
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert any('"render.secret_refused"' in ln for ln in lines)
    assert any('"iscsi.applied"' in ln for ln in lines)
    secrets = json.loads((tmp_path / "state" / "iscsi" / "secrets.json").read_text()).values()
    for ln in lines:
        for s in secrets:
            assert s not in ln, "a log line carries a secret"


def test_runtime_without_backend_drops_the_manager(tmp_path):
    rt = make_runtime(tmp_path)
    asyncio.run(rt.apply_iscsi())
    assert rt.iscsi is not None and sorted(rt.iscsi.disks) == [M1, M2]
    assert rt.iscsi_login(M3, "10.0.0.1") is None
    assert rt.iscsi_login(M1, "10.0.0.1").user == "sidus-525400000001"


# -- the initramfs script's iscsi mode, run for real ---------------------------
# As in test_overlay_hook.py: a throwaway mount namespace, a read-only tmpfs as
# the "NFS root", stub initramfs functions.  The disk is a regular file (mounted
# through a loop device) that a fake sysfs names as LUN 1 of the session; a stub
# iscsistart records its arguments.  The kernel initiator itself is proven by
# the VM boot (tests/e2e/test_iscsi_boot.py).

HOOK_SCRIPT = __import__("pathlib").Path(__file__).resolve().parents[2] / \
    "config/initramfs/scripts/init-bottom/sidus-overlay"
SECRET = "Zq9_hidden-Secret-4f7a2b"
ISCSI_ARGS = (f"sidus.overlay=iscsi sidus.iscsi.target=iqn.2026-11.org.example:sidus-disk-525400000001 "
              f"sidus.iscsi.portal=10.9.9.1:3260 sidus.iscsi.initiator=iqn.2026-11.org.example:sidus-host-1 "
              f"sidus.iscsi.user=sidus-525400000001 sidus.iscsi.secret={SECRET} sidus.iscsi.wait=2")

HOOK_STUBS = """\
panic() { echo "PANIC: $*" >> "$STUB_LOG"; }
log_begin_msg() { echo "BEGIN: $*" >> "$STUB_LOG"; }
log_end_msg() { echo "END" >> "$STUB_LOG"; }
log_success_msg() { echo "OK: $*" >> "$STUB_LOG"; }
log_failure_msg() { echo "FAIL: $*" >> "$STUB_LOG"; }
log_warning_msg() { echo "WARN: $*" >> "$STUB_LOG"; }
"""

HOOK_DRIVER = r"""
set -u
w=$1; script=$2; action=$3
root=$w/root; mkdir -p "$root"
mount -t tmpfs -o size=4m fake-nfs "$root"
echo original > "$root/file"; mkdir "$root/dev"
mount -o remount,ro "$root"
rootmnt=$root sh "$script" 2>"$w/stderr"
echo "RC=$?"
echo "MODE=$(cat "$w/base/mode" 2>/dev/null)"
while read -r dev mnt fs opts rest; do
  [ "$mnt" = "$w/base/rw" ] && echo "RWFS=$fs"
done < /proc/mounts
echo "SEEN=$(cat "$root/persist" 2>/dev/null)"
[ "$action" = write ] && echo "written by boot one" > "$root/persist"
echo "LOWER=$(cat "$w/base/ro/persist" 2>/dev/null)"
sync
"""


def hook_run(tmp_path, cmdline, action="read", login_rc=0, disk_bytes=None):
    from conftest import require_root, require_tool
    require_root()
    require_tool("unshare")
    require_tool("mke2fs")
    w = tmp_path / "w"
    if w.exists():
        import shutil
        shutil.rmtree(w)
    (w / "sys/class/iscsi_session/session1/device/target1:0:0/1:0:0:1/block/sdz").mkdir(parents=True)
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    disk = dev / "sdz"
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
    if disk_bytes is not None:
        with open(disk, "r+b") as f:
            f.write(disk_bytes)
    stub = tmp_path / "iscsistart"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/iscsistart.args"\n'
                    f'for a; do last=$a; done\n'
                    f'[ {login_rc} = 0 ] || echo "iscsistart: login failed to authenticate with target '
                    f'(secret was $last)" >&2\nexit {login_rc}\n')
    stub.chmod(0o755)
    (tmp_path / "functions").write_text(HOOK_STUBS)
    log = tmp_path / "stub.log"
    log.unlink(missing_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SIDUS_FUNCTIONS": str(tmp_path / "functions"),
           "SIDUS_CMDLINE": cmdline, "SIDUS_OVERLAY_BASE": str(w / "base"), "STUB_LOG": str(log),
           "SIDUS_ISCSISTART": str(stub), "SIDUS_SYSFS": str(w / "sys"), "SIDUS_DEV": str(dev)}
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", HOOK_DRIVER, "driver",
                           str(w), str(HOOK_SCRIPT), action], env=env, capture_output=True, text=True,
                          timeout=120)
    facts = dict(ln.split("=", 1) for ln in proc.stdout.splitlines() if "=" in ln)
    calls = log.read_text().splitlines() if log.exists() else []
    assert "RC" in facts, proc.stderr
    everything = proc.stdout + proc.stderr + "\n".join(calls) + (w / "stderr").read_text()
    assert SECRET not in everything, "the CHAP secret reached the console"
    return facts, calls


import subprocess  # noqa: E402  (used by the hook tests only)


def test_hook_iscsi_blank_disk_formatted_once_and_changes_persist(tmp_path):
    facts, calls = hook_run(tmp_path, ISCSI_ARGS + " sidus.fallback=stop", action="write")
    assert facts["RC"] == "0", calls
    assert facts["MODE"] == "iscsi" and facts["RWFS"] == "ext4"
    assert facts["SEEN"] == "" and facts["LOWER"] == ""
    assert any("is blank: making a new ext4" in c for c in calls)
    args = (tmp_path / "iscsistart.args").read_text().split()
    assert args[args.index("-t") + 1] == "iqn.2026-11.org.example:sidus-disk-525400000001"
    assert args[args.index("-a") + 1] == "10.9.9.1" and args[args.index("-p") + 1] == "3260"
    assert args[args.index("-i") + 1] == "iqn.2026-11.org.example:sidus-host-1"
    assert args[args.index("-u") + 1] == "sidus-525400000001" and args[args.index("-w") + 1] == SECRET
    # the "reboot": same disk, new namespace; the file is there, no new file system
    facts, calls = hook_run(tmp_path, ISCSI_ARGS + " sidus.fallback=stop")
    assert facts["RC"] == "0" and facts["MODE"] == "iscsi", calls
    assert facts["SEEN"] == "written by boot one" and facts["LOWER"] == ""
    assert not any("is blank" in c for c in calls)


def test_hook_iscsi_login_failure_falls_back_loudly_or_stops(tmp_path):
    facts, calls = hook_run(tmp_path, ISCSI_ARGS, login_rc=24, action="write")
    assert facts["RC"] == "0" and facts["MODE"] == "tmpfs-fallback" and facts["RWFS"] == "tmpfs", calls
    warns = [c for c in calls if c.startswith("WARN")]
    assert any("login to iqn.2026-11.org.example:sidus-disk-525400000001 at 10.9.9.1:3260 failed" in c
               and "(secret was ****)" in c for c in warns), warns
    assert any("LOST at reboot" in c for c in warns)
    facts, calls = hook_run(tmp_path, ISCSI_ARGS + " sidus.fallback=stop", login_rc=24)
    assert facts["RC"] == "1" and facts["MODE"] == "", calls
    assert calls[-1].startswith("PANIC: sidus-overlay: iSCSI disk: login to")
    assert "sidus.fallback=stop" in calls[-1]


def test_hook_iscsi_never_formats_a_disk_with_data(tmp_path):
    facts, calls = hook_run(tmp_path, ISCSI_ARGS, disk_bytes=b"\x01not a file system" * 100)
    assert facts["MODE"] == "tmpfs-fallback", calls
    assert any("not formatted by sidus: left untouched" in c for c in calls)
    with open(tmp_path / "dev" / "sdz", "rb") as f:
        assert f.read(19) == b"\x01not a file system\x01"[:19]


def test_hook_iscsi_missing_argument_or_no_lun(tmp_path):
    facts, calls = hook_run(tmp_path, ISCSI_ARGS.replace(f"sidus.iscsi.secret={SECRET}", ""))
    assert facts["MODE"] == "tmpfs-fallback"
    assert any("sidus.iscsi.secret= is missing" in c for c in calls), calls
    args_file = tmp_path / "iscsistart.args"
    assert not args_file.exists()       # no login attempted without credentials


def test_runtime_watch_restores_targets_a_restarted_tgtd_lost(tmp_path):
    """tgtd keeps targets in memory only: the watch loop re-creates them when show lacks them."""
    cfg = config.parse(cfg_text(str(tmp_path / "state")))
    r = RecordingRunner()
    show = ["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "target", "--op", "show"]
    rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, make_inv(), 1), observer=Observer(),
                 iscsi_factory=lambda c: iscsi_manager.IscsiManager(c, r), iscsi_watch_s=0.01)

    def created():
        return [c for c in r.calls if c[5:9] == ["--mode", "target", "--op", "new"]]

    async def scenario():
        await rt.apply_backends()
        assert len(created()) == 2
        # tgtd now reports both targets: the watch leaves them alone
        plans = iscsi.plan_disks(cfg, make_inv())
        live = "".join(f"Target {i + 1}: {p.target_iqn}\n    LUN information:\n"
                       f"            Backing store path: {p.backing_file}\n    Account information:\n"
                       f"        {p.user}\n    ACL information:\n        {p.initiator_iqn}\n"
                       for i, p in enumerate(plans))
        r.script(show, stdout=live.encode())
        for _ in range(100):
            await asyncio.sleep(0.01)
        assert len(created()) == 2 and "iscsi.restored" not in rt.observer.snapshot()
        # tgtd restarted: no targets any more -> restored once
        r.script(show, stdout=b"")
        for _ in range(500):
            await asyncio.sleep(0.01)
            if rt.observer.snapshot().get("iscsi.restored"):
                break
        r.script(show, stdout=live.encode())
        await asyncio.sleep(0.05)
        await rt.remove_backends()

    asyncio.run(scenario())
    assert rt.observer.snapshot().get("iscsi.restored", 0) >= 1
    assert len(created()) >= 4
