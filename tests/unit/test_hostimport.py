"""sidusd.boot.hostimport: a hand-made site's host files (the golden files under
tests/golden/migration/ are the documentation's set-up, with real-looking hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.boot import hostimport as hi
from sidusd.boot.hostbatch import apply_batch
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.errors import InventoryError

G = Path(__file__).resolve().parent.parent / "golden" / "migration"


def summary(p: hi.Parsed) -> list[tuple]:
    return [(h.mac, h.hostname, h.ip, h.source.rsplit(":", 1)[1]) for h in p.hosts]


def test_dhcpd_golden_hosts_at_any_depth_quoted_names_and_host_name_option():
    p = hi.parse_dhcpd((G / "dhcpd.conf").read_text(), "dhcpd.conf")
    assert p.errors == ()
    assert summary(p) == [("52:54:00:12:00:01", "node01", "10.13.20.201", "20"),
                          ("52:54:00:12:00:02", "node02", "10.13.20.202", "21"),
                          ("52:54:00:12:00:03", "gpu03", "10.13.20.203", "25"),      # option host-name wins
                          ("52:54:00:ab:00:10", "ws-hall-1", None, "36")]           # no fixed-address


def test_ethers_golden_names_addresses_and_short_groups():
    p = hi.parse_ethers((G / "ethers").read_text(), "ethers")
    assert p.errors == ()
    assert summary(p) == [("52:54:00:12:00:21", "node21", None, "2"),
                          ("52:54:00:12:00:22", "node22", None, "3"),
                          ("52:54:00:12:00:23", None, "10.13.20.223", "4")]


def test_csv_golden_columns_profiles_and_quoted_append():
    p = hi.parse_csv((G / "hosts.csv").read_text(), "hosts.csv")
    assert p.errors == ()
    assert [(h.mac, h.profile, h.append, h.source) for h in p.hosts] == [
        ("52:54:00:12:00:31", "default", "", "hosts.csv:2"),
        ("52:54:00:12:00:32", "persistent", "console=ttyS0 quiet", "hosts.csv:3"),
        ("52:54:00:12:00:33", "default", "sidus.marker=a b", "hosts.csv:5")]
    assert p.hosts[0].ip == "10.13.20.231" and p.hosts[1].ip is None


def test_pxelinux_directory_keeps_only_what_sidus_does_not_render():
    d = G / "pxelinux.cfg"
    p = hi.parse_pxelinux({f.name: f.read_text() for f in d.iterdir()}, "pxelinux.cfg")
    assert p.errors == ()
    by = {h.mac: h for h in p.hosts}
    assert sorted(by) == ["52:54:00:12:00:41", "52:54:00:12:00:42"]     # default and 0A0D14CA: not per-MAC
    assert len(p.notes) == 2 and all("not a per-MAC file" in n for n in p.notes)
    n41, n42 = by["52:54:00:12:00:41"], by["52:54:00:12:00:42"]
    assert n41.append == "console=tty1 nouveau.modeset=0 console=ttyS0,115200"
    assert n41.overlay_hint == "tmpfs" and "initrd=initrd.img-Sidus" in n41.dropped
    # DEFAULT iscsi picks the (lower-case) iscsi label, not the first one
    assert n42.append == "console=tty1" and n42.overlay_hint == "iscsi"
    assert "ISCSI_INITIATOR=iqn.2013-04.zone.sidus.target:node42" in n42.dropped
    assert n42.source.endswith("01-52-54-00-12-00-42:9")


@pytest.mark.parametrize("text,where,reason", [
    ("host a { hardware ethernet 52:54:00:00:00:01; fixed-address 10.0.0.1;\n", ":1", "never closed"),
    ("group {\n host a { hardware ethernet 52:54:00:00:00:01; }\n", ":1", "never closed"),
    ("}\n", ":1", "without a matching"),
    ('option domain-name "x;\n', ":1", "unterminated string"),
    ("\n\nhost b { fixed-address 10.0.0.2; }\n", ":3", "no 'hardware ethernet'"),
    ("host c {\n hardware token-ring 52:54:00:00:00:03; }\n", ":2", "only 'hardware ethernet'"),
    ("host d { hardware ethernet 01:00:5e:00:00:01; }", ":1", "multicast"),
    ("host e { hardware ethernet 52:54:00:00:00:05; fixed-address e.example.org; }", ":1", "not an IPv4"),
    ("host f_1 { hardware ethernet 52:54:00:00:00:06; }", ":1", "host name"),
])
def test_dhcpd_errors_name_file_and_line(text, where, reason):
    p = hi.parse_dhcpd(text, "site.conf")
    assert p.errors, p
    assert str(p.errors[0]).startswith("site.conf" + where), p.errors
    assert reason in p.errors[0].reason, p.errors


def test_ethers_and_csv_errors_name_the_line():
    p = hi.parse_ethers("52:54:00:00:00:01 a\n52:54:00:00:00 b\n52:54:00:00:00:03 c d\n", "ethers")
    assert [e.source for e in p.errors] == ["ethers:2", "ethers:3"] and len(p.hosts) == 1
    p = hi.parse_csv("mac,hostname\n52:54:00:00:00:01,a,extra\n52:54:00:00:00:02,b$\n", "h.csv")
    assert [e.source for e in p.errors] == ["h.csv:2", "h.csv:3"]
    p = hi.parse_csv("mac,hostnme\n", "h.csv")
    assert p.errors[0].source == "h.csv:1" and "bad header" in p.errors[0].reason
    assert hi.parse_csv("# only a comment\n", "h.csv").errors[0].reason.startswith("empty")
    p = hi.parse_csv("mac,append\n52:54:00:00:00:01,console=$x\n", "h.csv")
    assert p.errors[0].source == "h.csv:2" and "'$'" in p.errors[0].reason


def test_merge_refuses_a_mac_twice_and_one_in_the_inventory_with_both_places():
    a = hi.parse_ethers("52:54:00:12:00:21 node21\n", "ethers")
    b = hi.parse_dhcpd("host x { hardware ethernet 52-54-00-12-00-21; }\n"
                       "host y { hardware ethernet 52:54:00:12:00:99; }\n"
                       "host z { hardware ethernet 52:54:00:12:00:99; }", "dhcpd.conf")
    m = hi.merge([a, b], {"52:54:00:12:00:99": "host old99"})
    assert [str(e) for e in m.errors] == [
        "dhcpd.conf:1: MAC 52:54:00:12:00:21: hostname 'x' differs from 'node21' at ethers:1",
        "dhcpd.conf:2: MAC 52:54:00:12:00:99 is already in the inventory (host old99); --replace replaces it",
        "dhcpd.conf:3: MAC 52:54:00:12:00:99 is already at a line above"]
    m = hi.merge([b], {"52:54:00:12:00:99": "host old99"}, replace_existing=True)
    assert [str(e) for e in m.errors] == ["dhcpd.conf:3: MAC 52:54:00:12:00:99 is already at dhcpd.conf:2"]


def test_merge_joins_one_mac_of_two_files_that_agree():
    conf = hi.parse_dhcpd("host n41 { hardware ethernet 52:54:00:12:00:41; fixed-address 10.13.20.241; }", "d")
    d = G / "pxelinux.cfg"
    pxe = hi.parse_pxelinux({f.name: f.read_text() for f in d.iterdir()}, "p")
    m = hi.merge([conf, pxe], {})
    assert m.errors == ()
    n41 = next(h for h in m.hosts if h.mac == "52:54:00:12:00:41")
    assert (n41.hostname, n41.ip, n41.overlay_hint) == ("n41", "10.13.20.241", "tmpfs")
    assert n41.append == "console=tty1 nouveau.modeset=0 console=ttyS0,115200"
    assert n41.source == "d:1 + p/01-52-54-00-12-00-41:5" and n41.dropped
    assert len(m.hosts) == 2


def test_detect_format():
    assert hi.detect_format("hosts.csv", "") == "csv"
    assert hi.detect_format("list", "mac,hostname\n") == "csv"
    assert hi.detect_format("x.conf", "host a {\n  hardware   ethernet 52:54:00:00:00:01; }") == "dhcpd"
    assert hi.detect_format("ethers", "# c\n52:54:00:00:00:01 a\n") == "ethers"


def inventory() -> Inventory:
    prof = {"default": Profile("default", "demo")}
    return Inventory(prof, {"52:54:00:00:00:01": Host("52:54:00:00:00:01", "default", hostname="old")})


def test_apply_batch_all_or_nothing_and_names_the_source():
    inv = inventory()
    new = [Host("52:54:00:00:00:02", "default", hostname="n2"), Host("52:54:00:00:00:03", "default")]
    out = apply_batch(inv, new, ["f:1", "f:2"])
    assert sorted(out.hosts) == ["52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"]
    with pytest.raises(InventoryError, match=r"already in the inventory: 52:54:00:00:00:01 \(from f:9\)"):
        apply_batch(inv, [Host("52:54:00:00:00:01", "default")], ["f:9"])
    assert apply_batch(inv, [Host("52:54:00:00:00:01", "default")], ["f:9"],
                          replace_existing=True).hosts["52:54:00:00:00:01"].hostname is None
    # a host name clash with a host already there: refused, naming the file and line
    with pytest.raises(InventoryError, match=r"duplicate host name 'old'.*\(imported from f:7\); nothing"):
        apply_batch(inv, [Host("52:54:00:00:00:04", "default", hostname="old")], ["f:7"])
    with pytest.raises(InventoryError, match="unknown profile"):
        apply_batch(inv, [Host("52:54:00:00:00:05", "nosuch")], [None])
    with pytest.raises(InventoryError, match="twice"):
        apply_batch(inv, [Host("52:54:00:00:00:06", "default")] * 2, [None, None])
    assert sorted(inv.hosts) == ["52:54:00:00:00:01"]          # immutable: nothing changed


macs = st.lists(st.integers(0, 2 ** 40 - 1), min_size=1, max_size=8, unique=True).map(
    lambda ns: [":".join(f"{b:02x}" for b in (0x52, *n.to_bytes(5, "big"))) for n in ns])
names = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(macs, st.data())
def test_roundtrip_dhcpd_ethers_csv(ms, data):
    """Hosts written the way each file format writes them are read back exactly."""
    hosts = [(m, data.draw(names), f"10.1.{i}.{data.draw(st.integers(1, 254))}") for i, m in enumerate(ms)]
    conf = "subnet 10.1.0.0 netmask 255.255.0.0 {\n" + "".join(
        f'  host "{n}" {{ # c\n hardware ethernet {m.upper()};\n fixed-address {ip}; }}\n'
        for m, n, ip in hosts) + "}\n"
    ethers = "".join(f"{m.replace(':', '-')}\t{n}\n" for m, n, _ in hosts)
    csvt = "ip,mac,hostname\n" + "".join(f"{ip},{m},{n}\n" for m, n, ip in hosts)
    for parsed, with_ip in ((hi.parse_dhcpd(conf, "c"), True), (hi.parse_ethers(ethers, "e"), False),
                            (hi.parse_csv(csvt, "v"), True)):
        assert parsed.errors == ()
        assert [(h.mac, h.hostname, h.ip) for h in parsed.hosts] == [
            (m, n, ip if with_ip else None) for m, n, ip in hosts]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('host{};"#\n ethernethardware52:54:00:01fixed-address10.0.0.1'),
               max_size=200))
def test_dhcpd_parser_never_raises(text):
    p = hi.parse_dhcpd(text, "f")
    for e in p.errors:
        assert e.source.startswith("f:") and e.source[2:].isdigit()
