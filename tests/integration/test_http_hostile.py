"""The HTTP boot edge under hostile clients (issue 14 item 10): real curl served while attackers run.

The attackers are raw sockets from other loopback addresses (127.0.0.2-5):
a slowloris that keeps every connection slot filled with request headers
sent one byte at a time and reconnects as soon as it is cut, and clients
that send an HTTP/0.9 request line.  The server is the real HttpService over
a real Runtime (the fixture of test_http_server).
"""

from __future__ import annotations

import select
import socket
import threading
import time

from test_http_server import WAIT_S, Server, curl_status

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 6)]


class Slowloris:
    """``per_ip`` connections from each attacker address, each trickling header bytes, reconnecting when cut."""

    def __init__(self, port: int, per_ip: int, byte_every_s: float = 0.2):
        self.port, self.per_ip, self.every = port, per_ip, byte_every_s
        self.stop = threading.Event()
        self.connects = 0
        self.cut = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, ip: str) -> socket.socket | None:
        s = socket.socket()
        s.bind((ip, 0))
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(b"GET /demo/vmlinuz HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self.connects += 1
        return s

    def _run(self) -> None:
        socks: dict[socket.socket, str] = {}
        last = 0.0
        while not self.stop.is_set():
            have = {ip: 0 for ip in ATTACKERS}
            for ip in socks.values():
                have[ip] += 1
            for ip, n in have.items():
                for _ in range(self.per_ip - n):
                    s = self._open(ip)
                    if s is not None:
                        socks[s] = ip
            readable, _, _ = select.select(list(socks), [], [], 0.02)
            for s in readable:                       # a 503, a reset or a close: gone, reconnect
                try:
                    s.recv(4096)
                except OSError:
                    pass
                s.close()
                del socks[s]
                self.cut += 1
            if time.monotonic() - last >= self.every:
                last = time.monotonic()
                for s in list(socks):
                    try:
                        s.send(b"X")                 # one more byte of a header that never ends
                    except OSError:
                        s.close()
                        del socks[s]
        for s in socks:
            s.close()

    def __enter__(self) -> Slowloris:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def test_curl_is_served_while_a_reconnecting_slowloris_holds_every_slot(tmp_path):
    # 4 attacker IPs x 4 connections = every one of the 16 slots (per IP cap 4 not exceeded)
    s = Server(tmp_path, max_connections=16, max_per_client=4, idle_timeout_s=30, header_timeout_s=30)
    try:
        with Slowloris(s.port, per_ip=4) as attack:
            deadline = time.monotonic() + WAIT_S
            while s.on_loop(s.svc.connections) < 16:
                assert time.monotonic() < deadline, s.counters()
                time.sleep(0.05)
            codes = []
            t0 = time.monotonic()
            for _ in range(20):
                code, body = curl_status(s.url("/demo/initrd.img"))
                codes.append(code)
                assert code != 200 or body == b"initrd" * 1000
            took = time.monotonic() - t0
            assert s.on_loop(s.svc.connections) >= 12        # the attack kept (nearly) every slot filled
        assert codes == [200] * 20, codes
        c = s.counters()
        assert c["http.evicted.idle"] >= 20 and attack.cut >= 20, (c, attack.cut)
        assert "http.refused.busy" not in c and "http.internal_errors" not in c, c
        print(f"20 curl GETs during the slowloris: {took:.2f} s, attacker connects {attack.connects}, "
              f"evicted {c['http.evicted.idle']}")
    finally:
        s.close()


def test_http09_request_line_is_answered_at_once(tmp_path):
    s = Server(tmp_path, idle_timeout_s=30, header_timeout_s=30)
    try:
        for line in (b"GET /demo/initrd.img\r\n", b"GET /demo/initrd.img\n", b"\r\nGET /\r\n", b"junk\r\n"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=3) as c:   # << the 30 s timeouts
                c.sendall(line)
                got = b""
                while chunk := c.recv(4096):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in got, (line, got)
        assert s.counters()["http.malformed"] == 4
        code, _ = curl_status(s.url("/demo/initrd.img"))                  # and HTTP/1.1 is still served
        assert code == 200
        code, _ = curl_status("--http1.0", s.url("/demo/initrd.img"))
        assert code == 200
    finally:
        s.close()


def test_a_connection_without_a_first_request_is_cut_after_header_timeout(tmp_path):
    s = Server(tmp_path, idle_timeout_s=30, header_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as c:
            c.sendall(b"GET /demo/initrd.img HTTP/1.1\r\nHost:")
            assert c.recv(100) == b""
        assert s.counters()["http.timeouts.header"] == 1
        # a keep-alive connection that did send a request is held to idle_timeout_s instead
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as c:
            c.sendall(b"GET /demo/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"initrd" * 1000):
                got += c.recv(65536)
            time.sleep(1.5)                               # 3 header timeouts, no cut
            c.sendall(b"GET /demo/initrd.img HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 200 ")
        assert s.counters()["http.timeouts.header"] == 1 and "http.timeouts.idle" not in s.counters()
    finally:
        s.close()


def test_slow_readers_of_one_address_cannot_hold_every_slot(tmp_path):
    """Every slot busy sending to clients of one address that do not read: a newcomer from another
    address takes one back (fair share), a newcomer from the same address gets 503."""
    s = Server(tmp_path, max_connections=3, max_per_client=8, idle_timeout_s=30)
    with open(s.root / "big.img", "wb") as f:
        f.truncate(256 << 20)
    readers = []
    try:
        for _ in range(3):
            r = socket.socket()
            r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            r.bind((ATTACKERS[0], 0))
            r.settimeout(WAIT_S)
            r.connect(("127.0.0.1", s.port))
            r.sendall(b"GET /big.img HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(r)
        s.wait_counter("http.requests", 3)
        code, body = curl_status(s.url("/demo/initrd.img"))           # from 127.0.0.1
        assert code == 200 and body == b"initrd" * 1000
        assert s.counters()["http.evicted.busy"] == 1
        s.wait_counter("http.transfers.failed")
        assert [e["outcome"] for e in s.transfers() if e["file"] == "big.img"] == ["evicted"]
        deadline = time.monotonic() + WAIT_S
        while s.on_loop(s.svc.connections) != 2:                     # curl's connection closed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = socket.socket()
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        r.bind((ATTACKERS[0], 0))
        r.settimeout(WAIT_S)
        r.connect(("127.0.0.1", s.port))
        r.sendall(b"GET /big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(r)
        s.wait_counter("http.requests", 5)                           # all 3 slots busy again
        r = socket.socket()
        r.bind((ATTACKERS[0], 0))
        r.settimeout(WAIT_S)
        r.connect(("127.0.0.1", s.port))
        r.sendall(b"GET /demo/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.recv(100).startswith(b"HTTP/1.1 503 ")                # its own address holds the most
        r.close()
        assert "http.internal_errors" not in s.counters(), s.counters()
    finally:
        for r in readers:
            r.close()
        s.close()
