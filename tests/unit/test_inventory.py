"""sidusd.boot.inventory: strict parsing, MAC spelling, edits, resolve() merging, checks against a config."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd import config, data
from sidusd.boot import inventory as inv_mod
from sidusd.boot.cmdline import append_problem
from sidusd.boot.inventory import BootTarget, Host, Inventory, Profile, normalize_mac
from sidusd.errors import InventoryError

CFG_TEXT = """
dhcp:
  mode: full
  interfaces: [eth1]
  unknown_hosts: {unknown}
  pool: {{network: 10.0.0.0/24, range_start: 10.0.0.100, range_end: 10.0.0.199}}
tftp: {{root: /srv/tftp}}
images:
  demo: {{root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img, append: console=ttyS0}}
  other: {{root: /srv/images/other, kernel: other/vmlinuz, initrd: other/initrd.img}}
"""
CFG = config.parse(CFG_TEXT.format(unknown="default"))
CFG_IGNORE = config.parse(CFG_TEXT.format(unknown="ignore"))

INV_TEXT = """
profiles:
  default: {image: demo, overlay: tmpfs, append: "quiet"}
  big: {image: other}
hosts:
  - {mac: "52:54:00:00:00:01", hostname: vm1, profile: default, append: "sidus.marker=one"}
  - {mac: 52-54-00-AB-CD-02, hostname: vm2.lab.example, profile: default, image: other, ip: 10.0.0.12}
  - mac: 52:54:00:00:00:03
    profile: big
"""


def test_parse_good_inventory():
    inv = inv_mod.parse_inventory(INV_TEXT)
    assert list(inv.hosts) == ["52:54:00:00:00:01", "52:54:00:ab:cd:02", "52:54:00:00:00:03"]
    assert inv.hosts["52:54:00:ab:cd:02"].ip == ipaddress.IPv4Address("10.0.0.12")
    assert inv.profiles["big"] == Profile("big", "other", "tmpfs", "")
    assert inv.hosts["52:54:00:00:00:03"].hostname is None        # unquoted MAC stayed a string
    inv_mod.check_against(inv, CFG)


def test_empty_document_is_an_empty_inventory():
    assert inv_mod.parse_inventory("") == Inventory()
    assert inv_mod.parse_inventory("# nothing yet\n") == Inventory()


@pytest.mark.parametrize("mac,want", [
    ("52:54:00:ab:cd:ef", "52:54:00:ab:cd:ef"),
    ("52-54-00-AB-CD-EF", "52:54:00:ab:cd:ef"),
    ("52:54:00:Ab:cD:eF", "52:54:00:ab:cd:ef"),
])
def test_normalize_mac_accepts(mac, want):
    assert normalize_mac(mac) == want


@pytest.mark.parametrize("mac,reason", [
    ("525400abcdef", "not a MAC address"),
    ("5254.00ab.cdef", "not a MAC address"),
    ("52:54:00-ab-cd-ef", "not a MAC address"),
    ("52:54:00:ab:cd", "not a MAC address"),
    ("52:54:00:ab:cd:ef:01", "not a MAC address"),
    ("52:54:00:ab:cd:eg", "not a MAC address"),
    ("2:54:00:ab:cd:ef", "not a MAC address"),
    (" 52:54:00:ab:cd:ef", "not a MAC address"),
    ("52:54:00:ab:cd:ef\n", "not a MAC address"),
    ("ff:ff:ff:ff:ff:ff", "multicast/broadcast"),
    ("01:00:5e:00:00:01", "multicast/broadcast"),
    ("00:00:00:00:00:00", "not a network card"),
    (None, "not a MAC address"),
    (525400, "not a MAC address"),
])
def test_normalize_mac_refuses(mac, reason):
    with pytest.raises(InventoryError) as exc:
        normalize_mac(mac)
    assert reason in exc.value.reason


def _inv(hosts: str, profiles: str = "  default: {image: demo}\n") -> str:
    return f"profiles:\n{profiles}hosts:\n{hosts}"


H1 = '  - {mac: "52:54:00:00:00:01", profile: default}\n'
BAD = [
    (_inv(H1 * 3 + '  - {mac: "52:54:00:00:00:04", profle: default}\n'), "hosts[3].profle",
     "unknown key (did you mean profile?)"),
    (_inv('  - {mac: "52:54:00:00:00:01"}\n'), "hosts[0].profile", "required key is missing"),
    (_inv('  - {profile: default}\n'), "hosts[0].mac", "required key is missing"),
    (_inv('  - {mac: "52:54:00:00:00:1", profile: default}\n'), "hosts[0].mac", "not a MAC address"),
    (_inv('  - {mac: 525400000001, profile: default}\n'), "hosts[0].mac", "expected a string, got integer"),
    (_inv(H1 + '  - {mac: "52-54-00-00-00-01", profile: default}\n'), "hosts[1].mac",
     "duplicate MAC 52:54:00:00:00:01 (already in hosts[0])"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, hostname: a}\n'
          '  - {mac: "52:54:00:00:00:02", profile: default, hostname: A}\n'), "hosts[1].hostname",
     "duplicate host name 'A'"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, ip: 10.0.0.5}\n'
          '  - {mac: "52:54:00:00:00:02", profile: default, ip: 10.0.0.5}\n'), "hosts[1].ip",
     "duplicate address 10.0.0.5"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: nope}\n'), "hosts[0].profile",
     "unknown profile 'nope' (profiles: default)"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, hostname: "-bad"}\n'), "hosts[0].hostname",
     "not a valid host name label"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, hostname: "a..b"}\n'), "hosts[0].hostname",
     "not a valid host name label"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, hostname: "under_score"}\n'), "hosts[0].hostname",
     "RFC 1123"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, ip: 10.0.0}\n'), "hosts[0].ip",
     "not an IPv4 address"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, ip: 224.0.0.1}\n'), "hosts[0].ip",
     "cannot be given to a host"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, append: "a\\nDEFAULT evil"}\n'), "hosts[0].append",
     "control character"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, append: "x || shell"}\n'), "hosts[0].append",
     "not allowed in kernel arguments"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, append: "caf\\u00e9"}\n'), "hosts[0].append",
     "only printable ASCII"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, append: "%s"}\n' % ("x" * 600)),
     "hosts[0].append", "longer than 512"),
    (_inv('  - {mac: "52:54:00:00:00:01", profile: default, image: "../x"}\n'), "hosts[0].image",
     "not a valid image name"),
    (_inv("", "  default: {image: demo, overlay: disk}\n"), "profiles.default.overlay",
     "must be one of: tmpfs, iscsi"),
    (_inv("", "  default: {overlay: tmpfs}\n"), "profiles.default.image", "required key is missing"),
    (_inv("", "  default: {image: demo, apend: x}\n"), "profiles.default.apend", "did you mean append?"),
    (_inv("", "  bad/name: {image: demo}\n"), "profiles.bad/name", "not a valid profile name"),
    ("hosts: {mac: x}\n", "hosts", "expected a list, got a mapping"),
    ("hosts:\n  - 52:54:00:00:00:01\n", "hosts[0]", "expected a mapping, got string"),
    ("profiles: {}\nhots: []\n", "hots", "did you mean hosts?"),
]


@pytest.mark.parametrize("text,path,reason", BAD, ids=[b[1] + ":" + b[2][:30] for b in BAD])
def test_bad_inventory_refused(text, path, reason):
    with pytest.raises(InventoryError) as exc:
        inv_mod.parse_inventory(text)
    assert exc.value.path == path
    assert reason in exc.value.reason


def test_host_validates_itself():
    h = Host(mac="52-54-00-00-00-09", profile="default", ip="10.0.0.9", append=None)
    assert (h.mac, h.ip, h.append) == ("52:54:00:00:00:09", ipaddress.IPv4Address("10.0.0.9"), "")
    with pytest.raises(InventoryError, match="host.hostname"):
        Host(mac="52:54:00:00:00:09", profile="default", hostname="bad host")
    with pytest.raises(InventoryError, match="host.append"):
        Host(mac="52:54:00:00:00:09", profile="default", append="x\rDEFAULT y")


def test_with_host_adds_and_replaces():
    inv = inv_mod.parse_inventory(INV_TEXT)
    new = Host(mac="52:54:00:00:00:04", profile="big", hostname="vm4")
    inv2 = inv.with_host(new)
    assert "52:54:00:00:00:04" in inv2.hosts and "52:54:00:00:00:04" not in inv.hosts   # immutable
    replaced = inv2.with_host(Host(mac="52-54-00-00-00-01", profile="big"))
    assert replaced.hosts["52:54:00:00:00:01"].profile == "big"
    assert len(replaced.hosts) == len(inv2.hosts)
    with pytest.raises(InventoryError, match="unknown profile 'missing'"):
        inv.with_host(Host(mac="52:54:00:00:00:05", profile="missing"))
    with pytest.raises(InventoryError, match="duplicate host name 'VM1'"):
        inv.with_host(Host(mac="52:54:00:00:00:05", profile="default", hostname="VM1"))
    with pytest.raises(InventoryError, match="duplicate address 10.0.0.12"):
        inv.with_host(Host(mac="52:54:00:00:00:05", profile="default", ip="10.0.0.12"))
    # replacing a host by itself with its own hostname/IP is not a duplicate
    same = inv.hosts["52:54:00:ab:cd:02"]
    assert inv.with_host(same) == inv


def test_without_host():
    inv = inv_mod.parse_inventory(INV_TEXT)
    smaller = inv.without_host("52-54-00-AB-CD-02")
    assert list(smaller.hosts) == ["52:54:00:00:00:01", "52:54:00:00:00:03"]
    with pytest.raises(InventoryError) as exc:
        smaller.without_host("52:54:00:ab:cd:02")
    assert exc.value.path == "hosts[52:54:00:ab:cd:02]" and exc.value.reason == "no such host"


def test_resolve_merges_host_profile_image():
    inv = inv_mod.parse_inventory(INV_TEXT)
    t = inv.resolve("52-54-00-00-00-01", CFG)
    assert t == BootTarget(mac="52:54:00:00:00:01", hostname="vm1", profile="default", image="demo",
                           image_root=Path("/srv/images/demo"), kernel="demo/vmlinuz",
                           initrd="demo/initrd.img", overlay="tmpfs",
                           append="console=ttyS0 quiet sidus.marker=one")
    t2 = inv.resolve("52:54:00:ab:cd:02", CFG)                 # host image overrides the profile's
    assert (t2.image, t2.kernel, t2.image_root, t2.append) == \
        ("other", "other/vmlinuz", Path("/srv/images/other"), "quiet")
    t3 = inv.resolve("52:54:00:00:00:03", CFG)
    assert (t3.profile, t3.image, t3.append, t3.hostname) == ("big", "other", "", None)


def test_resolve_unknown_mac_follows_unknown_hosts():
    inv = inv_mod.parse_inventory(INV_TEXT)
    t = inv.resolve("52:54:00:99:99:99", CFG)
    assert (t.mac, t.hostname, t.profile, t.image, t.append) == (None, None, "default", "demo",
                                                                "console=ttyS0 quiet")
    assert inv.resolve(None, CFG) == t
    assert inv.resolve("52:54:00:99:99:99", CFG_IGNORE) is None
    assert inv.resolve("52:54:00:00:00:01", CFG_IGNORE).hostname == "vm1"     # known hosts still boot
    no_default = Inventory({"big": Profile("big", "other")}, {})
    assert no_default.resolve("52:54:00:99:99:99", CFG) is None
    with pytest.raises(InventoryError):
        inv.resolve("not-a-mac", CFG)


def test_check_against_config():
    inv = inv_mod.parse_inventory(INV_TEXT)
    cases = [
        (inv.with_host(Host(mac="52:54:00:00:00:07", profile="default", image="gone")),
         CFG, "hosts[52:54:00:00:00:07].image", "unknown image 'gone' (images in the config: demo, other)"),
        (Inventory({**inv.profiles, "x": Profile("x", "gone")}, inv.hosts), CFG,
         "profiles.x.image", "unknown image 'gone'"),
        (Inventory({"big": Profile("big", "other")}, {}), CFG, "profiles.default",
         "missing: it is boot.default_profile"),
        (Inventory({"default": Profile("default", "demo", overlay="iscsi")}, {}), CFG,
         "profiles.default.overlay", "needs an iSCSI target: set iscsi.backend"),
        (inv.with_host(Host(mac="52:54:00:00:00:07", profile="default", ip="192.168.1.7")), CFG,
         "hosts[52:54:00:00:00:07].ip", "outside dhcp.pool.network 10.0.0.0/24"),
    ]
    for bad_inv, cfg, path, reason in cases:
        with pytest.raises(InventoryError) as exc:
            inv_mod.check_against(bad_inv, cfg)
        assert exc.value.path == path and reason in exc.value.reason
    # without the default profile but with unknown_hosts: ignore, nothing is missing
    inv_mod.check_against(Inventory({"big": Profile("big", "other")}, {}), CFG_IGNORE)


def test_example_inventory_boots_the_example_recipes_image():
    """The shipped inventory's profile boots the image the README builds from the shipped recipe;
    with that image in the config's images file it checks against the shipped config."""
    from sidusd.image.recipe import read_recipe
    inv = inv_mod.parse_inventory(data.EXAMPLE_INVENTORY.read_text(), str(data.EXAMPLE_INVENTORY))
    name = read_recipe(data.RECIPES / "example.yaml").name
    assert {p.image for p in inv.profiles.values()} == {name}
    base = config.read(data.EXAMPLE_CONFIG)
    built = config.merge_images_file(base, f"images:\n  {name}: {{root: /r, kernel: k, initrd: i}}\n", "gen.yaml")
    inv_mod.check_against(inv, built)
    with pytest.raises(InventoryError, match=f"unknown image '{name}'"):
        inv_mod.check_against(inv, base)         # before the image is built
    assert len(inv.hosts) >= 2


# -- dump / parse round trip ---------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
_args = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="$|&\\"),
                max_size=40).filter(lambda a: append_problem(a) is None)  # boot.cmdline rules
_mac = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in [b[0] & 0xFE | 0x02] + b[1:]))


@st.composite
def inventories(draw):
    pnames = draw(st.lists(_name, min_size=1, max_size=4, unique=True))
    profiles = {n: Profile(n, draw(_name), draw(st.sampled_from(["tmpfs", "iscsi"])), draw(_args))
                for n in pnames}
    inv = Inventory(profiles, {})
    for i, mac in enumerate(draw(st.lists(_mac, max_size=8, unique=True))):
        hostname = draw(st.none() | st.builds(lambda a, b, i=i: f"{a}{i}.{b}", _label, _label))
        ip = draw(st.none() | st.just(f"10.1.{i}.{draw(st.integers(1, 254))}"))
        inv = inv.with_host(Host(mac=mac, profile=draw(st.sampled_from(pnames)), hostname=hostname,
                                 image=draw(st.none() | _name), ip=ip, append=draw(_args)))
    return inv


@settings(max_examples=150, deadline=None)
@given(inventories())
def test_dump_round_trips(inv):
    text = inv_mod.dump_inventory(inv)
    again = inv_mod.parse_inventory(text)
    assert again == inv
    assert list(again.hosts) == list(inv.hosts)          # order kept
    assert inv_mod.dump_inventory(again) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text_raises_only_inventory_error(text):
    try:
        inv_mod.parse_inventory(text)
    except InventoryError:
        pass


_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=12) | \
    st.sampled_from(["52:54:00:00:00:01", "52-54-00-00-00-01", "default", "demo", "10.0.0.1", "tmpfs"])
_host = st.dictionaries(st.sampled_from(["mac", "profile", "hostname", "image", "ip", "append", "x"]),
                        _scalar, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["default", "p"]),
                       st.dictionaries(st.sampled_from(["image", "overlay", "append"]), _scalar) | _scalar,
                       max_size=2),
       st.lists(_host | _scalar, max_size=4))
def test_fuzz_structure_raises_only_inventory_error(profiles, hosts):
    import yaml
    try:
        inv = inv_mod.parse_inventory(yaml.safe_dump({"profiles": profiles, "hosts": hosts}))
    except InventoryError:
        return
    assert inv_mod.parse_inventory(inv_mod.dump_inventory(inv)) == inv
