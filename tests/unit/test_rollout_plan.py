"""sidusd.image.rollout_plan: the pure plan of a push to a rack, the rack's rule; a rack's own servers rendered."""

from __future__ import annotations

from sidusd import config
from sidusd.boot import provider
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.image import rollout_plan as rp

M1 = "52:54:00:00:00:01"


def entry(path: str, size: int = 10, mtime: int = 100, kind: str = "f") -> rp.Entry:
    return rp.Entry(path, kind, 0o644, 0, 0, size, mtime)


# -- the plan -----------------------------------------------------------------------------------

def test_first_push_has_nothing_to_link_against():
    p = rp.plan_push("demo", 1, None, [], [])
    assert (p.already, p.reclaim, p.link_dest) == (False, False, None)
    assert p.staging_root == "images/demo/gen-0001.incoming" and p.final_root == "images/demo/gen-0001"
    assert p.staging_boot == "tftp/images/demo/gen-0001.incoming" and p.final_boot == "tftp/images/demo/gen-0001"


def test_link_dest_is_the_parent_if_it_arrived_else_the_nearest_older_else_newer():
    assert rp.plan_push("demo", 5, 3, [1, 3, 4], [1, 3, 4]).link_dest == 3
    assert rp.plan_push("demo", 5, 2, [1, 3, 4], [1, 3, 4]).link_dest == 4     # parent 2 not on the rack
    assert rp.plan_push("demo", 5, None, [7, 9], [7, 9]).link_dest == 7
    assert rp.plan_push("demo", 5, 4, [], [4]).link_dest is None               # 4 on disk, no marker: not a base


def test_an_arrived_generation_is_not_pushed_again_and_a_markerless_one_is_reclaimed():
    assert rp.plan_push("demo", 2, 1, [1, 2], [1, 2]).already
    p = rp.plan_push("demo", 2, 1, [1], [1, 2])
    assert p.reclaim and not p.already and p.link_dest == 1


def test_rsync_argv_syncs_contents_into_staging_with_link_dest():
    argv = rp.rsync_argv("rsync", "/b/gen-0002", "/r/gen-0002.incoming", "/r/gen-0001", ["--bwlimit=10"])
    assert argv == ["rsync", "-aH", "--numeric-ids", "--delete", "--stats", "--bwlimit=10",
                    "--link-dest=/r/gen-0001", "/b/gen-0002/", "/r/gen-0002.incoming/"]
    assert not any(a.startswith("--link-dest") for a in rp.rsync_argv("rsync", "/a", "/b", None))


# -- the marker and the rule ----------------------------------------------------------------------

def test_manifest_hash_sees_every_difference_and_not_the_order():
    base = [entry("root/a"), entry("root/b", 20)]
    h = rp.manifest_hash(base)
    assert rp.manifest_hash(list(reversed(base))) == h
    for other in ([entry("root/a")], base + [entry("root/c")], [entry("root/a"), entry("root/b", 21)],
                  [entry("root/a"), entry("root/b", 20, 101)], [entry("root/a"), entry("root/b", 20, kind="l")]):
        assert rp.manifest_hash(other) != h


def test_marker_round_trip_and_what_is_no_marker():
    m = rp.Marker("demo", 2, "a" * 64, 12, "/build/demo/gen-0002")
    assert rp.parse_marker(m.to_json(), "demo", 2) == m
    assert rp.parse_marker(m.to_json(), "demo", 3) is None          # another generation's marker
    assert rp.parse_marker(m.to_json(), "other", 2) is None
    assert rp.parse_marker(m.to_json()[:-20], "demo", 2) is None    # torn
    assert rp.parse_marker(None, "demo", 2) is None
    assert rp.parse_marker(b'{"v":1,"image":"demo","generation":2,"manifest":"xyz","entries":1}', "demo", 2) is None
    assert rp.parse_marker(b'{"v":1,"image":"demo","generation":2,"manifest":"' + b"a" * 64
                           + b'","entries":true}', "demo", 2) is None


def test_only_generations_on_disk_with_a_valid_marker_matching_the_disk_arrived():
    m1, m2 = rp.Marker("demo", 1, "1" * 64, 3), rp.Marker("demo", 2, "2" * 64, 3)
    markers = {1: m1, 2: m2, 3: None}
    assert rp.arrived(markers, [1, 2, 3]) == [1, 2]
    assert rp.arrived(markers, [2, 3]) == [2]                       # marker of 1 left, directory gone
    assert rp.arrived(markers, [1, 2, 3], {1: "1" * 64, 2: "f" * 64}) == [1]   # gen 2 changed on disk


def test_rack_entries_list_arrived_generations_and_the_name_only_for_an_arrived_current():
    roots = {1: "/r/images/demo/gen-0001", 2: "/r/images/demo/gen-0002"}
    e = rp.rack_entries("demo", [1, 2], 2, roots)
    assert set(e) == {"demo", "demo.gen-1", "demo.gen-2"}
    assert e["demo"] == {"root": "/r/images/demo/gen-0002", "kernel": "images/demo/gen-0002/vmlinuz",
                         "initrd": "images/demo/gen-0002/initrd.img"}
    assert set(rp.rack_entries("demo", [1], 2, roots)) == {"demo.gen-1"}   # current 2 has not arrived


def test_parse_stats_reads_rsync_figures():
    out = """
Number of files: 12 (reg: 9, dir: 3)
Number of regular files transferred: 2
Total file size: 31,457,280 bytes
Total transferred file size: 1,048,576 bytes
Literal data: 1,048,576 bytes
Matched data: 0 bytes
"""
    assert rp.parse_stats(out) == rp.RsyncStats(2, 1048576, 1048576, 31457280)
    assert rp.parse_stats("") == rp.RsyncStats(0, 0, 0, 0)


# -- "a machine is told its own rack's NFS/HTTP server": rendered per rack ------------------------

def rack_config(nfs: str | None, http: bool) -> config.Config:
    nfs_line = f"nfs: {{server_address: {nfs}}}" if nfs else ""
    return config.parse(f"""
dhcp: {{mode: proxy, interfaces: [eth1]}}
tftp: {{root: /srv/rack/tftp}}
http: {{enabled: {str(http).lower()}, port: 8080}}
{nfs_line}
images:
  demo: {{root: /srv/rack/images/demo/gen-0002, kernel: images/demo/gen-0002/vmlinuz,
          initrd: images/demo/gen-0002/initrd.img}}
""")


INV = Inventory({"default": Profile("default", "demo")}, {M1: Host(M1, "default", hostname="n1")})


def render(name: str, cfg: config.Config, server_ip: str) -> bytes:
    doc = provider.decide(name, provider.Asker(server_ip, "10.1.0.50", None), cfg, INV, lambda m, s: None)
    assert isinstance(doc, provider.Document), doc
    return doc.body


def test_each_rack_server_tells_its_machines_its_own_nfs_and_http_server():
    pxe = "pxelinux.cfg/01-" + M1.replace(":", "-")
    # rack A: sidusd on 10.1.0.2 with the NFS server of the rack on 10.1.0.3 (nfs.server_address)
    a = rack_config("10.1.0.3", http=True)
    body = render(pxe, a, "10.1.0.2")
    assert b"nfsroot=10.1.0.3:/srv/rack/images/demo/gen-0002," in body
    ipxe = render("boot/52-54-00-00-00-01.ipxe", a, "10.1.0.2")
    assert b"http://10.1.0.2:8080/images/demo/gen-0002/vmlinuz" in ipxe
    assert b"nfsroot=10.1.0.3:" in ipxe
    # rack B: the same image, nfs.server_address unset: the address the request arrived on (its own)
    b = rack_config(None, http=True)
    body = render(pxe, b, "10.2.0.2")
    assert b"nfsroot=10.2.0.2:/srv/rack/images/demo/gen-0002," in body and b"10.1.0." not in body
    assert b"http://10.2.0.2:8080/" in render("boot/52-54-00-00-00-01.ipxe", b, "10.2.0.2")
