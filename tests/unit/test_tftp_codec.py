"""TFTP codec: golden packets from real clients, every truncated prefix, round trips, negotiation."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.errors import RemoteProtocolError
from sidusd.proto import tftp
from sidusd.proto.tftp import ACK, DATA, ERROR, OACK, RRQ, WRQ, Limits, decode, encode, negotiate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tftp"


def golden() -> dict[str, bytes]:
    return {p.stem: bytes.fromhex(p.read_text().split()[0]) for p in sorted(GOLDEN.glob("*.hex"))}


# What each captured packet must decode to (see tests/golden/tftp/README.md for how
# each was captured).  Written out by hand: the capture and this table are independent.
EXPECTED = {
    "curl-rrq-blksize1468": RRQ("pxelinux.0", "octet", (("tsize", "0"), ("blksize", "1468"), ("timeout", "6"))),
    "curl-rrq-default": RRQ("boot/vmlinuz", "octet", (("tsize", "0"), ("blksize", "512"), ("timeout", "6"))),
    "atftp-rrq-windowsize": RRQ("images/demo/initrd.img", "octet",
                                (("tsize", "0"), ("blksize", "1468"), ("windowsize", "16"))),
    "atftp-rrq-plain": RRQ("pxelinux.0", "octet", ()),
    "busybox-rrq-blksize": RRQ("ldlinux.c32", "octet", (("blksize", "1468"), ("tsize", "0"))),
    "tftpy-rrq-options": RRQ("pxelinux.cfg/01-52-54-00-12-34-56", "octet",
                             (("blksize", "1432"), ("tsize", "0"))),
    "ipxe-rrq-pxelinux0": RRQ("pxelinux.0", "octet", (("blksize", "1432"), ("tsize", "0"))),
    "pxelinux-rrq-ldlinux": RRQ("ldlinux.c32", "octet", (("tsize", "0"), ("blksize", "1408"))),
    "pxelinux-rrq-permac": RRQ("pxelinux.cfg/01-52-54-00-12-34-56", "octet",
                               (("tsize", "0"), ("blksize", "1408"))),
    "ipxe-efi-rrq-syslinux-efi": RRQ("syslinux.efi", "octet", (("blksize", "1432"), ("tsize", "0"))),
    "syslinux-efi-rrq-ldlinux-e64": RRQ("ldlinux.e64", "octet", (("tsize", "0"), ("blksize", "1408"))),
    "syslinux-efi-rrq-leading-slash": RRQ("/poweroff.c32", "octet", (("tsize", "0"), ("blksize", "1408"))),
    "atftp-ack-oack": ACK(0),
    "busybox-ack-1": ACK(1),
    "ipxe-efi-ack-oack": ACK(0),
}


def test_golden_files_present() -> None:
    names = set(golden())
    # the clients the issue names must all be there
    for prefix in ("ipxe-", "ipxe-efi-", "pxelinux-", "syslinux-efi-", "curl-", "atftp-", "busybox-", "tftpy-"):
        assert any(n.startswith(prefix) for n in names), prefix


@pytest.mark.parametrize("name", sorted(golden()))
def test_golden_decodes(name: str) -> None:
    raw = golden()[name]
    pkt = decode(raw)
    assert name in EXPECTED, f"add {name} to EXPECTED"
    assert pkt == EXPECTED[name]
    assert encode(pkt) == raw          # every captured packet re-encodes byte for byte


def _valid_prefixes(raw: bytes) -> set[int]:
    """Lengths at which a prefix of ``raw`` is itself a complete packet, by the protocol:
    a request ends after a terminated mode or after a terminated option value;
    DATA after its 4-byte header; ACK from 4 bytes; ERROR after the message NUL;
    OACK after a terminated option value."""
    op = int.from_bytes(raw[:2], "big")
    if op in (1, 2):
        nuls = [i + 1 for i, b in enumerate(raw) if b == 0 and i >= 2]
        # field k ends at nuls[k]; filename=0, mode=1, then name/value pairs
        return {nuls[k] for k in range(1, len(nuls), 2)}
    if op == 3:
        return set(range(4, len(raw) + 1))
    if op == 4:
        return set(range(4, len(raw) + 1))
    if op == 5:
        first = raw.find(b"\0", 4)
        return set(range(first + 1, len(raw) + 1))
    if op == 6:
        nuls = [i + 1 for i, b in enumerate(raw) if b == 0 and i >= 2]
        return {nuls[k] for k in range(1, len(nuls), 2)}
    return set()


@pytest.mark.parametrize("name", sorted(golden()))
def test_every_truncated_prefix(name: str) -> None:
    raw = golden()[name]
    valid = _valid_prefixes(raw)
    assert len(raw) in valid
    for n in range(len(raw)):
        prefix = raw[:n]
        if n in valid:
            pkt = decode(prefix)
            assert type(pkt) is type(decode(raw))
            assert encode(pkt) == prefix
            if isinstance(pkt, RRQ):   # a shorter request: same name and mode, fewer options
                full = decode(raw)
                assert (pkt.filename, pkt.mode) == (full.filename, full.mode)
                assert full.options[:len(pkt.options)] == pkt.options
        else:
            with pytest.raises(RemoteProtocolError):
                decode(prefix)


@pytest.mark.parametrize("raw, why", [
    (b"", "empty"),
    (b"\x00", "one byte"),
    (b"\x00\x05\x00", "ERROR of 3 bytes"),
    (b"\x00\x05\x00\x01", "ERROR without message terminator"),
    (b"\x00\x05\x00\x01File not found", "ERROR message unterminated"),
    (b"\x00\x01pxelinux.0", "unterminated filename"),
    (b"\x00\x01pxelinux.0\x00oct", "unterminated mode"),
    (b"\x00\x01pxelinux.0\x00", "no mode"),
    (b"\x00\x01\x00octet\x00", "empty filename"),
    (b"\x00\x01file\x00\x00", "empty mode"),
    (b"\x00\x01file\x00octet\x00blksize\x00", "option without value"),
    (b"\x00\x01file\x00octet\x00blksize\x008\x00tsize\x00", "blksize 8 then an option without value"),
    (b"\x00\x01file\x00octet\x00\x00junk\x00", "data after padding"),
    (b"\x00\x01\xff\xfe\x00octet\x00", "filename not UTF-8"),
    (b"\x00\x04\x00", "ACK of 3 bytes"),
    (b"\x00\x03\x00", "DATA of 3 bytes"),
    (b"\x00\x06", "OACK without options"),
    (b"\x00\x06blksize\x00", "OACK option without value"),
    (b"\x00\x07\x00\x01", "unknown opcode 7"),
    (b"\x00\x00\x00\x01", "opcode 0"),
    (b"\xff\xff", "opcode 65535"),
])
def test_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw)


def test_tolerated_shapes() -> None:
    # blksize 8 (the RFC 2348 minimum) with other options is a normal request
    assert decode(b"\x00\x01f\x00octet\x00blksize\x008\x00tsize\x000\x00").option_map == \
        {"blksize": "8", "tsize": "0"}
    # NUL padding after the last complete option pair
    assert decode(b"\x00\x01f\x00octet\x00\x00\x00\x00") == RRQ("f", "octet", ())
    # an ACK with trailing bytes is an ACK; an ERROR with bytes after its NUL too
    assert decode(b"\x00\x04\x00\x07\x00\x00") == ACK(7)
    assert decode(b"\x00\x05\x00\x08abort\x00\x00\x00") == ERROR(8, "abort")
    assert decode(b"\x00\x05\x00\x08\x00") == ERROR(8, "")
    assert decode(b"\x00\x03\xff\xff") == DATA(65535, b"")
    assert isinstance(decode(b"\x00\x02f\x00octet\x00"), WRQ)
    # option names are case-insensitive; the first occurrence wins
    assert decode(b"\x00\x01f\x00OCTET\x00BlkSize\x00100\x00blksize\x00200\x00").option_map == \
        {"blksize": "100"}


# -- round trips ----------------------------------------------------------------

_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                min_size=1, max_size=40)
_opts = st.lists(st.tuples(_text, st.text(st.characters(blacklist_characters="\x00",
                                                         blacklist_categories=("Cs",)), max_size=10)),
                 max_size=6).map(tuple)
_block = st.integers(0, 0xFFFF)
_packets = st.one_of(
    st.builds(RRQ, _text, _text, _opts),
    st.builds(WRQ, _text, _text, _opts),
    st.builds(DATA, _block, st.binary(max_size=1500)),
    st.builds(ACK, _block),
    st.builds(ERROR, _block, st.text(st.characters(blacklist_characters="\x00",
                                                   blacklist_categories=("Cs",)), max_size=50)),
    st.builds(OACK, _opts.filter(bool)),
)


@settings(max_examples=400, deadline=None)
@given(_packets)
def test_round_trip(pkt) -> None:
    assert decode(encode(pkt)) == pkt


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_raises_only_remote_protocol_error(raw: bytes) -> None:
    try:
        pkt = decode(raw)
    except RemoteProtocolError:
        return
    # whatever decodes re-encodes to a prefix-compatible packet of the same kind
    assert decode(encode(pkt)) == pkt


# -- negotiation (RFC 2347/2348/2349/7440) --------------------------------------

def test_negotiate_clamps_and_reports() -> None:
    n = negotiate({"blksize": "65464", "tsize": "0", "timeout": "3", "windowsize": "200", "x-foo": "1"},
                  Limits(max_blksize=1468, max_windowsize=64, size=123456))
    assert (n.blksize, n.windowsize, n.timeout_s) == (1468, 64, 3.0)
    assert dict(n.oack) == {"blksize": "1468", "tsize": "123456", "timeout": "3", "windowsize": "64"}


@pytest.mark.parametrize("opts", [
    {"blksize": "7"}, {"blksize": "abc"}, {"blksize": ""}, {"blksize": "-1"},
    {"timeout": "0"}, {"timeout": "256"}, {"timeout": "1.5"},
    {"windowsize": "0"}, {"windowsize": "65536"}, {"unknown": "1"},
])
def test_negotiate_ignores_invalid(opts: dict) -> None:
    n = negotiate(opts, Limits(max_blksize=1468, max_windowsize=64, size=10))
    assert n.oack == () and (n.blksize, n.windowsize, n.timeout_s) == (512, 1, None)


def test_negotiate_edges() -> None:
    assert negotiate({"blksize": "8"}, Limits(1468, 8, 0)).blksize == 8
    assert negotiate({"blksize": "100000"}, Limits(65464, 8, 0)).blksize == 65464
    assert negotiate({"timeout": "255"}, Limits(1468, 8, 0)).timeout_s == 255.0
    assert negotiate({"windowsize": "1"}, Limits(1468, 8, 0)).windowsize == 1
    assert negotiate({"tsize": "0"}, Limits(1468, 8, None)).oack == ()


def test_netascii() -> None:
    assert tftp.netascii(b"a\nb\r\nc\r") == b"a\r\nb\r\x00\r\nc\r\x00"
