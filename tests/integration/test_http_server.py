"""The real HttpService on 127.0.0.1 (high port) with a real Runtime, against curl and raw sockets.

curl is the real client (GET, HEAD, ranges, conditional requests); a raw
socket does what curl will not do on purpose (``..`` left in the path, NUL,
invalid UTF-8, half a request, a client that never reads).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from structlog.testing import capture_logs

from sidusd.net.http_server import HttpService
from sidusd.runtime import Runtime

MAC = "52:54:00:12:34:56"
WAIT_S = 60          # upper bound for anything to happen (never asserted as a duration)
SECRET = b"root:x:0:0:secret outside the root\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """HttpService in its own event loop thread over a real Runtime (config + inventory files)."""

    def __init__(self, tmp: Path, **svc_kw):
        self.tmp = tmp
        self.root = tmp / "tftp"
        (self.root / "demo").mkdir(parents=True)
        (tmp / "image").mkdir()
        self.kernel = os.urandom(3 * 1024 * 1024 + 17)
        (self.root / "demo" / "vmlinuz").write_bytes(self.kernel)
        (self.root / "demo" / "initrd.img").write_bytes(b"initrd" * 1000)
        (self.root / "empty").write_bytes(b"")
        (tmp / "secret").write_bytes(SECRET)
        os.symlink(tmp / "secret", self.root / "link")
        os.mkfifo(self.root / "fifo")
        self.port = free_port()
        cfg = {"state_dir": str(tmp / "state"), "inventory_file": str(tmp / "inventory.yaml"),
               "dhcp": {"mode": "off"},
               "tftp": {"enabled": False, "root": str(self.root)},
               "http": {"enabled": True, "address": "127.0.0.1", "port": self.port},
               "nfs": {"backend": "none", "server_address": "10.13.20.1"},
               "images": {"demo": {"root": str(tmp / "image"), "kernel": "demo/vmlinuz",
                                   "initrd": "demo/initrd.img", "append": "console=ttyS0"}}}
        inv = {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}},
               "hosts": [{"mac": MAC, "hostname": "h1", "profile": "default", "append": "sidus.test=http"}]}
        (tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
        (tmp / "inventory.yaml").write_text(yaml.safe_dump(inv))
        self._logs = capture_logs()
        self.events = self._logs.__enter__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runtime = self.call(self._make_runtime(tmp / "sidus.yaml"))
        self.svc = HttpService(self.runtime, **svc_kw)
        self.call(self.svc.start())

    @staticmethod
    async def _make_runtime(path: Path) -> Runtime:
        return Runtime.load(path)

    def call(self, coro, timeout: float = WAIT_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn):
        async def run():
            return fn()
        return self.call(run())

    def counters(self) -> dict:
        return self.on_loop(self.runtime.observer.snapshot)

    def wait_counter(self, name: str, at_least: int = 1) -> int:
        deadline = time.monotonic() + WAIT_S
        while self.counters().get(name, 0) < at_least:
            assert time.monotonic() < deadline, f"counter {name} never reached {at_least}: {self.counters()}"
            time.sleep(0.05)
        return self.counters()[name]

    def transfers(self) -> list[dict]:
        return [e for e in list(self.events) if e["event"] == "http.transfer"]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        try:
            self.call(self.svc.stop(grace_s=1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            self._logs.__exit__(None, None, None)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path, idle_timeout_s=20)
    yield s
    s.close()


def curl(*args: str) -> subprocess.CompletedProcess:
    exe = require_tool("curl")
    return subprocess.run([exe, "-sS", "--max-time", str(WAIT_S), *args], capture_output=True,
                          timeout=WAIT_S + 10)


def curl_status(*args: str) -> tuple[int, bytes]:
    """(status, body) of one curl request."""
    res = curl("-o", "-", "-w", "\n%{http_code}", *args)
    body, _, code = res.stdout.rpartition(b"\n")
    return int(code), body


def raw_request(port: int, request: bytes, timeout: float = WAIT_S) -> bytes:
    """Send bytes as they are, read until the server closes (Connection: close) or times out."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_get_whole_file_with_sendfile_and_summary(server):
    server.on_loop(lambda: server.runtime.observer.client_seen(MAC, ip="127.0.0.1", arch="bios"))
    res = curl("-o", "-", server.url("/demo/vmlinuz"))
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(res.stdout).digest() == hashlib.sha256(server.kernel).digest()
    ev = [e for e in server.transfers() if e["file"] == "demo/vmlinuz"]
    assert len(ev) == 1, server.transfers()
    assert ev[0]["status"] == 200 and ev[0]["bytes"] == len(server.kernel) and ev[0]["outcome"] == "ok"
    assert ev[0]["mac"] == MAC              # learnt from the client IP's DHCP exchange
    timeline = server.on_loop(lambda: server.runtime.observer.clients[MAC].as_dict()["timeline"])
    http = [t for t in timeline if t["event"] == "http"]
    assert http and http[-1]["file"] == "demo/vmlinuz" and http[-1]["bytes"] == len(server.kernel)
    assert server.counters()["http.transfers.done"] == 1


@pytest.mark.parametrize("spec,start,stop", [
    ("0-99", 0, 100), ("100-", 100, None), ("-50", -50, None), ("5-5", 5, 6),
    ("3145000-99999999", 3145000, None),          # end past the size: up to the end
])
def test_byte_ranges(server, spec, start, stop):
    res = curl("-o", "-", "-D", "/dev/stderr", "-r", spec, server.url("/demo/vmlinuz"))
    assert res.returncode == 0, res.stderr
    want = server.kernel[start:stop]
    assert res.stdout == want
    headers = res.stderr.decode().lower()
    assert " 206 " in headers.splitlines()[0], headers
    first = start if start >= 0 else len(server.kernel) + start
    assert f"content-range: bytes {first}-{first + len(want) - 1}/{len(server.kernel)}" in headers


def test_unsatisfiable_and_ignored_ranges(server):
    code, _ = curl_status("-r", f"{len(server.kernel)}-", server.url("/demo/vmlinuz"))
    assert code == 416
    code, _ = curl_status("-r", "0-", server.url("/empty"))
    assert code == 416
    code, body = curl_status("-r", "0-1,5-6", server.url("/demo/vmlinuz"))   # multi-range: ignored
    assert code == 200 and body == server.kernel
    # If-Range with a validator that does not match: the whole file
    code, body = curl_status("-r", "0-9", "-H", 'If-Range: "stale"', server.url("/demo/vmlinuz"))
    assert code == 200 and body == server.kernel


def test_head_and_conditional_get(server):
    res = curl("-I", server.url("/demo/vmlinuz"))
    assert res.returncode == 0, res.stderr
    headers = dict(line.split(": ", 1) for line in res.stdout.decode().lower().splitlines()[1:] if ": " in line)
    assert int(headers["content-length"]) == len(server.kernel)
    assert headers["accept-ranges"] == "bytes" and "etag" in headers and "last-modified" in headers
    code, body = curl_status("-H", f"If-None-Match: {headers['etag']}", server.url("/demo/vmlinuz"))
    assert code == 304 and body == b""
    assert server.counters()["http.transfers.done"] == 2      # the HEAD and the 304
    assert "http.transfers.failed" not in server.counters()
    head = [e for e in server.transfers() if e["method"] == "HEAD"]
    assert head and head[0]["bytes"] == 0 and head[0]["status"] == 200


def test_ipxe_script_rendered_per_mac_fetches_over_http(server):
    for path in ("/boot/52-54-00-12-34-56.ipxe", "/boot/52:54:00:12:34:56.ipxe", "/525400123456.ipxe"):
        code, body = curl_status(server.url(path))
        assert code == 200, (path, body)
        text = body.decode()
        assert text.startswith("#!ipxe\n")
        base = f"http://127.0.0.1:{server.port}"
        assert f"kernel {base}/demo/vmlinuz " in text and f"initrd --name initrd.img {base}/demo/initrd.img" in text
        assert "sidus.test=http" in text
    res = curl("-D", "-", "-o", "/dev/null", server.url("/boot/52-54-00-12-34-56.ipxe"))
    assert b"cache-control: no-store" in res.stdout.lower()
    timeline = server.on_loop(lambda: server.runtime.observer.clients[MAC].as_dict()["timeline"])
    assert any(t["event"] == "http" and t["file"] == "boot/52-54-00-12-34-56.ipxe" for t in timeline)


def test_not_found_and_method_not_allowed(server):
    assert curl_status(server.url("/nope"))[0] == 404
    assert curl_status(server.url("/demo/nope.img"))[0] == 404
    res = curl("-D", "-", "-o", "/dev/null", "-X", "POST", "--data", "x", server.url("/demo/vmlinuz"))
    assert b" 405 " in res.stdout.splitlines()[0] and b"allow: get, head" in res.stdout.lower()
    assert server.counters()["http.refused.not_found"] == 2
    assert server.counters()["http.refused.method"] == 1


# (raw request path, acceptable statuses): nothing outside the root, no symlink, no special file
HOSTILE = [
    (b"/../secret", {403}), (b"/demo/../../secret", {403}), (b"/%2e%2e/secret", {403}),
    (b"/demo/%2e%2e/%2e%2e/secret", {403}), (b"/..%2fsecret", {403}), (b"/..%5csecret", {403}),
    (b"/link", {403}), (b"/fifo", {403}), (b"/demo", {403}), (b"/demo/", {403}), (b"//demo//vmlinuz", {403}),
    (b"/a%00b", {403}), (b"/a%0ab", {403}), (b"/%ff%fe", {400}), (b"/" + b"x" * 300, {403}),
    (b"/pxelinux.cfg/01-zz-zz-zz-zz-zz-zz", {403}), (b"/" + b"%2e" * 3, {404}),
]


@pytest.mark.parametrize("path,statuses", HOSTILE, ids=[p.decode("latin-1")[:40] for p, _ in HOSTILE])
def test_hostile_names(server, path, statuses):
    resp = raw_request(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(resp) in statuses, resp[:200]
    assert SECRET not in resp


def test_malformed_requests_do_not_stop_the_server(server):
    for junk in (b"\x00\x01\x02 junk\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"GET /demo/vmlinuz HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n"):
        resp = raw_request(server.port, junk)
        assert resp == b"" or status_of(resp) >= 400, resp[:200]
    assert server.counters()["http.malformed"] == 3
    assert "http.internal_errors" not in server.counters()
    code, body = curl_status(server.url("/demo/initrd.img"))
    assert code == 200 and body == b"initrd" * 1000


def test_connection_limits(tmp_path):
    """Every slot taken: an idle one is taken back for the newcomer; only when all are busy, 503."""
    s = Server(tmp_path, max_connections=2, max_per_client=8, idle_timeout_s=30)
    big = s.root / "big.img"
    with open(big, "wb") as f:
        f.truncate(256 << 20)
    try:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) for _ in range(2)]
        s.wait_counter("http.connections", 2)
        code, _ = curl_status(s.url("/demo/initrd.img"))
        assert code == 200
        assert s.counters()["http.evicted.idle"] == 1 and "http.refused.busy" not in s.counters()
        for h in held:
            h.close()
        deadline = time.monotonic() + WAIT_S
        while s.on_loop(s.svc.connections):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        readers = []
        for _ in range(2):                      # two responses being sent, to clients that do not read
            r = socket.socket()
            r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            r.settimeout(WAIT_S)
            r.connect(("127.0.0.1", s.port))
            r.sendall(b"GET /big.img HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(r)
        s.wait_counter("http.requests", 3)
        resp = raw_request(s.port, b"GET /demo/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(resp) == 503 and b"retry-after: 1" in resp.lower(), resp
        assert s.counters()["http.refused.busy"] == 1 and "http.evicted.busy" not in s.counters()
        for r in readers:
            r.close()
    finally:
        s.close()


def test_per_client_limit(tmp_path):
    s = Server(tmp_path, max_connections=100, max_per_client=1, idle_timeout_s=30)
    try:
        held = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S)
        s.wait_counter("http.connections", 1)
        resp = raw_request(s.port, b"GET /demo/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(resp) == 503
        assert s.counters()["http.refused.per_client"] == 1
        held.close()
    finally:
        s.close()


def test_slow_clients_are_cut(tmp_path):
    s = Server(tmp_path, idle_timeout_s=0.5)
    big = s.root / "big.img"
    with open(big, "wb") as f:
        f.truncate(256 << 20)            # sparse: far more than socket buffers hold
    try:
        # 1. half a request, never finished: closed by the watchdog
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as half:
            half.sendall(b"GET /demo/vmlinuz HTTP/1.1\r\nHost:")
            assert half.recv(100) == b""
        assert s.counters()["http.timeouts.header"] >= 1      # (no first request: the header timeout)
        # 2. a full request for a big file, and a client that never reads
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.settimeout(WAIT_S)
        reader.connect(("127.0.0.1", s.port))
        reader.sendall(b"GET /big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        s.wait_counter("http.timeouts.send")
        reader.close()
        ev = [e for e in s.transfers() if e["file"] == "big.img"]
        assert len(ev) == 1 and ev[0]["outcome"] == "timeout" and ev[0]["bytes"] < (256 << 20), ev
        assert s.counters()["http.transfers.failed"] >= 1
        # the server still serves
        code, _ = curl_status(s.url("/demo/initrd.img"))
        assert code == 200
    finally:
        s.close()


def test_stop_closes_everything(tmp_path):
    s = Server(tmp_path, idle_timeout_s=30)
    held = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S)
    s.wait_counter("http.connections", 1)
    s.call(s.svc.stop(grace_s=1))
    assert held.recv(10) == b""
    assert s.on_loop(s.svc.listeners) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    held.close()
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(10)
    s.loop.close()
    s._logs.__exit__(None, None, None)


def test_real_daemon_serves_http_and_follows_reload(tmp_path):
    """``python3 -m sidusd`` with ``http.enabled``: listener in status, script changes on reload."""
    from daemon_fixture import SidusDaemon, base_config, free_udp_port
    cfg = base_config(tmp_path, free_udp_port())
    port = free_port()
    cfg["http"] = {"enabled": True, "address": "127.0.0.1", "port": port}
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(b"kernel" * 5000)
    host = {"mac": MAC, "hostname": "h1", "profile": "default", "append": "sidus.test=one"}
    with SidusDaemon(tmp_path, hosts=[host], config=cfg) as d:
        url = f"http://127.0.0.1:{port}"
        code, body = curl_status(f"{url}/boot/{MAC.replace(':', '-')}.ipxe")
        assert code == 200 and b"sidus.test=one" in body and f"{url}/images/demo/vmlinuz".encode() in body
        code, body = curl_status(f"{url}/images/demo/vmlinuz")
        assert code == 200 and body == b"kernel" * 5000
        status = d.ctl_json("status")
        assert {"proto": "tcp", "service": "http", "address": "127.0.0.1", "port": port} \
            in status["listeners"]["http"], status["listeners"]
        d.ctl("hosts", "add", MAC, "--profile", "default", "--hostname", "h1", "--append", "sidus.test=two")
        code, body = curl_status(f"{url}/boot/{MAC.replace(':', '-')}.ipxe")
        assert code == 200 and b"sidus.test=two" in body and b"sidus.test=one" not in body
        clients = d.ctl_json("clients", MAC)
        assert any(e["event"] == "http" for e in clients[0]["timeline"]), clients
        assert d.stop() == 0
    transfers = [e for e in d.events() if e.get("event") == "http.transfer"]
    assert len(transfers) == 3 and all(e["status"] == 200 for e in transfers), transfers


def test_file_shrinking_mid_transfer_ends_it_cleanly(server):
    big = server.root / "shrinks.img"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as c:
        c.sendall(b"GET /shrinks.img HTTP/1.1\r\nHost: x\r\n\r\n")
        got = c.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")
        os.truncate(big, 0)
        while True:
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    assert len(got) < 64 << 20
    server.wait_counter("http.read_errors")
    ev = [e for e in server.transfers() if e["file"] == "shrinks.img"]
    assert len(ev) == 1 and ev[0]["outcome"] == "read-error" and ev[0]["bytes"] < 64 << 20, ev
    assert "http.internal_errors" not in server.counters()


def test_refusal_flood_is_reset_not_lingered(tmp_path, monkeypatch):
    import sidusd.net.http_conns as http_conns
    monkeypatch.setattr(http_conns, "MAX_REFUSING", 1)
    s = Server(tmp_path, max_connections=1, idle_timeout_s=30)
    with open(s.root / "big.img", "wb") as f:
        f.truncate(256 << 20)
    try:
        held = socket.socket()                                # busy: a response it does not read
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        held.settimeout(WAIT_S)
        held.connect(("127.0.0.1", s.port))
        held.sendall(b"GET /big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        s.wait_counter("http.requests", 1)
        first = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S)   # lingers with its 503
        assert first.recv(100).startswith(b"HTTP/1.1 503 ")
        second = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S)
        try:
            got = second.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""                                   # reset at once, no 503 written
        assert s.counters()["http.refused.busy"] == 2
        for c in (held, first, second):
            c.close()
    finally:
        s.close()
