"""proto.dhcp: golden packets from scapy / iPXE layout, truncation, hostile input, round trip."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.errors import RemoteProtocolError
from sidusd.proto import dhcp

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dhcp"
GOLDEN_FILES = sorted(GOLDEN.glob("*.hex"))


def golden(name: str) -> bytes:
    return bytes.fromhex((GOLDEN / name).read_text().replace("\n", ""))


def header(**kw) -> bytes:
    f = dict(op=1, htype=1, hlen=6, hops=0, xid=1, secs=0, flags=0)
    f.update(kw)
    return (struct.pack("!BBBBIHH", f["op"], f["htype"], f["hlen"], f["hops"], f["xid"],
                        f["secs"], f["flags"]) + bytes(16) + bytes.fromhex("525400000001").ljust(16, b"\0")
            + bytes(64) + bytes(128))


def packet(opts: bytes, **kw) -> bytes:
    return header(**kw) + dhcp.MAGIC_COOKIE + opts


def test_golden_files_present():
    assert {p.name for p in GOLDEN_FILES} >= {"bios_discover.hex", "uefi_x64_discover.hex",
                                                "ipxe_discover.hex", "ipxe_request_4011.hex"}


def test_bios_discover_fields():
    p = dhcp.decode(golden("bios_discover.hex"))
    assert p.op == dhcp.BOOTREQUEST and p.xid == 0x12345678 and p.secs == 4
    assert p.flags == dhcp.FLAG_BROADCAST
    assert p.mac == "52:54:00:12:34:56"
    assert p.message_type == dhcp.DHCPDISCOVER
    assert p.option(dhcp.OPT_VENDOR_CLASS) == b"PXEClient:Arch:00000:UNDI:002001"
    assert dhcp.client_arches(p) == (0,)
    assert p.option(dhcp.OPT_CLIENT_NDI) == b"\x01\x02\x01"
    assert p.option(dhcp.OPT_CLIENT_UUID) == b"\x00" + bytes(range(0x10, 0x20))
    assert p.option(dhcp.OPT_MAX_MESSAGE_SIZE) == struct.pack("!H", 1260)
    assert p.ciaddr == ipaddress.IPv4Address("0.0.0.0")


def test_uefi_and_ipxe_fields():
    u = dhcp.decode(golden("uefi_x64_discover.hex"))
    assert dhcp.client_arches(u) == (7,) and u.mac == "52:54:00:00:00:07"
    i = dhcp.decode(golden("ipxe_discover.hex"))
    assert i.option(dhcp.OPT_USER_CLASS) == b"iPXE"
    feats = dict(dhcp.decode_suboptions(i.option(dhcp.OPT_IPXE_ENCAP)))
    assert feats[0x13] == b"\x01" and feats[0xeb] == bytes([1, 21, 1])
    r = dhcp.decode(golden("ipxe_request_4011.hex"))
    assert r.message_type == dhcp.DHCPREQUEST
    assert r.ciaddr == ipaddress.IPv4Address("10.0.0.50")
    assert r.option(dhcp.OPT_SERVER_ID) == bytes([10, 0, 0, 1])
    assert r.option(dhcp.OPT_CLIENT_ID) == b"\x01" + bytes.fromhex("525400123456")
    assert dict(dhcp.decode_suboptions(r.option(dhcp.OPT_IPXE_ENCAP)))[0xb1] == bytes.fromhex("011af41000")


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_every_truncated_prefix_is_refused(path):
    data = bytes.fromhex(path.read_text().replace("\n", ""))
    dhcp.decode(data)                         # the whole packet decodes
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            dhcp.decode(data[:n])


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.name)
def test_golden_reencodes_to_the_same_packet(path):
    p = dhcp.decode(bytes.fromhex(path.read_text().replace("\n", "")))
    assert dhcp.decode(dhcp.encode(p)) == p


@pytest.mark.parametrize("data, why", [
    (b"", "truncated"),
    (packet(b"\x35\x01\x01\xff")[:239], "truncated"),
    (header() + b"\x63\x82\x53\x64" + b"\xff", "magic"),
    (packet(b"\xff", hlen=17), "hlen"),
    (packet(b"\xff", op=3), "op"),
    (packet(b"\x35\x01\x01"), "end option"),
    (packet(b"\x35\x05\x01\xff"), "overruns"),
    (packet(b"\x35"), "length byte"),
    (packet(b"\x35\x00\xff"), "option 53"),
    (packet(b"\x36\x00\xff"), "option 54"),
    (packet(b"\x3c\x00\xff"), "option 60"),
    (packet(b"\x5d\x03\x00\x00\x00\xff"), "option 93"),
    (packet(b"\x61\x05\x00\x01\x02\x03\x04\xff"), "option 97"),
    (packet(b"\x61\x11\x01" + bytes(16) + b"\xff"), "option 97"),
    (packet(b"\x34\x01\x04\xff"), "option 52"),
    (packet(b"\x34\x01\x01\xff"), "file"),           # overload: 'file' of zeros is fine...
])
def test_malformed_is_refused(data, why):
    if why == "file":
        # ...but a 'file' area holding a truncated option is not.
        bad = bytearray(data)
        bad[108] = 12
        bad[109] = 200
        data = bytes(bad)
    with pytest.raises(RemoteProtocolError, match=why):
        dhcp.decode(data)


def test_zero_length_where_legal():
    p = dhcp.decode(packet(b"\x35\x01\x01\x61\x00\x50\x00\xe0\x00\xff"))
    assert p.option(dhcp.OPT_CLIENT_UUID) == b""        # quirk: PXE ROMs sending empty 97
    assert p.option(80) == b"" and p.option(224) == b""


def test_overload_options_in_file_and_sname():
    h = bytearray(header())
    file_opts = b"\x0c\x03abc\xff"
    sname_opts = b"\x0c\x02de\x3c\x09PXEClient"         # no END: the field boundary ends it
    h[108:108 + len(file_opts)] = file_opts
    h[44:44 + len(sname_opts)] = sname_opts
    p = dhcp.decode(bytes(h) + dhcp.MAGIC_COOKIE + b"\x34\x01\x03\x35\x01\x01\xff")
    assert p.option(dhcp.OPT_HOSTNAME) == b"abcde"        # RFC 3396: file then sname
    assert p.option(dhcp.OPT_VENDOR_CLASS) == b"PXEClient"
    assert p.option(dhcp.OPT_OVERLOAD) is None and p.file == b"" and p.sname == b""


def test_split_options_concatenate():
    p = dhcp.decode(packet(b"\x0c\x02ab\x35\x01\x01\x0c\x01c\xff"))
    assert p.option(dhcp.OPT_HOSTNAME) == b"abc"
    assert [c for c, _ in p.options] == [12, 53]


def test_encode_pads_and_splits():
    p = dhcp.DhcpPacket(op=2, xid=9, chaddr=b"\x01" * 6, options=((53, b"\x02"), (200, b"x" * 300)))
    b = dhcp.encode(p)
    assert len(b) >= dhcp.BOOTP_MIN_LEN
    assert b[240:243] == b"\x35\x01\x02" and b[243:245] == b"\xc8\xff" and b[500:502] == b"\xc8\x2d"
    small = dhcp.encode(dhcp.DhcpPacket(op=2, xid=1, chaddr=b"\x01" * 6))
    assert len(small) == 300 and small[240] == 255 and set(small[241:]) == {0}
    with pytest.raises(ValueError):
        dhcp.encode(dhcp.DhcpPacket(op=2, xid=1, chaddr=b"", file=b"x" * 128))


def test_pxe_vendor_options():
    v = dhcp.pxe_vendor_options()
    assert v == bytes([6, 1, 8, 255])
    assert dhcp.decode_suboptions(v) == ((6, b"\x08"),)
    with pytest.raises(RemoteProtocolError):
        dhcp.decode_suboptions(b"\x06\x05\x08")


# -- properties -----------------------------------------------------------------

_ip = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
_free_codes = st.integers(1, 254).filter(lambda c: c not in dhcp._LENGTH_RULES and c != 52)
_option_values = st.one_of(
    st.tuples(_free_codes, st.binary(max_size=600)),
    st.tuples(st.just(53), st.integers(1, 8).map(lambda n: bytes([n]))),
    st.tuples(st.just(54), _ip.map(lambda a: a.packed)),
    st.tuples(st.just(60), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just(93), st.lists(st.integers(0, 0xffff), min_size=1, max_size=4)
              .map(lambda xs: struct.pack(f"!{len(xs)}H", *xs))),
    st.tuples(st.just(97), st.binary(min_size=16, max_size=16).map(lambda b: b"\0" + b)),
)
_packets = st.builds(
    dhcp.DhcpPacket,
    op=st.sampled_from([1, 2]), xid=st.integers(0, 2**32 - 1),
    chaddr=st.binary(min_size=16, max_size=16), htype=st.integers(0, 255),
    hlen=st.integers(0, 16), hops=st.integers(0, 255), secs=st.integers(0, 0xffff),
    flags=st.integers(0, 0xffff), ciaddr=_ip, yiaddr=_ip, siaddr=_ip, giaddr=_ip,
    sname=st.binary(max_size=63).map(lambda b: b.replace(b"\0", b"")),
    file=st.binary(max_size=127).map(lambda b: b.replace(b"\0", b"")),
    options=st.lists(_option_values, max_size=8, unique_by=lambda kv: kv[0]).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(_packets)
def test_round_trip(pkt):
    assert dhcp.decode(dhcp.encode(pkt)) == pkt


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_raise_only_remote_protocol_error(data):
    try:
        dhcp.decode(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.sampled_from([p.name for p in GOLDEN_FILES]))
def test_mutated_golden_raise_only_remote_protocol_error(tail, name):
    data = golden(name)
    for mutated in (data[:240] + tail, data[:len(data) // 2] + tail, data + tail):
        try:
            dhcp.decode(mutated)
        except RemoteProtocolError:
            pass
