"""Fuzz targets: one function per decoder, shared by the atheris driver and the replay test.

Each target feeds raw bytes to a decoder exactly as the daemon's edge does,
then runs the pure code the daemon runs next on a successful decode
(re-encode, option negotiation, content resolution, PXE sub-options).
The contract (docs/architecture.md): a decoder either returns a value or
raises :class:`sidusd.errors.RemoteProtocolError`; anything else escaping a
target is a bug.  Targets return a short tag of what happened, so the replay
test can report how the corpus is spread.
"""

from __future__ import annotations

from sidusd.boot import content
from sidusd.control import messages
from sidusd.errors import RemoteProtocolError
from sidusd.proto import dhcp, tftp


def fuzz_dhcp(data: bytes) -> str:
    """BOOTP/DHCP datagram at port 67/4011 (RFC 2131 §2, RFC 2132, RFC 3396, RFC 4578)."""
    try:
        pkt = dhcp.decode(data)
    except RemoteProtocolError:
        return "refused"
    # what we encode we must decode; encode() refuses (ValueError, documented) an sname/file
    # that fills its whole fixed field, which a peer may send but sidus never echoes
    if len(pkt.sname) < 64 and len(pkt.file) < 128:
        again = dhcp.decode(dhcp.encode(pkt))
        assert again.options == pkt.options and again.xid == pkt.xid and again.chaddr == pkt.chaddr
    dhcp.client_arches(pkt)
    opts = dict(pkt.options)
    if 43 in opts:
        try:
            dhcp.decode_suboptions(opts[43])
        except RemoteProtocolError:
            pass
    for code in (3, 6):                            # router, DNS: lists of addresses
        if code in opts:
            dhcp.ip_list(opts[code])
    return "decoded"


def fuzz_tftp(data: bytes) -> str:
    """TFTP datagram at port 69 or a transfer port (RFC 1350 §5, RFC 2347-2349, RFC 7440)."""
    try:
        pkt = tftp.decode(data)
    except RemoteProtocolError:
        return "refused"
    if isinstance(pkt, tftp.RRQ):
        content.resolve(pkt.filename)
        for size in (None, 0, 1 << 40):
            neg = tftp.negotiate(pkt.option_map, tftp.Limits(1468, 64, size))
            assert tftp.BLKSIZE_MIN <= neg.blksize <= 1468 and 1 <= neg.windowsize <= 64
        tftp.encode(pkt)
        return "rrq"
    return type(pkt).__name__.lower()


def fuzz_control(data: bytes) -> str:
    """One JSON line on the control socket (docs/operations.md, protocol v1)."""
    out = []
    for fn in (messages.decode_request, messages.decode_response):
        try:
            fn(data)
            out.append("ok")
        except RemoteProtocolError:
            out.append("refused")
    return "/".join(out)


TARGETS = {"dhcp": fuzz_dhcp, "tftp": fuzz_tftp, "control": fuzz_control}
