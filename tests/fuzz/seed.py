"""Write the hand-made seeds (golden packets and known-CVE shapes) into tests/fuzz/corpus/.

    python3 tests/fuzz/seed.py

Idempotent: a seed's file name is its role, its content the bytes.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE.parent / "golden"


def golden(kind: str) -> dict[str, bytes]:
    return {f"golden-{p.stem}": bytes.fromhex(p.read_text().replace("\n", "").strip())
            for p in sorted((GOLDEN / kind).glob("*.hex"))}


def dhcp_seeds() -> dict[str, bytes]:
    g = golden("dhcp")
    base = g["golden-bios_discover"]
    hdr = base[:240]
    out = dict(g)
    out["zero-length-opt"] = hdr + bytes([53, 0, 255])                    # dnsmasq-style zero length
    out["overrun-opt"] = hdr + bytes([60, 200, 1, 2, 255])
    out["no-end"] = hdr + bytes([53, 1, 1])
    out["overload-file"] = hdr[:108] + bytes([53, 1, 1, 255]) + hdr[112:] + bytes([52, 1, 1, 255])
    out["overload-bad"] = hdr + bytes([52, 1, 9, 255])
    out["uuid-short"] = hdr + bytes([97, 3, 0, 1, 2, 255])
    out["split-opt-rfc3396"] = hdr + bytes([60, 3]) + b"PXE" + bytes([60, 6]) + b"Client" + bytes([255])
    out["hlen-17"] = base[:2] + bytes([17]) + base[3:]
    out["bad-cookie"] = base[:236] + b"\0\0\0\0" + base[240:]
    out["truncated-header"] = base[:100]
    out["arch-odd"] = hdr + bytes([93, 3, 0, 7, 0, 255])
    out["opt43-overrun"] = hdr + bytes([43, 4, 6, 9, 1, 2, 255])
    return out


def tftp_seeds() -> dict[str, bytes]:
    out = golden("tftp")
    out["error-3-bytes"] = b"\x00\x05\x00"                                  # CVE-shaped short ERROR
    out["error-unterminated"] = b"\x00\x05\x00\x01oops"
    out["rrq-unterminated"] = b"\x00\x01pxelinux.0\x00octet"
    out["rrq-no-mode"] = b"\x00\x01pxelinux.0\x00"
    out["rrq-blksize8-tsize"] = b"\x00\x01f\x00octet\x00blksize\x008\x00tsize\x000\x00"
    out["rrq-blksize-huge"] = b"\x00\x01f\x00octet\x00blksize\x0099999999999\x00"
    out["rrq-blksize-superscript"] = "\x00\x01f\x00octet\x00blksize\x00²\x00".encode()
    out["rrq-dotdot"] = b"\x00\x01../../etc/passwd\x00octet\x00"
    out["rrq-odd-pairs"] = b"\x00\x01f\x00octet\x00blksize\x00"
    out["rrq-latin1"] = b"\x00\x01\xe9t\xe9\x00octet\x00"
    out["ack-short"] = b"\x00\x04\x00"
    out["ack-65535"] = b"\x00\x04\xff\xff"
    out["data"] = b"\x00\x03\x00\x01" + b"x" * 512
    out["oack-empty"] = b"\x00\x06"
    out["opcode-9"] = b"\x00\x09abc"
    out["one-byte"] = b"\x00"
    return out


def control_seeds() -> dict[str, bytes]:
    return {
        "status": b'{"v":1,"op":"status","args":{}}\n',
        "hosts-add": b'{"v":1,"op":"hosts.add","args":{"mac":"52:54:00:00:00:01","profile":"default"}}',
        "ok": b'{"v":1,"ok":true,"result":{"a":1}}',
        "error": b'{"v":1,"ok":false,"error":"x"}',
        "not-object": b"[1,2,3]",
        "bad-utf8": b'{"v":1,"op":"\xff"}',
        "deep": b"[" * 5000 + b"]" * 5000,
        "big-number": b'{"v":1e999999,"op":"status"}',
        "version-2": b'{"v":2,"op":"status"}',
        "args-not-obj": b'{"v":1,"op":"status","args":[]}',
    }


def main() -> None:
    for name, seeds in (("dhcp", dhcp_seeds()), ("tftp", tftp_seeds()), ("control", control_seeds())):
        d = HERE / "corpus" / name
        d.mkdir(parents=True, exist_ok=True)
        for role, data in seeds.items():
            (d / f"seed-{role}").write_bytes(data)


if __name__ == "__main__":
    main()
