"""A lossy UDP relay on loopback between one TFTP client and sidusd.

    with LossyRelay(server_port, drop=0.1, dup=0.02, reorder=0.02, seed=1) as relay:
        subprocess.run(["curl", f"tftp://127.0.0.1:{relay.port}/file", ...])
        relay.stats.data_packets

The client talks to ``relay.port``; the relay forwards its datagrams to the
server (port 69 first, then the transfer port the server answered from) and
forwards every answer back from ``relay.port`` (TFTP clients accept the first
answer's port as the transfer ID).  Each datagram, each way, is dropped with
probability ``drop``, sent twice with ``dup``, or held back and sent after the
next one with ``reorder`` (a held datagram is released after 50 ms if nothing
follows).  ``dup_acks=True`` duplicates every ACK from the client.  The
relay counts the DATA packets the server sent (before any drop), which is
what "DATA packets sent" means in the tests.  Only 127.0.0.1 is used.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class RelayStats:
    data_packets: int = 0           # DATA datagrams received from the server
    data_bytes: int = 0             # their payload bytes
    blocks: set = field(default_factory=set)
    acks: int = 0                   # ACKs received from the client
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


class LossyRelay:
    def __init__(self, server_port: int, drop: float = 0.0, dup: float = 0.0, reorder: float = 0.0,
                 dup_acks: bool = False, seed: int = 0):
        self.server = ("127.0.0.1", server_port)
        self.drop, self.dup, self.reorder, self.dup_acks = drop, dup, reorder, dup_acks
        self.rng = random.Random(seed)
        self.stats = RelayStats()
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        for s in (self.front, self.back):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = self.front.getsockname()[1]
        self.client: tuple[str, int] | None = None
        self.target = self.server
        self._held: dict[str, tuple[socket.socket, bytes, tuple[str, int]] | None] = {"up": None, "down": None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._wake_r, self._wake_w = socket.socketpair()

    def __enter__(self) -> LossyRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(10)
        for s in (self.front, self.back, self._wake_r, self._wake_w):
            s.close()

    # -- impairment --------------------------------------------------------------
    def _emit(self, way: str, sock: socket.socket, data: bytes, dest: tuple[str, int], force_dup: bool) -> None:
        if data[:2] not in (b"\x00\x03", b"\x00\x04"):
            # Only the data phase (DATA, ACK) is impaired. The negotiation is passed
            # as is: atftp aborts on a duplicated OACK ("unexpected OACK"), a client
            # limitation, and a lost RRQ/OACK only tests the client's first timer.
            self._send(sock, data, dest)
            return
        r = self.rng.random()
        if r < self.drop:
            self.stats.dropped += 1
            return
        copies = 2 if force_dup or r < self.drop + self.dup else 1
        if copies == 2:
            self.stats.duplicated += 1
        held = self._held[way]
        if held is None and self.rng.random() < self.reorder:
            self._held[way] = (sock, data, dest)
            self.stats.reordered += 1
            return
        for _ in range(copies):
            self._send(sock, data, dest)
        if held is not None:
            self._held[way] = None
            self._send(*held)

    @staticmethod
    def _send(sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        try:
            sock.sendto(data, dest)
        except OSError:
            pass                    # a full buffer is one more loss

    def _flush_held(self) -> None:
        for way, held in self._held.items():
            if held is not None:
                self._held[way] = None
                self._send(*held)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.front, self.back, self._wake_r], [], [], 0.05)
            if not ready:
                self._flush_held()
                continue
            for sock in ready:
                if sock is self._wake_r:
                    return
                try:
                    data, addr = sock.recvfrom(70000)
                except OSError:
                    continue
                op = struct.unpack_from("!H", data)[0] if len(data) >= 2 else -1
                if sock is self.front:
                    if op == 1:                         # a new request: back to port 69
                        self.client, self.target = addr, self.server
                    elif addr != self.client:
                        continue
                    if op == 4:
                        self.stats.acks += 1
                    self._emit("up", self.back, data, self.target, self.dup_acks and op == 4)
                else:
                    if addr[1] != self.server[1]:
                        self.target = addr              # the transfer port (TID)
                    if op == 3 and len(data) >= 4:
                        self.stats.data_packets += 1
                        self.stats.data_bytes += len(data) - 4
                        self.stats.blocks.add(struct.unpack_from("!H", data, 2)[0])
                    if self.client is not None:
                        self._emit("down", self.front, data, self.client, False)
