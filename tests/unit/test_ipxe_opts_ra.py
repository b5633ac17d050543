"""The "no IPv6 router here" answer (dhcp.ipv6_no_router): the RA encoder, the RS/RA reader and
the decision whether to answer (pure: sidusd/proto/ndp.py, sidusd/boot/ra_policy.py).

Why it exists: iPXE (the qemu NIC ROM, Debian ipxe 1.0.0+git-20190125) waits for its IPv6
configurator, which gives up after ~16 s of unanswered router solicitations (docs/quirks.md).
"""

from __future__ import annotations

import struct

import pytest

from sidusd.boot.ra_policy import ANSWER, FOREIGN_ROUTER_HOLD_S, NoRouterResponder
from sidusd.proto import ndp

# a router solicitation as iPXE sends it (captured on the lab bridge): type 133, code 0,
# checksum, reserved, and its source link-layer address option (52:54:00:13:20:01)
IPXE_RS = bytes.fromhex("85000000" "00000000" "0101525400132001")
IPXE_SRC = "fe80::5054:ff:fe13:2001"
# a real router's advertisement: lifetime 1800 s, one prefix information option (32 octets)
PREFIX_OPT = bytes((3, 4, 64, 0xC0)) + struct.pack("!III", 86400, 14400, 0) + bytes(16)
ROUTER_RA = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + PREFIX_OPT


def test_no_router_ra_says_nothing_but_not_a_router():
    ra = ndp.encode_no_router_ra()
    assert len(ra) == 16
    typ, code, csum, hop, flags, lifetime, reach, retrans = struct.unpack("!BBHBBHII", ra)
    assert (typ, code, csum) == (134, 0, 0)           # the kernel fills the checksum in
    assert (hop, flags, lifetime, reach, retrans) == (0, 0, 0, 0, 0)
    msg = ndp.decode(ra)
    assert (msg.kind, msg.router_lifetime_s, msg.has_prefix, msg.managed, msg.other) == (134, 0, False, False, False)
    with_ll = ndp.encode_no_router_ra(bytes.fromhex("525400132001"))
    assert ndp.decode(with_ll).option_types == (ndp.OPT_SOURCE_LL,)


def test_decode_router_solicitation_and_router_advertisement():
    rs = ndp.decode(IPXE_RS)
    assert rs.kind == ndp.ROUTER_SOLICITATION and rs.option_types == (1,)
    ra = ndp.decode(ROUTER_RA)
    assert ra.kind == ndp.ROUTER_ADVERTISEMENT and ra.router_lifetime_s == 1800 and ra.has_prefix


@pytest.mark.parametrize("data", [
    b"", b"\x85\x00", b"\x85\x01\x00\x00\x00\x00\x00\x00",          # short; code != 0
    b"\x85\x00\x00\x00\x00\x00",                                     # RS shorter than 8
    IPXE_RS[:8] + b"\x01\x00\x00\x00\x00\x00\x00\x00",               # option of length 0
    IPXE_RS[:8] + b"\x01\x02" + bytes(6),                            # option past the end
    IPXE_RS[:8] + b"\x01",                                           # truncated option header
    ROUTER_RA[:12],                                                  # RA shorter than 16
    b"\x80\x00\x00\x00\x00\x00\x00\x00",                             # echo request
])
def test_malformed_or_other_messages_are_refused(data):
    with pytest.raises(ndp.NdpError):
        ndp.decode(data)


def test_answers_an_ipxe_solicitation_once_per_second_per_source():
    r = NoRouterResponder()
    rs = ndp.decode(IPXE_RS)
    assert r.on_message(rs, IPXE_SRC, 255, now=100.0) == ANSWER
    assert r.on_message(rs, IPXE_SRC, 255, now=100.25) == "rate_limited"   # iPXE's next RS, 0.25 s on
    assert r.on_message(rs, "fe80::1", 255, now=100.3) == ANSWER           # another machine
    assert r.on_message(rs, IPXE_SRC, 255, now=101.3) == ANSWER


def test_never_answers_off_link_unspecified_or_after_hearing_a_real_router():
    r = NoRouterResponder()
    rs = ndp.decode(IPXE_RS)
    assert r.on_message(rs, IPXE_SRC, 64, now=1.0) == "hop_limit"          # routed: not from this link
    assert r.on_message(rs, "::", 255, now=1.0) == "not_link_local"
    assert r.on_message(rs, "2001:db8::5", 255, now=1.0) == "not_link_local"
    # a site router advertises itself: sidus keeps quiet, the router's prefixes must win
    assert r.on_message(ndp.decode(ROUTER_RA), "fe80::1", 255, now=2.0) == "router_heard"
    assert r.on_message(rs, IPXE_SRC, 255, now=3.0) == "router_present"
    assert r.on_message(rs, IPXE_SRC, 255, now=2.0 + FOREIGN_ROUTER_HOLD_S + 1) == ANSWER
    # our own kind of RA (lifetime 0, nothing in it) does not silence us
    assert r.on_message(ndp.decode(ndp.encode_no_router_ra()), "fe80::2", 255, now=5000.0) == "advertisement"
    assert r.on_message(rs, "fe80::9", 255, now=5000.1) == ANSWER


def test_ra_only_with_the_key_and_it_is_off_by_default():
    from pathlib import Path

    import yaml

    from sidusd import data
    from sidusd.config_schema import DhcpConfig
    assert DhcpConfig().ipv6_no_router is False
    shipped = yaml.safe_load((Path(data.__file__).parent / "sidus.yaml").read_text())
    assert shipped["dhcp"]["ipv6_no_router"] is False
