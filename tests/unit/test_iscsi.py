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


async def until(condition, timeout_s: float = 10.0) -> None:
    """Wait (polling the event loop) until ``condition()`` holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"not reached within {timeout_s} s"
        await asyncio.sleep(0.001)


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
"""  # noqa: W291  (tgtadm prints "Backing store flags: " with a trailing space)


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


# -- LIO ----------------------------------------------------------------------
# LIO cannot run on the development machines (no target modules, no configfs),
# so the backend is driven against a fake configfs tree: FakeTargetcli answers
# the targetcli argv lists by making in the tree what targetcli-fb / rtslib-fb
# make in /sys/kernel/config/target (core/fileio_N/<name>/udev_path,
# iscsi/<iqn>/tpgt_1/{enable,attrib,np,lun/lun_N/<link>,acls/<init>/{auth,info,lun_N}}).
# Anything it does not know fails, so an unplanned command shows up.

class FakeTargetcli:
    def __init__(self, root, default_portal="[::0]:3260", sessions=(), auto_enable=True):
        self.root = root
        self.auto_enable = auto_enable       # targetcli's auto_enable_tpgt preference
        self.default_portal = default_portal
        self.sessions = set(sessions)        # initiator names shown as logged in
        root.mkdir(parents=True, exist_ok=True)

    def __call__(self, argv):
        from sidusd.storage.runner import Result
        assert argv[0] == "targetcli"
        try:
            self.do(argv[1], argv[2], argv[3:])
        except (AssertionError, KeyError, OSError, ValueError) as exc:
            return Result(tuple(argv), 1, b"", f"fake targetcli: {exc!r}".encode())
        return Result(tuple(argv), 0)

    @staticmethod
    def kv(args):
        return dict(a.split("=", 1) for a in args if "=" in a)

    def tpg_dir(self, iqn):
        return self.root / "iscsi" / iqn / "tpgt_1"

    def do(self, path, cmd, args):
        import shutil
        r = self.root
        if path == "/backstores/fileio":
            if cmd == "create":
                kv = self.kv(args)
                so = r / "core" / "fileio_0" / kv["name"]
                assert not so.exists(), f"{so} exists"
                so.mkdir(parents=True)
                (so / "udev_path").write_text(kv["file_or_dev"] + "\n")
                assert kv["sparse"] == "true" and int(kv["size"]) > 0
                return
            if cmd == "delete":
                shutil.rmtree(r / "core" / "fileio_0" / args[0])
                return
        if path == "/iscsi":
            if cmd == "create":
                iqn, = args
                tpg = self.tpg_dir(iqn)
                assert not tpg.exists()
                for d in ("attrib", "param", "np", "lun", "acls"):
                    (tpg / d).mkdir(parents=True)
                (tpg / "enable").write_text("1\n" if self.auto_enable else "0\n")
                for k, v in {"authentication": "0", "generate_node_acls": "0",
                             "demo_mode_write_protect": "1", "cache_dynamic_acls": "0"}.items():
                    (tpg / "attrib" / k).write_text(v + "\n")
                (tpg / "np" / self.default_portal).mkdir()
                return
            if cmd == "delete":
                shutil.rmtree(r / "iscsi" / args[0])
                return
        m = __import__("re").match(r"^/iscsi/([^/]+)/tpg1(/.*)?$", path)
        assert m, path
        tpg, sub = self.tpg_dir(m.group(1)), m.group(2) or ""
        assert tpg.is_dir(), f"no {tpg}"
        if sub == "" and cmd == "set" and args[0] == "attribute":
            for k, v in self.kv(args[1:]).items():
                assert (tpg / "attrib" / k).exists(), k
                (tpg / "attrib" / k).write_text(v + "\n")
            return
        if sub == "" and cmd == "enable":
            assert (tpg / "attrib" / "authentication").read_text() == "1\n", "enabled before closed"
            (tpg / "enable").write_text("1\n")
            return
        if sub == "" and cmd == "set" and args[0] == "parameter":
            for k, v in self.kv(args[1:]).items():
                (tpg / "param" / k).write_text(v + "\n")
            return
        if sub == "/portals":
            ip, port = args
            name = f"{ip}:{port}" if "." in ip else f"[{ip}]:{port}"
            if cmd == "create":
                (tpg / "np" / name).mkdir()
            else:
                assert cmd == "delete"
                (tpg / "np" / name).rmdir()
            return
        if sub == "/luns" and cmd == "create":
            kv = self.kv(args[1:])
            so = r / "core" / "fileio_0" / args[0].rsplit("/", 1)[1]
            assert so.is_dir(), f"no storage object {so}"
            assert kv["add_mapped_luns"] == "false"
            lun = tpg / "lun" / f"lun_{kv['lun']}"
            lun.mkdir()
            (lun / "a1b2c3d4e5").symlink_to(so)
            return
        if sub == "/acls" and cmd == "create":
            init = args[0]
            assert self.kv(args[1:])["add_mapped_luns"] == "false"
            acl = tpg / "acls" / init
            (acl / "auth").mkdir(parents=True)
            for name in ("userid", "password", "userid_mutual", "password_mutual"):
                (acl / "auth" / name).write_text("\n")
                os.chmod(acl / "auth" / name, 0o600)
            (acl / "info").write_text(
                f"InitiatorName: {init}\nLIO Session ID: 1   ISID: 0x1 TSIH: 1  SessionType: Normal\n"
                if init in self.sessions else f"No active iSCSI Session for Initiator Endpoint: {init}\n")
            return
        if sub.startswith("/acls/") and cmd == "create":
            kv = self.kv(args)
            acl = tpg / "acls" / sub[len("/acls/"):]
            assert (acl / "auth" / "password").read_text() not in ("", "\n"), "LUN mapped before the secret"
            lun = tpg / "lun" / f"lun_{kv['tpg_lun_or_backstore']}"
            mapped = acl / f"lun_{kv['mapped_lun']}"
            mapped.mkdir()
            (mapped / "link").symlink_to(lun)
            return
        raise ValueError(f"unknown targetcli command {path} {cmd} {args}")


def lio_setup(tmp_path, **kw):
    from sidusd.storage import iscsi_lio
    cfg = config.parse(cfg_text(str(tmp_path / "state"), backend="lio"))
    root = tmp_path / "configfs" / "target"
    fake = FakeTargetcli(root, **kw)
    r = RecordingRunner()
    r.results[("targetcli",)] = fake
    disks = [iscsi.Disk(p, f"lio-secret-{p.user}-x") for p in iscsi.plan_disks(cfg, make_inv())]
    return cfg, root, r, iscsi_lio.LioBackend(r, root, portal="10.0.0.1", port=3260), disks


def tc(calls):
    """The targetcli calls, without the program name."""
    return [c[1:] for c in calls if c[0] == "targetcli"]


def test_lio_creates_closed_targets_and_writes_the_secret_only_into_configfs(tmp_path):
    from sidusd.storage import iscsi_lio
    cfg, root, r, lio, disks = lio_setup(tmp_path)
    done = run_apply(lio, disks)
    assert done == {"created": [d.plan.target_iqn for d in disks], "kept": [], "removed": []}
    d1 = disks[0]
    p = d1.plan
    tpg = f"/iscsi/{p.target_iqn}/tpg1"
    mine = [c for c in tc(r.calls) if p.target_iqn in c[0] or p.target_iqn in c[2:] or
            any("525400000001" in a for a in c)]
    assert mine == [
        ["/backstores/fileio", "create", "name=sidus-525400000001", f"file_or_dev={p.backing_file}",
         f"size={128 << 20}", "sparse=true", "write_back=false"],
        ["/iscsi", "create", p.target_iqn],
        [tpg, "set", "attribute", "authentication=1", "generate_node_acls=0", "demo_mode_write_protect=1",
         "cache_dynamic_acls=0"],
        [tpg, "set", "parameter", "AuthMethod=CHAP"],
        [tpg, "enable"],
        [f"{tpg}/portals", "delete", "::0", "3260"],           # targetcli's default portal
        [f"{tpg}/portals", "create", "10.0.0.1", "3260"],
        [f"{tpg}/luns", "create", "/backstores/fileio/sidus-525400000001", "lun=1", "add_mapped_luns=false"],
        [f"{tpg}/acls", "create", p.initiator_iqn, "add_mapped_luns=false"],
        # (the secret is written here, into configfs: FakeTargetcli refuses the mapping otherwise)
        [f"{tpg}/acls/{p.initiator_iqn}", "create", "mapped_lun=1", "tpg_lun_or_backstore=1",
         "write_protect=false"],
    ]
    # no argv carries a secret
    for c in r.calls:
        for d in disks:
            assert not any(d.secret in a for a in c), c
    auth = root / "iscsi" / p.target_iqn / "tpgt_1" / "acls" / p.initiator_iqn / "auth"
    assert (auth / "password").read_bytes() == d1.secret.encode()      # no newline: the kernel keeps it
    assert (auth / "userid").read_bytes() == p.user.encode()
    assert stat.S_IMODE(os.stat(auth / "password").st_mode) == 0o600   # written, not re-created
    live = asyncio.run(lio.show())
    t = live[p.target_iqn]
    assert iscsi_lio.lio_matches(t, p) and t.portals == ["10.0.0.1:3260"] and t.sessions == 0
    assert t.attributes["authentication"] == "1" and t.attributes["generate_node_acls"] == "0"


def test_lio_reapply_is_idempotent_refresh_rewrites_the_secret_removal_cleans_up(tmp_path):
    cfg, root, r, lio, disks = lio_setup(tmp_path, default_portal="0.0.0.0:3260", auto_enable=False)
    run_apply(lio, disks)
    # a foreign target (not sidus's) that must never be touched
    FakeTargetcli(root).do("/iscsi", "create", ["iqn.2003-01.org.linux-iscsi.other:sn.1"])
    r.calls.clear()
    assert run_apply(lio, disks) == {"created": [], "kept": [d.plan.target_iqn for d in disks], "removed": []}
    assert tc(r.calls) == []                      # nothing to do: configfs read only
    # new secret for vm1: written into configfs, still no program run
    p = disks[0].plan
    new = iscsi.Disk(p, "rotated-secret-rotated-secret")
    run_apply(lio, [new, disks[1]], refresh=[p.target_iqn])
    assert tc(r.calls) == []
    pw = root / "iscsi" / p.target_iqn / "tpgt_1" / "acls" / p.initiator_iqn / "auth" / "password"
    assert pw.read_bytes() == b"rotated-secret-rotated-secret"
    # vm2 leaves the plan: its target and backstore go, vm1 and the foreign target stay
    done = run_apply(lio, [new])
    assert done == {"created": [], "kept": [p.target_iqn], "removed": [disks[1].plan.target_iqn]}
    assert tc(r.calls) == [["/iscsi", "delete", disks[1].plan.target_iqn],
                           ["/backstores/fileio", "delete", "sidus-525400000002"]]
    assert sorted(x.name for x in (root / "iscsi").iterdir()) == [
        "iqn.2003-01.org.linux-iscsi.other:sn.1", p.target_iqn]
    # remove(iqn): target and backstore; False for an unknown one
    r.calls.clear()
    assert asyncio.run(lio.remove(p.target_iqn)) is True
    assert tc(r.calls) == [["/iscsi", "delete", p.target_iqn], ["/backstores/fileio", "delete",
                                                                "sidus-525400000001"]]
    assert asyncio.run(lio.remove(p.target_iqn)) is False
    assert list((root / "core" / "fileio_0").iterdir()) == []


def test_lio_tampered_target_is_recreated_and_sessions_are_counted(tmp_path):
    cfg, root, r, lio, disks = lio_setup(tmp_path, sessions={"iqn.2026-11.org.example:sidus-host-525400000002"})
    run_apply(lio, disks)
    live = asyncio.run(lio.show())
    assert [live[d.plan.target_iqn].sessions for d in disks] == [0, 1]
    # someone opened vm1's target (authentication off): sidus deletes it and builds it closed again
    p = disks[0].plan
    (root / "iscsi" / p.target_iqn / "tpgt_1" / "attrib" / "authentication").write_text("0\n")
    r.calls.clear()
    done = run_apply(lio, disks)
    assert done["created"] == [p.target_iqn] and done["kept"] == [disks[1].plan.target_iqn]
    calls = tc(r.calls)
    assert calls[0] == ["/iscsi", "delete", p.target_iqn]
    assert ["/iscsi", "create", p.target_iqn] in calls
    assert not any(c[0] == "/backstores/fileio" for c in calls)     # same file: the backstore is reused
    assert (root / "iscsi" / p.target_iqn / "tpgt_1" / "attrib" / "authentication").read_text() == "1\n"


def test_lio_targetcli_failure_and_missing_attribute_never_show_the_secret(tmp_path, capsys):
    cfg, root, r, lio, disks = lio_setup(tmp_path)
    r.script(["targetcli", "/iscsi", "create"], rc=1, stderr=b"Could not create Target in configFS")
    with pytest.raises(BackendError) as exc:
        run_apply(lio, disks)
    assert "/iscsi create failed" in str(exc.value) and "configFS" in exc.value.detail
    # an ACL whose auth/password does not exist: refused, never created by sidus
    from sidusd.storage import iscsi_lio
    cfg, root, r, lio, disks = lio_setup(tmp_path / "b")
    p = disks[0].plan
    acl = root / "iscsi" / p.target_iqn / "tpgt_1" / "acls" / p.initiator_iqn
    real = r.results[("targetcli",)]

    def no_password(argv):
        res = real(argv)
        if argv[1:3] == [f"/iscsi/{p.target_iqn}/tpg1/acls", "create"]:
            (acl / "auth" / "password").unlink()
        return res
    r.results[("targetcli",)] = no_password
    with pytest.raises(BackendError) as exc:
        run_apply(lio, disks)
    assert "auth/password" in str(exc.value) and not (acl / "auth" / "password").exists()
    text = f"{exc.value} {exc.value.detail}" + capsys.readouterr().err
    assert disks[0].secret not in text
    # an argument targetcli would split is refused before anything runs
    with pytest.raises(BackendError, match="re-parse"):
        iscsi_lio.LioBackend(r, root).argv("/backstores/fileio", "create", "file_or_dev=/a b")


def test_lio_without_configfs_is_refused_naming_what_is_missing(tmp_path):
    from sidusd.storage import iscsi_lio
    cfg = config.parse(cfg_text(str(tmp_path / "state"), backend="lio"))
    missing = tmp_path / "sys" / "kernel" / "config" / "target"
    with pytest.raises(BackendError) as exc:
        iscsi_manager.IscsiManager(cfg, RecordingRunner(), lio_root=missing)
    assert f"{missing} absent" in str(exc.value) and "target_core_mod" in str(exc.value)
    assert "iscsi_target_mod" in str(exc.value)
    # a tree that disappears later (modules unloaded): show/apply say the same
    root = tmp_path / "t"
    root.mkdir()
    lio = iscsi_lio.LioBackend(RecordingRunner(), root)
    root.rmdir()
    with pytest.raises(BackendError, match="absent: load target_core_mod"):
        asyncio.run(lio.show())
    # a tree that cannot be read (a target deleted while it is read): BackendError, not OSError
    import unittest.mock
    root.mkdir()
    with unittest.mock.patch.object(iscsi_lio, "read_configfs",
                                    side_effect=FileNotFoundError(2, "No such file", "iscsi/x/tpgt_1/lun")):
        with pytest.raises(BackendError, match="cannot read LIO's configfs tree") as exc:
            asyncio.run(lio.show())
    assert "iscsi/x/tpgt_1/lun" in exc.value.detail
    # the default factory on this kind of machine: the runtime reports it in its status
    if not iscsi_lio.LIO_CONFIGFS.is_dir():
        rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, make_inv(), 1), observer=Observer(),
                     iscsi_watch_s=0)
        asyncio.run(rt.apply_iscsi())
        assert "/sys/kernel/config/target absent" in rt.backend_status["iscsi"]["detail"]
        assert rt.observer.snapshot()["iscsi.errors"] == 1


def test_lio_manager_end_to_end_logs_no_secret(tmp_path, capsys):
    """IscsiManager on LIO: disks, secrets file, targets, info (sessions) and host removal."""
    setup_logging("json", "debug")
    try:
        cfg = config.parse(cfg_text(str(tmp_path / "state"), backend="lio"))
        root = tmp_path / "configfs" / "target"
        r = RecordingRunner()
        r.results[("targetcli",)] = FakeTargetcli(root, sessions={"iqn.2026-11.org.example:sidus-host-525400000001"})
        mgr = iscsi_manager.IscsiManager(cfg, r, lio_root=root)
        assert mgr.backend.name == "lio"
        done = asyncio.run(mgr.apply(cfg, make_inv()))
        assert len(done["created"]) == 2
        info = asyncio.run(mgr.info(M1))
        assert info["served"] and info["logged_in"] and "secret" not in info
        assert asyncio.run(mgr.ensure()) is False          # everything there
        plan = mgr.disks[M2].plan
        asyncio.run(mgr.remove_host(M2, plan, delete_disk=True))
        assert not plan.backing_file.exists()
        assert sorted(x.name for x in (root / "iscsi").iterdir()) == [mgr.disks[M1].plan.target_iqn]
        secrets = json.loads(cfg.iscsi.secrets_file.read_text())
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert '"iscsi.applied"' in err
    for s in secrets.values():
        assert s not in err
        assert not any(s in a for c in r.calls for a in c)


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

HOOK_SCRIPT = __import__("sidusd.data").data.INITRAMFS / "scripts/init-bottom/sidus-overlay"
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
    # iscsistart's own retry budget (30 x 15 s) would hold an unreachable target's boot for 7.5 min
    assert args[args.index("-P") + 1] == "node.session.initial_login_retry_max=4"
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


def test_hook_iscsi_retries_is_passed_to_iscsistart_and_checked(tmp_path):
    facts, calls = hook_run(tmp_path, ISCSI_ARGS + " sidus.iscsi.retries=1", login_rc=8)
    assert facts["MODE"] == "tmpfs-fallback", calls
    args = (tmp_path / "iscsistart.args").read_text().split()
    assert args[args.index("-P") + 1] == "node.session.initial_login_retry_max=1"
    for bad in ("0", "x", ""):
        facts, calls = hook_run(tmp_path, ISCSI_ARGS + f" sidus.iscsi.retries={bad}")
        assert facts["RC"] == "1" and facts["MODE"] == "", calls
        assert calls[-1].startswith(f"PANIC: sidus-overlay: sidus.iscsi.retries={bad}: not a number"), calls


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

    def shows():
        """How many checks the watch has made (each asks tgtd for its targets)."""
        return r.calls.count(show)

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
        seen = shows()
        await until(lambda: shows() >= seen + 10)          # ten checks that saw both targets
        assert len(created()) == 2 and "iscsi.restored" not in rt.observer.snapshot()
        # tgtd restarted: no targets any more -> restored once
        r.script(show, stdout=b"")
        await until(lambda: rt.observer.snapshot().get("iscsi.restored"))
        r.script(show, stdout=live.encode())
        seen = shows()
        await until(lambda: shows() > seen)                # a check that saw them back
        await rt.remove_backends()

    asyncio.run(scenario())
    assert rt.observer.snapshot().get("iscsi.restored", 0) >= 1
    assert len(created()) >= 4


def test_runtime_watch_logs_a_lasting_tgtd_failure_once_and_its_recovery(tmp_path):
    """tgtd down for many checks: every failure counted, one log line (not one per check);
    when tgtd answers again, one ``iscsi.watch_recovered`` with the number of failed checks."""
    from structlog.testing import capture_logs
    cfg = config.parse(cfg_text(str(tmp_path / "state")))
    r = RecordingRunner()
    show = ["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "target", "--op", "show"]
    rt = Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, make_inv(), 1), observer=Observer(),
                 iscsi_factory=lambda c: iscsi_manager.IscsiManager(c, r), iscsi_watch_s=0.005)

    async def scenario():
        await rt.apply_backends()
        r.script(show, rc=107, stderr=b"tgtadm: can't send the request to the tgt daemon, "
                                      b"Transport endpoint is not connected")
        await until(lambda: rt.observer.snapshot().get("iscsi.errors", 0) >= 30)
        r.script(show, stdout=b"")                 # tgtd back (empty: the targets are restored)
        await until(lambda: any(e["event"] == "iscsi.watch_recovered" for e in logs))
        await rt.remove_backends()

    with capture_logs() as logs:
        asyncio.run(scenario())
    errors = rt.observer.snapshot().get("iscsi.errors", 0)
    failed = [e for e in logs if e["event"] == "iscsi.watch_failed"]
    recovered = [e for e in logs if e["event"] == "iscsi.watch_recovered"]
    assert errors >= 30
    assert len(failed) == 1, failed                # 30 s before the second one: not in this test
    assert len(recovered) == 1 and recovered[0]["failures"] >= 30
    assert rt.observer.snapshot().get("iscsi.restored", 0) >= 1
