"""The shared state's snapshot (sidusd/state/snapshot.py): schema, local-copy bytes, inventory, diff."""

import pytest

from sidusd import config
from sidusd.boot.inventory import InventoryError
from sidusd.errors import ConfigError
from sidusd.state import snapshot as S
from sidusd.state.service import build

PROFILES = {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}
H1 = {"mac": "52:54:00:00:00:01", "profile": "default", "hostname": "n1", "append": "a=1"}
H2 = {"mac": "52:54:00:00:00:02", "profile": "default"}


def cfg():
    return config.parse("dhcp: {mode: off}\ntftp: {root: /srv/tftp}\n"
                        "images: {demo: {root: /srv/img/demo, kernel: k, initrd: i}}\n")


def test_bytes_round_trip_and_refusal_names_the_source():
    snap = S.StateSnapshot(revision=7, profiles=PROFILES, hosts=[H1], images={})
    assert S.decode(S.encode(snap)) == snap
    with pytest.raises(ConfigError) as e:
        S.decode(b'{"revision": 1, "hostz": []}', "/var/lib/sidus/state-snapshot.json")
    assert e.value.path == "/var/lib/sidus/state-snapshot.json" and "hostz" in e.value.reason
    with pytest.raises(ConfigError):
        S.decode(b"\x00garbage", "x")


def test_inventory_is_checked_as_the_inventory_file_is():
    inv = S.to_inventory(S.StateSnapshot(profiles=PROFILES, hosts=[H1, H2]))
    assert set(inv.hosts) == {"52:54:00:00:00:01", "52:54:00:00:00:02"}
    assert inv.hosts["52:54:00:00:00:01"].append == "a=1"
    with pytest.raises(InventoryError) as e:
        S.to_inventory(S.StateSnapshot(profiles=PROFILES, hosts=[H1, {**H2, "profile": "nope"}]))
    assert e.value.path == "hosts[1].profile"
    with pytest.raises(InventoryError) as e:
        S.to_inventory(S.StateSnapshot(profiles=PROFILES, hosts=[{**H1, "mac": "ff:ff:ff:ff:ff:ff"}]))
    assert e.value.path == "hosts[0].mac"


def test_images_come_from_the_snapshot_and_a_clash_is_refused():
    snap = S.StateSnapshot(profiles={**PROFILES, "p": {"image": "gen7"}}, hosts=[{**H1, "profile": "p"}],
                           images={"gen7": {"root": "/srv/img/gen7", "kernel": "k7", "initrd": "i7"}})
    c, inv = build(cfg(), snap)
    assert set(c.images) == {"demo", "gen7"} and str(c.images["gen7"].root) == "/srv/img/gen7"
    assert inv.resolve("52:54:00:00:00:01", c).kernel == "k7"
    with pytest.raises(ConfigError) as e:
        build(cfg(), S.StateSnapshot(profiles=PROFILES, images={"demo": {"root": "/x", "kernel": "k", "initrd": "i"}}))
    assert e.value.path == "images.demo"
    with pytest.raises(ConfigError) as e:      # a profile naming an image nobody has
        build(cfg(), S.StateSnapshot(profiles={"default": {"image": "gone"}}))
    assert e.value.path == "profiles.default.image"


def test_diff_says_what_changed():
    old = S.StateSnapshot(revision=1, profiles=PROFILES, hosts=[H1, H2])
    new = S.StateSnapshot(revision=2, profiles={**PROFILES, "big": {"image": "demo"}},
                          hosts=[{**H1, "append": "a=2"}, {"mac": "52:54:00:00:00:03", "profile": "default"}])
    d = S.diff(old, new)
    assert d.hosts_added == ("52:54:00:00:00:03",) and d.hosts_removed == ("52:54:00:00:00:02",)
    assert d.hosts_changed == ("52:54:00:00:00:01",) and d.profiles_changed == ("big",)
    assert not d.empty and d.summary()["hosts_added"] == 1
    assert S.diff(old, old).empty
    assert S.diff(None, old).hosts_added == ("52:54:00:00:00:01", "52:54:00:00:00:02")
    # a MAC spelled another way is the same host
    assert S.diff(old, S.StateSnapshot(profiles=PROFILES, hosts=[{**H1, "mac": "52-54-00-00-00-01"}, H2])).empty


@pytest.mark.parametrize("module", ["snapshot", "queue"])
def test_the_pure_state_modules_import_no_io(module):
    import ast
    from pathlib import Path

    import sidusd.state
    tree = ast.parse((Path(sidusd.state.__file__).parent / f"{module}.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"socket", "asyncio", "time", "logging", "structlog", "psycopg", "os"}, names
