"""Booted generations: the pure table (sidusd/boot/booted.py), its file (sidusd/image/booted_store.py)
and the runtime's hook (a rendered boot config records the root it names)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from sidusd import config
from sidusd.boot import booted
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.image.booted_store import BootedRecorder, BootedStore, read_table
from sidusd.observability import Observer
from sidusd.runtime import Runtime, Snapshot

M1, M2, M3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"
G1, G2 = "/var/lib/sidus/images/deb/gen-0001", "/var/lib/sidus/images/deb/gen-0002"


# -- the pure table -------------------------------------------------------------

def test_note_reports_only_changes_worth_writing():
    t = booted.BootedTable(refresh_s=3600)
    assert t.note(M1, "deb", G1, "vm1", 1000.0) is True          # new machine
    assert t.note(M1, "deb", G1, "vm1", 1500.0) is False         # same root, within refresh
    assert t.get(M1).last_s == 1000.0
    assert t.note(M1, "deb", G1, "vm1", 1000.0 + 3600) is True   # refresh
    assert t.get(M1).last_s == 4600.0 and t.get(M1).first_s == 1000.0
    assert t.note(M1, "deb.gen-2", G2, "vm1", 5000.0) is True    # another generation
    r = t.get(M1)
    assert (r.root, r.image, r.first_s, r.last_s) == (G2, "deb.gen-2", 5000.0, 5000.0)
    assert len(t) == 1


def test_a_machine_served_another_root_no_longer_uses_the_old_one():
    t = booted.BootedTable()
    t.note(M1, "deb", G1, "vm1", 10.0)
    t.note(M2, "deb", G1, "vm2", 10.0)
    users = booted.users_by_root(t.live(20.0, 0))
    assert sorted(r.mac for r in users[G1]) == [M1, M2]
    t.note(M1, "deb", G2, "vm1", 30.0)
    users = booted.users_by_root(t.live(40.0, 0))
    assert [r.mac for r in users[G1]] == [M2] and [r.mac for r in users[G2]] == [M1]


def test_ttl_expires_records_and_zero_keeps_them():
    t = booted.BootedTable()
    t.note(M1, "deb", G1, None, 100.0)
    t.note(M2, "deb", G1, None, 500.0)
    assert [r.mac for r in t.live(650.0, 200)] == [M2]           # M1 last served 550 s ago
    assert [r.mac for r in t.live(10**9, 0)] == [M1, M2]          # 0: forever
    assert t.prune(650.0, 200) == 1 and t.get(M1) is None


def test_bounded_least_recently_served_evicted():
    t = booted.BootedTable(max_hosts=2)
    t.note(M1, "deb", G1, None, 1.0)
    t.note(M2, "deb", G1, None, 2.0)
    t.note(M3, "deb", G1, None, 3.0)
    assert [r.mac for r in t.records()] == [M2, M3]
    # decoding more records than the bound keeps the most recent ones
    t2 = booted.decode(booted.BootedTable([booted.BootRecord(f"m{i}", "deb", G1, None, i, i)
                                           for i in range(10)], max_hosts=100).encode(), max_hosts=3)
    assert [r.mac for r in t2.records()] == ["m7", "m8", "m9"]


def test_unknown_macs_never_push_out_inventory_hosts():
    t = booted.BootedTable(max_hosts=3)
    t.note(M1, "deb", G1, "vm1", 1.0)
    t.note(M2, "deb", G1, "vm2", 2.0)
    t.note("02:00:00:00:00:01", "deb", G1, None, 3.0, known=False)
    # a flood of made-up MACs (a TFTP request names any MAC): they replace each other only
    for i in range(2, 50):
        assert t.note(f"02:00:00:00:00:{i:02x}", "deb", G1, None, 3.0 + i, known=False) is True
    assert {r.mac for r in t.records()} == {M1, M2, "02:00:00:00:00:31"}
    # a known host evicts the unknown one first
    assert t.note(M3, "deb", G2, "vm3", 100.0) is True
    assert {r.mac for r in t.records()} == {M1, M2, M3}
    # full of known hosts: an unknown MAC is not recorded, a known one evicts the oldest known
    assert t.note("02:00:00:00:01:00", "deb", G1, None, 101.0, known=False) is False
    assert t.note("52:54:00:00:00:09", "deb", G1, "vm9", 102.0) is True
    assert {r.mac for r in t.records()} == {M2, M3, "52:54:00:00:00:09"}
    assert booted.decode(t.encode()).records() == t.records()


def test_encode_decode_round_trip():
    t = booted.BootedTable()
    t.note(M1, "deb", G1, "vm1", 1.5)
    t.note(M2, "deb.gen-2", G2, None, 2.25)
    back = booted.decode(t.encode())
    assert back.records() == t.records()
    assert json.loads(t.encode())["version"] == 1


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"[]", b"{}", b'{"version": 2, "records": []}', b'{"version": 1, "records": {}}',
    b'{"version": 1, "records": [1]}',
    b'{"version": 1, "records": [{"mac": "x", "image": "d", "root": "/r", "first_s": 1}]}',
    b'{"version": 1, "records": [{"mac": "", "image": "d", "root": "/r", "first_s": 1, "last_s": 1}]}',
    b'{"version": 1, "records": [{"mac": "x", "image": "d", "root": "/r", "first_s": true, "last_s": 1}]}',
    b'{"version": 1, "records": [{"mac": "x", "image": "d", "root": "/r\\n", "first_s": 1, "last_s": 1}]}',
    b'{"version": 1, "records": [{"mac": "x", "image": "d", "root": "/r", "hostname": 3, "first_s": 1, "last_s": 1}]}',
    b'{"version": 1, "records": [{"mac": "x", "image": "d", "root": "/r", "first_s": 1, "last_s": 1, "known": 1}]}',
    b"[" * 100000,
])
def test_decode_refuses_malformed_files(data):
    with pytest.raises(booted.BootedFileError):
        booted.decode(data)


# -- the file ---------------------------------------------------------------------

def test_store_writes_atomically_only_on_change(tmp_path):
    f = tmp_path / "state" / "booted.json"
    st = BootedStore(f, max_hosts=100, ttl_s=0)
    assert st.note(M1, "deb", G1, "vm1", 100.0) is True       # no loop: written at once
    m1 = f.stat().st_mtime_ns
    assert st.note(M1, "deb", G1, "vm1", 101.0) is False
    assert f.stat().st_mtime_ns == m1
    assert [(r.mac, r.root) for r in read_table(f).records()] == [(M1, G1)]
    assert oct(f.stat().st_mode & 0o777) == "0o640"
    assert not [p for p in f.parent.iterdir() if p.name != "booted.json"]   # no temporaries left
    # a second store (a restarted sidusd) starts from the file
    st2 = BootedStore(f, max_hosts=100, ttl_s=0)
    assert st2.table.get(M1).hostname == "vm1"


def test_store_coalesces_writes_in_the_event_loop(tmp_path):
    f = tmp_path / "booted.json"
    st = BootedStore(f, max_hosts=1000, ttl_s=0)
    writes = []
    real = st._write_file
    st._write_file = lambda data: (writes.append(data), real(data))[1]

    async def storm():
        for i in range(200):
            st.note(f"52:54:00:00:01:{i % 256:02x}", "deb", G1, None, 1000.0 + i)
        await st.aclose()
    asyncio.run(storm())
    assert len(read_table(f)) == 200
    assert 1 <= len(writes) < 200


def test_store_keeps_a_corrupt_file_aside_and_starts_empty(tmp_path):
    f = tmp_path / "booted.json"
    f.write_bytes(b'{"version": 1, "records": [garbage')
    obs = Observer()
    st = BootedStore(f, max_hosts=10, ttl_s=0, observer=obs)
    assert len(st.table) == 0
    assert (tmp_path / "booted.json.bad").read_bytes().startswith(b'{"version": 1')
    assert obs.snapshot()["booted.load_errors"] == 1


def test_store_write_failure_is_counted_not_raised(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    f = d / "booted.json"
    obs = Observer()
    st = BootedStore(f, max_hosts=10, ttl_s=0, observer=obs)
    os.chmod(d, 0o500)
    try:
        if os.access(d, os.W_OK):                      # root ignores the mode: use a file as parent
            st.path = tmp_path / "file" / "booted.json"
            (tmp_path / "file").write_text("x")
        assert st.note(M1, "deb", G1, None, 1.0) is True
    finally:
        os.chmod(d, 0o700)
    assert obs.snapshot()["booted.write_errors"] == 1
    assert st._dirty is True                           # written again with the next change


# -- the runtime hook ----------------------------------------------------------------

CFG = """
state_dir: {state}
images_file: {images_file}
dhcp: {{mode: off}}
tftp: {{root: {tftp}}}
images:
  deb: {{root: {g1}, kernel: images/deb/gen-0001/vmlinuz, initrd: images/deb/gen-0001/initrd.img}}
  deb.gen-2: {{root: {g2}, kernel: images/deb/gen-0002/vmlinuz, initrd: images/deb/gen-0002/initrd.img}}
"""


def make_runtime(tmp_path: Path, images_file: bool = True) -> Runtime:
    text = CFG.format(state=tmp_path / "state", images_file=tmp_path / "images.yaml", tftp=tmp_path,
                      g1=tmp_path / "deb/gen-0001", g2=tmp_path / "deb/gen-0002")
    if not images_file:
        text = text.replace(f"images_file: {tmp_path / 'images.yaml'}\n", "")
    cfg = config.parse(text)
    inv = Inventory(profiles={"default": Profile("default", "deb", "tmpfs", ""),
                              "pinned": Profile("pinned", "deb.gen-2", "tmpfs", "")},
                    hosts={M1: Host(M1, "default", hostname="vm1"), M2: Host(M2, "pinned", hostname="vm2")})
    return Runtime(tmp_path / "sidus.yaml", Snapshot(cfg, inv, 1), observer=Observer())


def test_rendering_a_boot_config_records_the_root_it_names(tmp_path):
    rt = make_runtime(tmp_path)
    assert rt.config.booted.file == tmp_path / "state" / "booted.json"
    assert rt.render("pxelinux", M1, "10.0.0.1", "10.0.0.5") is not None
    assert rt.render("ipxe", "52-54-00-00-00-02", "10.0.0.1", "10.0.0.6") is not None
    assert rt.render("pxelinux", M3, "10.0.0.1", "10.0.0.7") is not None     # unknown: default profile
    recs = {r.mac: r for r in read_table(tmp_path / "state" / "booted.json").records()}
    assert (recs[M1].image, recs[M1].root, recs[M1].hostname) == ("deb", str(tmp_path / "deb/gen-0001"), "vm1")
    assert (recs[M2].image, recs[M2].root) == ("deb.gen-2", str(tmp_path / "deb/gen-0002"))
    assert (recs[M3].image, recs[M3].hostname, recs[M3].known) == ("deb", None, False)
    assert recs[M1].known and recs[M2].known
    assert rt.observer.snapshot()["booted.records"] == 3


def test_no_record_without_images_file_and_no_record_for_a_refused_render(tmp_path):
    rt = make_runtime(tmp_path, images_file=False)
    assert rt.config.booted.file is None
    assert rt.render("pxelinux", M1, "10.0.0.1", "10.0.0.5") is not None
    assert not (tmp_path / "state").exists()
    rt2 = make_runtime(tmp_path / "b")
    assert rt2.render("pxelinux-default", None, "10.0.0.1", "10.0.0.9") is not None   # no DHCP seen: no MAC
    assert rt2.booted.store is None or len(rt2.booted.store.table) == 0


def test_recorder_follows_a_config_reload_to_a_new_file(tmp_path):
    rt = make_runtime(tmp_path)
    rec = BootedRecorder()
    target = rt.inventory.resolve(M1, rt.config)
    rec.note(rt.config, M1, target, now=5.0)
    import dataclasses
    cfg2 = dataclasses.replace(rt.config, booted=config.BootedConfig(file=tmp_path / "other.json"))
    rec.note(cfg2, M1, target, now=6.0)
    assert len(read_table(tmp_path / "other.json")) == 1
    rec.note(rt.config, "not-a-mac", target)                  # refused quietly, nothing written
    assert len(read_table(tmp_path / "state" / "booted.json")) == 1


def test_store_write_failure_in_the_event_loop_is_counted_and_retried_on_close(tmp_path):
    (tmp_path / "file").write_text("x")
    obs = Observer()
    st = BootedStore(tmp_path / "file" / "booted.json", max_hosts=10, ttl_s=0, observer=obs)

    async def boot():
        st.note(M1, "deb", G1, None, 1.0)
        await asyncio.sleep(0)
        await st._task
        assert obs.snapshot()["booted.write_errors"] == 1 and st._dirty
        st.path = tmp_path / "ok" / "booted.json"          # the disk is back
        await st.aclose()
    asyncio.run(boot())
    assert [r.mac for r in read_table(tmp_path / "ok" / "booted.json").records()] == [M1]
