"""Helpers for the hardening tests: a raw TFTP client we can make misbehave,
/proc readings of the daemon, and bounded polling.

The raw client speaks RFC 1350/2347 from a UDP socket on 127.0.0.1; each
quirk test drives it step by step.  Nothing here sleeps to assert timing:
``wait_until`` only bounds how long a condition may take to become true.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

OP_RRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 3, 4, 5, 6


def rrq(name: str, mode: str = "octet", **options: str) -> bytes:
    out = struct.pack("!H", OP_RRQ) + name.encode() + b"\0" + mode.encode() + b"\0"
    for k, v in options.items():
        out += k.encode() + b"\0" + str(v).encode() + b"\0"
    return out


def ack(block: int) -> bytes:
    return struct.pack("!HH", OP_ACK, block & 0xFFFF)


def error(code: int, msg: str) -> bytes:
    return struct.pack("!HH", OP_ERROR, code) + msg.encode() + b"\0"


def parse(data: bytes) -> tuple[int, object]:
    """(opcode, payload): DATA -> (block, bytes), ACK -> block, ERROR -> (code, msg), OACK -> dict."""
    op = struct.unpack_from("!H", data)[0]
    if op == OP_DATA:
        return op, (struct.unpack_from("!H", data, 2)[0], data[4:])
    if op == OP_ERROR:
        return op, (struct.unpack_from("!H", data, 2)[0], data[4:].split(b"\0")[0].decode(errors="replace"))
    if op == OP_OACK:
        items = data[2:].split(b"\0")[:-1]
        return op, {items[i].decode(): items[i + 1].decode() for i in range(0, len(items) - 1, 2)}
    if op == OP_ACK:
        return op, struct.unpack_from("!H", data, 2)[0]
    return op, data


class RawClient:
    """One TFTP client port on loopback."""

    def __init__(self, server_port: int, timeout_s: float = 10.0):
        self.server = ("127.0.0.1", server_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout_s)
        self.tid: tuple[str, int] | None = None
        self.received: list[bytes] = []

    def send_request(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def send(self, data: bytes) -> None:
        assert self.tid is not None, "no transfer port yet"
        self.sock.sendto(data, self.tid)

    def recv(self) -> tuple[int, object]:
        data, addr = self.sock.recvfrom(70000)
        if self.tid is None:
            self.tid = addr
        assert addr == self.tid, f"packet from {addr}, transfer is {self.tid}"
        self.received.append(data)
        return parse(data)

    def finish_lockstep(self, first: tuple[int, object], blksize: int) -> bytes:
        """Continue a transfer whose first reply was ``first`` (OACK or DATA 1); return the file."""
        out = bytearray()
        op, val = first
        expect = 1
        if op == OP_OACK:
            self.send(ack(0))
            op, val = self.recv()
        while True:
            assert op == OP_DATA, (op, val)
            block, payload = val
            if block == (expect - 1) & 0xFFFF:      # a retransmission of what we already have
                self.send(ack(block))
                op, val = self.recv()
                continue
            assert block == expect & 0xFFFF, (block, expect)
            out += payload
            self.send(ack(block))
            if len(payload) < blksize:
                return bytes(out)
            expect += 1
            op, val = self.recv()

    def close(self) -> None:
        self.sock.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def tracebacks(events: list[dict]) -> list[dict]:
    """Log events that carry a traceback or report an internal error."""
    return [e for e in events if "exception" in e or "Traceback" in str(e.get("line", ""))
            or str(e.get("event", "")).endswith("internal_error") or e.get("event") == "dhcp.error"]
