"""boot.policy: the proxyDHCP decision table and the full-DHCP exchanges (pure, no sockets)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from sidusd.boot import policy
from sidusd.boot.leases import LeaseDB, Reservations
from sidusd.config import BootConfig, BootFiles, Config, DhcpConfig, HttpConfig, PoolConfig, TftpConfig
from sidusd.proto import dhcp

IP = ipaddress.IPv4Address
SERVER = IP("10.0.0.1")
MAC = "52:54:00:12:34:56"
UUID = b"\x00" + bytes(range(16))
BIOS_VCI = b"PXEClient:Arch:00000:UNDI:002001"
EFI_VCI = b"PXEClient:Arch:00007:UNDI:003016"


def config(mode="proxy", chain=False, http=True, ia32=None, arm64="grubaa64.efi", **pool_kw):
    pool = None
    if mode == "full":
        kw = dict(network=ipaddress.IPv4Network("10.0.0.0/24"), range_start=IP("10.0.0.100"),
                  range_end=IP("10.0.0.102"), router=IP("10.0.0.254"),
                  dns_servers=(IP("10.0.0.53"), IP("10.0.0.54")), domain="lab.example",
                  lease_time_s=3600)
        kw.update(pool_kw)
        pool = PoolConfig(**kw)
    return Config(tftp=TftpConfig(root=Path("/srv/tftp")),
                  dhcp=DhcpConfig(mode=mode, interfaces=("br0",), pool=pool),
                  boot=BootConfig(boot_files=BootFiles(uefi_ia32=ia32, arm64=arm64), ipxe_chain=chain),
                  http=HttpConfig(enabled=http, port=8080))


def pkt(msg=dhcp.DHCPDISCOVER, arch: int | None = 0, vci: bytes | None = BIOS_VCI, uuid=UUID,
        ipxe=False, ipxe175=False, mac=MAC, extra=(), **fields):
    opts: list[tuple[int, bytes]] = [(dhcp.OPT_MESSAGE_TYPE, bytes([msg]))]
    if arch is not None:
        opts.append((dhcp.OPT_CLIENT_ARCH, struct.pack("!H", arch)))
    if vci is not None:
        opts.append((dhcp.OPT_VENDOR_CLASS, vci))
    if uuid is not None:
        opts.append((dhcp.OPT_CLIENT_UUID, uuid))
    if ipxe:
        opts.append((dhcp.OPT_USER_CLASS, b"iPXE"))
    if ipxe175:
        opts.append((dhcp.OPT_IPXE_ENCAP, bytes([0x13, 1, 1])))
    opts.extend(extra)
    fields.setdefault("flags", 0x8000)
    return dhcp.DhcpPacket(op=1, xid=0xabcdef01, chaddr=bytes.fromhex(mac.replace(":", "")),
                           options=tuple(opts), **fields)


def req(p, via=policy.VIA_DHCP, source=("0.0.0.0", 68)):
    # Every request goes through the codec: what the policy sees is what decode gives.
    return policy.BootRequest.from_packet(dhcp.decode(dhcp.encode(p)), via, SERVER, source)


def known(mac):
    return True


def decide(p, cfg=None, via=policy.VIA_DHCP, lookup=known, **kw):
    return policy.decide(req(p, via, kw.pop("source", ("0.0.0.0", 68))), cfg or config(), lookup, **kw)


# -- proxyDHCP decision table: one row per firmware type --------------------------

URL_IPXE = f"http://{SERVER}:8080/boot/52-54-00-12-34-56.ipxe"

TABLE = [
    # id,                 packet kwargs,                                    chain, file
    ("bios-pxe",          dict(arch=0),                                     False, "pxelinux.0"),
    ("uefi-x64-7",        dict(arch=7, vci=EFI_VCI),                        False, "syslinux.efi"),
    ("uefi-x64-9",        dict(arch=9, vci=EFI_VCI),                        False, "syslinux.efi"),
    ("uefi-ia32",         dict(arch=6, vci=EFI_VCI),                        False, "ia32.efi"),
    ("arm64",             dict(arch=11, vci=EFI_VCI),                       False, "grubaa64.efi"),
    # UEFI HTTP Boot: iPXE (boot.loader.http), never syslinux.efi (it needs PXE base code, issue 18)
    ("http-client-16",    dict(arch=16, vci=b"HTTPClient:Arch:00016:UNDI:003001"), False,
     f"http://{SERVER}:8080/snponly.efi"),
    ("ipxe-bios",         dict(arch=0, ipxe=True, ipxe175=True),            False, "pxelinux.0"),
    ("ipxe-efi",          dict(arch=7, vci=EFI_VCI, ipxe=True),             False, "syslinux.efi"),
    ("no-option-93",      dict(arch=None),                                  False, "pxelinux.0"),
    ("no-option-97",      dict(arch=0, uuid=None),                          False, "pxelinux.0"),
    ("empty-option-97",   dict(arch=0, uuid=b""),                           False, "pxelinux.0"),
    ("chain-bios",        dict(arch=0),                                     True, "undionly.kpxe"),
    ("chain-uefi-x64",    dict(arch=7, vci=EFI_VCI),                        True, "snponly.efi"),
    ("chain-ipxe-bios",   dict(arch=0, ipxe=True),                          True, URL_IPXE),
    ("chain-ipxe-efi-175", dict(arch=7, vci=EFI_VCI, ipxe175=True),         True, URL_IPXE),
    ("chain-ia32-native", dict(arch=6, vci=EFI_VCI),                        True, "ia32.efi"),
    ("chain-http-16",     dict(arch=16, vci=b"HTTPClient:Arch:00016"),     True,
     f"http://{SERVER}:8080/snponly.efi"),
]


@pytest.mark.parametrize("name, kw, chain, file", TABLE, ids=[r[0] for r in TABLE])
def test_proxy_offer_table(name, kw, chain, file):
    p = pkt(**kw)
    d = decide(p, config(chain=chain, ia32="ia32.efi"))
    assert isinstance(d, policy.Reply), d
    assert d.kind == "offer" and d.boot_file == file and d.lease is None
    r = d.packet
    assert r.op == dhcp.BOOTREPLY and r.xid == p.xid and r.chaddr == p.chaddr
    assert r.flags == p.flags and r.giaddr == p.giaddr
    assert r.yiaddr == IP(0) and r.ciaddr == IP(0) and r.siaddr == SERVER
    assert r.file == file.encode()
    assert r.message_type == dhcp.DHCPOFFER
    assert r.option(dhcp.OPT_SERVER_ID) == SERVER.packed
    http = kw.get("vci", b"").startswith(b"HTTPClient")
    assert r.option(dhcp.OPT_VENDOR_CLASS) == (b"HTTPClient" if http else b"PXEClient")
    assert r.option(dhcp.OPT_VENDOR_SPECIFIC) == (None if http else bytes([6, 1, 8, 255]))
    assert r.option(dhcp.OPT_CLIENT_UUID) == p.option(dhcp.OPT_CLIENT_UUID)
    for code in (dhcp.OPT_LEASE_TIME, dhcp.OPT_SUBNET_MASK, dhcp.OPT_ROUTER, dhcp.OPT_BOOTFILE):
        assert r.option(code) is None
    assert d.dest == ("255.255.255.255", 68)


@pytest.mark.parametrize("kw, cfg, code", [
    (dict(vci=b"MSFT 5.0"), config(), "not_pxe"),
    (dict(vci=None), config(), "not_pxe"),
    (dict(vci=b"PXECli"), config(), "not_pxe"),
    (dict(arch=6, vci=EFI_VCI), config(ia32=None), "no_boot_file"),
    (dict(arch=11, vci=EFI_VCI), config(arm64=None), "no_boot_file"),
    (dict(arch=10, vci=EFI_VCI), config(), "no_boot_file"),          # arm32: unsupported
    (dict(arch=16, vci=b"HTTPClient"), config(http=False), "no_boot_file"),
    (dict(ipxe=True), config(chain=True, http=False), "no_boot_file"),
    (dict(msg=dhcp.DHCPRELEASE), config(), "ignored"),
    (dict(msg=dhcp.DHCPOFFER), config(), "not_request"),
    (dict(mac="01:00:5e:00:00:01"), config(), "bad_chaddr"),
    (dict(mac="00:00:00:00:00:00"), config(), "bad_chaddr"),
    (dict(), config(mode="off"), "disabled"),
])
def test_proxy_drops(kw, cfg, code):
    d = decide(pkt(**kw), cfg)
    assert isinstance(d, policy.Drop) and d.code == code, d


def test_bootp_and_reply_and_non_ethernet_dropped():
    p = pkt()
    assert decide(replace(p, options=tuple(o for o in p.options if o[0] != 53))).code == "bootp"
    assert decide(replace(p, op=2)).code == "not_request"
    assert decide(replace(p, htype=6)).code == "bad_chaddr"


def test_unknown_host_lookup():
    seen = []

    def lookup(mac):
        seen.append(mac)
        return None

    d = decide(pkt(), lookup=lookup)
    assert isinstance(d, policy.Drop) and d.code == "unknown_host" and seen == [MAC]


def test_request_on_4011_acked_to_source():
    p = pkt(dhcp.DHCPREQUEST, ciaddr=IP("10.0.0.50"), flags=0,
            extra=((dhcp.OPT_SERVER_ID, SERVER.packed),))
    d = decide(p, via=policy.VIA_PXE, source=("10.0.0.50", 68))
    assert isinstance(d, policy.Reply) and d.kind == "ack"
    assert d.packet.message_type == dhcp.DHCPACK and d.packet.yiaddr == IP(0)
    assert d.packet.ciaddr == IP("10.0.0.50") and d.packet.file == b"pxelinux.0"
    assert d.dest == ("10.0.0.50", 68)
    inform = decide(replace(p, options=((53, b"\x08"),) + p.options[1:]), via=policy.VIA_PXE,
                    source=("10.0.0.50", 4011))
    assert inform.kind == "ack" and inform.dest == ("10.0.0.50", 4011)


def test_discover_on_4011_dropped():
    assert decide(pkt(), via=policy.VIA_PXE).code == "wrong_port"


def test_request_on_67_for_site_server_ignored():
    other = pkt(dhcp.DHCPREQUEST, extra=((dhcp.OPT_SERVER_ID, IP("10.0.0.254").packed),
                                         (dhcp.OPT_REQUESTED_IP, IP("10.0.0.50").packed)))
    d = decide(other)
    assert d.code == "other_server" and d.seen_ip == IP("10.0.0.50")     # noted, not answered
    renew = pkt(dhcp.DHCPREQUEST, ciaddr=IP("10.0.0.51"))
    d = decide(renew)
    assert d.code == "other_server" and d.seen_ip == IP("10.0.0.51")
    assert decide(pkt(dhcp.DHCPREQUEST)).seen_ip is None
    non_pxe = pkt(dhcp.DHCPREQUEST, vci=None, extra=((dhcp.OPT_REQUESTED_IP, IP("10.0.0.52").packed),))
    assert decide(non_pxe).code == "not_pxe" and decide(non_pxe).seen_ip is None
    to_us = pkt(dhcp.DHCPREQUEST, extra=((dhcp.OPT_SERVER_ID, SERVER.packed),))
    d = decide(to_us)
    assert d.kind == "ack" and d.packet.yiaddr == IP(0) and d.dest == ("255.255.255.255", 68)


def test_relayed_discover_goes_to_relay():
    d = decide(pkt(giaddr=IP("10.9.0.1")))
    assert d.dest == ("10.9.0.1", 67) and d.packet.giaddr == IP("10.9.0.1")


def test_long_http_url_goes_to_option_67():
    p = pkt(arch=16, vci=b"HTTPClient", mac="52:54:00:00:00:01")
    cfg = config()
    cfg = replace(cfg, boot=replace(cfg.boot, boot_files=replace(cfg.boot.boot_files,
                                                                 ipxe_efi="d/" * 60 + "x.efi")))
    d = decide(p, cfg)
    assert d.packet.file == b"" and d.packet.option(dhcp.OPT_BOOTFILE).startswith(b"http://10.0.0.1:8080/d/")
    assert len(dhcp.encode(d.packet)) > 300


# -- full DHCP --------------------------------------------------------------------------

class Target:
    hostname = "node01"


NO_RESERVATIONS = Reservations({}, {})


def full(p, db, now=1000.0, res=NO_RESERVATIONS, via=policy.VIA_DHCP, source=("0.0.0.0", 68),
         cfg=None):
    return policy.decide(req(p, via, source), cfg or config("full"), lambda mac: Target(),
                         leases=db, reservations=res, now=now)


def new_db():
    return LeaseDB(ipaddress.IPv4Network("10.0.0.0/24"), IP("10.0.0.100"), IP("10.0.0.102"))


def request_for(ip, server=SERVER, **kw):
    return pkt(dhcp.DHCPREQUEST, extra=((dhcp.OPT_SERVER_ID, server.packed),
                                        (dhcp.OPT_REQUESTED_IP, ip.packed)), **kw)


def test_full_discover_request_ack():
    db = new_db()
    offer = full(pkt(), db)
    assert isinstance(offer, policy.Reply) and offer.kind == "offer"
    ip = offer.packet.yiaddr
    assert ip == IP("10.0.0.100") and offer.lease.state == "offered" and not offer.durable
    o = offer.packet
    assert o.option(dhcp.OPT_SUBNET_MASK) == IP("255.255.255.0").packed
    assert o.option(dhcp.OPT_ROUTER) == IP("10.0.0.254").packed
    assert o.option(dhcp.OPT_DNS_SERVERS) == IP("10.0.0.53").packed + IP("10.0.0.54").packed
    assert o.option(dhcp.OPT_DOMAIN_NAME) == b"lab.example"
    assert o.option(dhcp.OPT_HOSTNAME) == b"node01"
    assert o.option(dhcp.OPT_LEASE_TIME) == struct.pack("!I", 3600)
    assert o.option(dhcp.OPT_RENEWAL_TIME) == struct.pack("!I", 1800)
    assert o.option(dhcp.OPT_REBINDING_TIME) == struct.pack("!I", 3150)
    # a PXE client also gets the boot fields, so no other DHCP server is needed
    assert o.siaddr == SERVER and o.file == b"pxelinux.0" and o.option(60) == b"PXEClient"
    assert o.option(43) == bytes([6, 1, 8, 255])
    db.apply(offer.lease)
    ack = full(request_for(ip), db, now=1001.0)
    assert ack.kind == "ack" and ack.packet.yiaddr == ip and ack.durable
    assert ack.lease.state == "bound" and ack.lease.expires == 1001.0 + 3600
    assert ack.packet.option(dhcp.OPT_LEASE_TIME) == struct.pack("!I", 3600)
    db.apply(ack.lease)
    # a second machine gets another address; a non-PXE client gets no boot fields
    other = full(pkt(mac="52:54:00:00:00:02", vci=None, arch=None), db, now=1002.0)
    assert other.packet.yiaddr == IP("10.0.0.101") and other.packet.file == b""
    assert other.packet.siaddr == IP(0) and other.packet.option(60) is None


def test_full_reservation_and_exhaustion():
    db = new_db()
    res = Reservations.from_pairs([(MAC, IP("10.0.0.7")), ("52:54:00:00:00:09", IP("10.0.0.100"))])
    offer = full(pkt(), db, res=res)
    assert offer.packet.yiaddr == IP("10.0.0.7")
    # 10.0.0.100 is reserved for another MAC: two free addresses, then exhausted
    got = []
    for i in range(3):
        d = full(pkt(mac=f"52:54:00:00:01:0{i}"), db, res=res)
        if isinstance(d, policy.Reply):
            db.apply(d.lease)
            got.append(d.packet.yiaddr)
        else:
            assert d.code == "pool_exhausted"
    assert got == [IP("10.0.0.101"), IP("10.0.0.102")]
    nak = full(request_for(IP("10.0.0.100")), db, res=res)
    assert nak.kind == "nak" and nak.packet.yiaddr == IP(0) and nak.packet.file == b""
    assert nak.dest == ("255.255.255.255", 68) and nak.packet.option(dhcp.OPT_MESSAGE)


def test_full_selecting_other_server_is_silent():
    assert full(request_for(IP("10.0.0.100"), server=IP("10.0.0.254")), new_db()).code == "other_server"


def test_full_init_reboot_and_renew():
    db = new_db()
    db.apply(policy.Lease(IP("10.0.0.101"), MAC, "bound", 5000.0))
    ok = full(pkt(dhcp.DHCPREQUEST, extra=((50, IP("10.0.0.101").packed),)), db)
    assert ok.kind == "ack" and ok.packet.yiaddr == IP("10.0.0.101")
    wrong = full(pkt(dhcp.DHCPREQUEST, extra=((50, IP("10.0.0.102").packed),)), db)
    assert wrong.kind == "nak"
    off_net = full(pkt(dhcp.DHCPREQUEST, extra=((50, IP("192.168.1.5").packed),)), db)
    assert off_net.kind == "nak"
    stranger = full(pkt(dhcp.DHCPREQUEST, mac="52:54:00:00:00:33",
                        extra=((50, IP("10.0.0.100").packed),)), db)
    assert stranger.code == "unknown_lease"
    renew = full(pkt(dhcp.DHCPREQUEST, ciaddr=IP("10.0.0.101"), flags=0), db, now=2000.0)
    assert renew.kind == "ack" and renew.dest == ("10.0.0.101", 68)
    assert renew.packet.ciaddr == IP("10.0.0.101") and renew.lease.expires == 5600.0


def test_full_release_decline_inform():
    db = new_db()
    db.apply(policy.Lease(IP("10.0.0.101"), MAC, "bound", 5000.0))
    rel = full(pkt(dhcp.DHCPRELEASE, ciaddr=IP("10.0.0.101"),
                   extra=((54, SERVER.packed),)), db)
    assert isinstance(rel, policy.LeaseChange) and rel.event == "release"
    assert rel.lease.state == "free" and rel.lease.ip == IP("10.0.0.101")
    assert full(pkt(dhcp.DHCPRELEASE, ciaddr=IP("10.0.0.102")), db).code == "unknown_lease"
    dec = full(pkt(dhcp.DHCPDECLINE, extra=((50, IP("10.0.0.101").packed), (54, SERVER.packed))), db)
    assert dec.event == "decline" and dec.lease.state == "declined"
    inf = full(pkt(dhcp.DHCPINFORM, ciaddr=IP("10.0.0.50"), flags=0), db)
    assert inf.kind == "ack" and inf.packet.yiaddr == IP(0) and inf.lease is None
    assert inf.packet.option(dhcp.OPT_LEASE_TIME) is None and inf.dest == ("10.0.0.50", 68)
    assert inf.packet.option(dhcp.OPT_SUBNET_MASK) is not None


def test_full_pxe_port_gets_proxy_ack():
    p = pkt(dhcp.DHCPREQUEST, ciaddr=IP("10.0.0.100"), extra=((54, SERVER.packed),))
    d = full(p, new_db(), via=policy.VIA_PXE, source=("10.0.0.100", 68))
    assert d.kind == "ack" and d.packet.yiaddr == IP(0) and d.lease is None
    assert d.packet.option(dhcp.OPT_LEASE_TIME) is None and d.packet.file == b"pxelinux.0"


def test_full_unknown_hosts_ignored():
    d = policy.decide(req(pkt(vci=None)), config("full"), lambda mac: None, leases=new_db(), now=1.0)
    assert d.code == "unknown_host"


# -- hostile but decodable input never breaks the policy ---------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ipb = st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big"))
_opt = st.one_of(
    st.tuples(st.just(53), st.integers(0, 255).map(lambda n: bytes([n]))),
    st.tuples(st.just(54), st.one_of(_ipb, st.just(SERVER.packed))),
    st.tuples(st.just(50), st.one_of(_ipb, st.sampled_from([IP("10.0.0.100").packed, IP("10.0.0.101").packed]))),
    st.tuples(st.just(60), st.sampled_from([BIOS_VCI, EFI_VCI, b"HTTPClient", b"PXEClient", b"x"])),
    st.tuples(st.just(93), st.lists(st.integers(0, 40), min_size=1, max_size=3)
              .map(lambda xs: struct.pack(f"!{len(xs)}H", *xs))),
    st.tuples(st.just(97), st.sampled_from([b"", UUID])),
    st.tuples(st.just(77), st.sampled_from([b"iPXE", b"\x04iPXE", b"x"])),
    st.tuples(st.just(175), st.binary(max_size=8)),
)
_hostile = st.builds(
    lambda opts, ciaddr, giaddr, htype, hlen, flags, mac: dhcp.DhcpPacket(
        op=1, xid=7, chaddr=mac, htype=htype, hlen=hlen, flags=flags, ciaddr=IP(ciaddr),
        giaddr=IP(giaddr), options=tuple(opts)),
    st.lists(_opt, max_size=7, unique_by=lambda kv: kv[0]),
    st.sampled_from([0, int(IP("10.0.0.101")), int(IP("10.0.0.50"))]),
    st.sampled_from([0, int(IP("10.9.0.1"))]),
    st.sampled_from([1, 1, 1, 6]), st.sampled_from([6, 6, 6, 0, 16]), st.integers(0, 0xffff),
    st.sampled_from([bytes.fromhex("525400123456"), bytes.fromhex("525400000002"), b"\x01" * 6, bytes(6)]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_hostile, st.sampled_from([policy.VIA_DHCP, policy.VIA_PXE]),
                          st.sampled_from(["proxy", "full"]), st.booleans()), min_size=1, max_size=12))
def test_any_decodable_request_gives_a_decision(seq):
    db = new_db()
    res = Reservations.from_pairs([("52:54:00:00:00:02", IP("10.0.0.102"))])
    now = 1000.0
    for p, via, mode, chain in seq:
        now += 7.0
        cfg = config(mode, chain=chain)
        d = policy.decide(req(p, via, ("10.0.0.50", 68)), cfg, lambda mac: Target(), leases=db,
                          reservations=res, now=now)
        assert isinstance(d, (policy.Reply, policy.Drop, policy.LeaseChange))
        if isinstance(d, policy.Drop):
            assert d.code.replace("_", "").isalpha()
            continue
        if isinstance(d, policy.Reply):
            back = dhcp.decode(dhcp.encode(d.packet))           # what we send decodes
            assert back.op == 2 and back.xid == 7 and back.option(54) == SERVER.packed
            if mode == "proxy" or via == policy.VIA_PXE:
                assert back.yiaddr == IP(0) and back.option(dhcp.OPT_LEASE_TIME) is None
            if d.kind != "nak" and back.yiaddr != IP(0):
                assert db.available_to(back.yiaddr, d.lease.mac, now, res)
        lease = d.lease
        if lease is not None:
            db.apply(lease)
    bound = [l for l in db.leases() if l.state == "bound" and l.active(now)]
    assert len({l.ip for l in bound}) == len(bound)
