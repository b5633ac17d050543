"""The remote control plane end to end: two real sidusd processes (own TFTP roots, own ports) with
``control.tcp`` on loopback, the site PKI made by ``sidusctl pki`` (openssl), driven by the real
``sidusctl --server`` / ``--all`` and by raw TLS / TCP clients.

What must hold: mutual TLS works; no certificate, another CA's certificate, a certificate with no
role, and a read-only certificate running an admin op are all refused (and counted); garbage, an
oversize line, plain text and a silent client are dropped and counted while the daemon keeps
serving; a fan-out reaches both daemons and reports a third, dead, server as failed (non-zero exit).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from daemon_fixture import REPO, SidusDaemon, base_config, free_udp_port

MAC = "52:54:00:19:00:01"
WAIT_S = 20.0               # upper bound for a counter to show, never a timing assertion


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sidusctl(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SIDUS_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "sidusd.ctl", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=e)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")
    for cmd in (["ca", str(d / "site"), "--name", "site"], ["ca", str(d / "other"), "--name", "other"],
                ["server", str(d / "site"), "rack", "--address", "127.0.0.1"],
                ["client", str(d / "site"), "alice"], ["client", str(d / "site"), "bob"],
                ["client", str(d / "site"), "carol"], ["client", str(d / "other"), "alice"]):
        r = sidusctl("pki", *cmd)
        assert r.returncode == 0, r.stderr
    return d


def tcp_config(tmp: Path, pki: Path, port: int) -> dict:
    cfg = base_config(tmp, free_udp_port())
    cfg["control"]["tcp"] = {"listen": f"127.0.0.1:{port}", "tls_cert": str(pki / "site" / "rack.crt"),
                             "tls_key": str(pki / "site" / "rack.key"),
                             "client_ca": str(pki / "site" / "ca.crt"),
                             "admins": ["alice"], "readers": ["bob"],
                             "handshake_timeout_s": 1.0, "read_timeout_s": 2.0}
    return cfg


class Rack:
    def __init__(self, tmp: Path, pki: Path):
        tmp.mkdir()
        self.port = free_tcp_port()
        self.config = tcp_config(tmp, pki, self.port)
        self.daemon = SidusDaemon(tmp, config=self.config)
        self.daemon.tftp_port = self.config["tftp"]["port"]
        self.addr = f"127.0.0.1:{self.port}"

    def counter(self, name: str) -> int:
        return int(self.daemon.ctl_json("status")["counters"].get(name, 0))

    def wait_counter(self, name: str, at_least: int) -> int:
        deadline = time.monotonic() + WAIT_S
        while (n := self.counter(name)) < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
        return n


@pytest.fixture(scope="module")
def racks(pki, tmp_path_factory):
    base = tmp_path_factory.mktemp("racks")
    rs = [Rack(base / "r1", pki), Rack(base / "r2", pki)]
    try:
        for r in rs:
            r.daemon.start()
        yield rs
    finally:
        for r in rs:
            r.daemon.stop()


def as_(pki: Path, who: str, ca: str = "site") -> list[str]:
    d = pki / ca
    return ["--cert", str(d / f"{who}.crt"), "--key", str(d / f"{who}.key"), "--ca", str(pki / "site" / "ca.crt")]


def client_ctx(pki: Path, who: str | None, ca: str = "site") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki / "site" / "ca.crt"))
    if who:
        ctx.load_cert_chain(str(pki / ca / f"{who}.crt"), str(pki / ca / f"{who}.key"))
    return ctx


def tls_exchange(rack: Rack, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Send ``data`` inside TLS, return all the server sends back until it closes (b"" if refused)."""
    out = bytearray()
    with socket.create_connection(("127.0.0.1", rack.port), timeout=WAIT_S) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(data)
                while chunk := s.recv(65536):
                    out += chunk
        except (ssl.SSLError, ConnectionError, OSError):
            pass
    return bytes(out)


def test_mutual_tls_admin_and_reader(racks, pki):
    r1 = racks[0]
    st = sidusctl("--server", r1.addr, *as_(pki, "alice"), "--json", "status")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["pid"] == r1.daemon.proc.pid
    ro = sidusctl("--server", r1.addr, *as_(pki, "bob"), "hosts", "list")
    assert ro.returncode == 0, ro.stderr
    # the same settings from the environment: no flag at all
    env = {"SIDUS_SERVER": r1.addr, "SIDUS_CERT": str(pki / "site/bob.crt"), "SIDUS_KEY": str(pki / "site/bob.key"),
           "SIDUS_CA": str(pki / "site/ca.crt")}
    assert sidusctl("--json", "status", env=env).returncode == 0


def test_read_only_and_unlisted_certificates_refused(racks, pki):
    r1 = racks[0]
    before = r1.counter("control.remote.denied")
    ro = sidusctl("--server", r1.addr, *as_(pki, "bob"), "hosts", "add", MAC, "--profile", "default")
    assert ro.returncode == 1 and "read-only" in ro.stderr, ro.stderr
    no = sidusctl("--server", r1.addr, *as_(pki, "carol"), "status")
    assert no.returncode == 1 and "neither control.tcp.admins nor control.tcp.readers" in no.stderr, no.stderr
    assert r1.wait_counter("control.remote.denied", before + 2) >= before + 2
    assert MAC not in {h["mac"] for h in r1.daemon.ctl_json("hosts", "list")}
    assert any(e.get("event") == "control.remote.denied" and e.get("cn") == "bob" and e.get("op") == "hosts.add"
               for e in r1.daemon.events())


def test_no_certificate_and_other_ca_refused(racks, pki):
    r1 = racks[0]
    before = r1.counter("control.remote.tls_failed")
    req = b'{"v":1,"op":"status","args":{}}\n'
    assert tls_exchange(r1, client_ctx(pki, None), req) == b""                   # no client certificate
    assert tls_exchange(r1, client_ctx(pki, "alice", ca="other"), req) == b""    # same CN, another CA
    other = sidusctl("--server", r1.addr, *as_(pki, "alice", ca="other"), "status")
    assert other.returncode == 3 and "TLS" in other.stderr, other.stderr
    assert r1.wait_counter("control.remote.tls_failed", before + 3) >= before + 3
    # and a sidusctl that does not trust the server's CA refuses the server
    wrong_ca = sidusctl("--server", r1.addr, "--cert", str(pki / "site/alice.crt"), "--key",
                        str(pki / "site/alice.key"), "--ca", str(pki / "other/ca.crt"), "status")
    assert wrong_ca.returncode == 3 and "certificate is not trusted" in wrong_ca.stderr, wrong_ca.stderr


def test_hostile_input_dropped_counted_daemon_keeps_serving(racks, pki):
    r1 = racks[0]
    mal, tls_failed, timeouts = (r1.counter(n) for n in ("control.remote.malformed", "control.remote.tls_failed",
                                                         "control.remote.timeouts"))
    alice = client_ctx(pki, "alice")
    # garbage inside TLS: one error line, then the connection is closed (the rest never read)
    out = tls_exchange(r1, alice, b"garbage\n" + b'{"v":1,"op":"status","args":{}}\n')
    assert out.count(b"\n") == 1 and json.loads(out)["ok"] is False
    # an oversize line without newline: an error naming the limit, closed
    out = tls_exchange(r1, alice, b"x" * (200 * 1024))
    assert json.loads(out.splitlines()[0])["ok"] is False and b"too long" in out
    # plain text at the TLS port, and a client that never starts the handshake
    with socket.create_connection(("127.0.0.1", r1.port), timeout=WAIT_S) as s:
        s.sendall(b'{"v":1,"op":"status","args":{}}\n')
        s.settimeout(WAIT_S)
        try:
            while s.recv(100):                            # an alert at most, then the daemon closes it
                pass
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", r1.port), timeout=WAIT_S) as s:
        s.settimeout(WAIT_S)
        try:
            assert s.recv(100) == b""                     # closed by the handshake timeout (1 s)
        except ConnectionResetError:
            pass
    # a TLS client that says nothing after the handshake: dropped after read_timeout_s
    with socket.create_connection(("127.0.0.1", r1.port), timeout=WAIT_S) as raw, \
            alice.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.recv(100) == b""
    assert r1.wait_counter("control.remote.malformed", mal + 2) >= mal + 2
    assert r1.wait_counter("control.remote.tls_failed", tls_failed + 2) >= tls_failed + 2
    assert r1.wait_counter("control.remote.timeouts", timeouts + 1) >= timeouts + 1
    ok = sidusctl("--server", r1.addr, *as_(pki, "alice"), "--json", "status")
    assert ok.returncode == 0 and r1.daemon.proc.poll() is None, ok.stderr


def test_fan_out_reaches_every_rack_and_reports_the_dead_one(racks, pki, tmp_path):
    r1, r2 = racks
    dead = f"127.0.0.1:{free_tcp_port()}"
    srv = ["--server", r1.addr, "--server", r2.addr, "--server", dead]
    add = sidusctl(*srv, *as_(pki, "alice"), "hosts", "add", MAC, "--profile", "default", "--hostname", "n19")
    assert add.returncode == 3, (add.stdout, add.stderr)      # only unreachable failures: exit 3
    lines = {ln.split()[0]: ln.split()[1] for ln in add.stdout.splitlines()[1:]}
    assert lines == {r1.addr: "ok", r2.addr: "ok", dead: "unreachable"}, add.stdout
    assert f"failed on 1 of 3 servers: {dead}" in add.stderr
    for r in racks:                                           # both inventories have it (their own socket)
        assert {h["mac"]: h["hostname"] for h in r.daemon.ctl_json("hosts", "list")}.get(MAC) == "n19"
    # --all from a config's control.servers and control.client: no flag but --all
    cfg = dict(r1.config)
    cfg["control"] = {**cfg["control"], "servers": [r1.addr, r2.addr, dead],
                      "client": {"cert": str(pki / "site/alice.crt"), "key": str(pki / "site/alice.key"),
                                 "ca": str(pki / "site/ca.crt")}}
    (tmp_path / "client.yaml").write_text(yaml.safe_dump(cfg))
    gens = [r.daemon.ctl_json("status")["generation"] for r in racks]
    rel = sidusctl("--all", "--json", "reload", env={"SIDUS_CONFIG": str(tmp_path / "client.yaml")})
    assert rel.returncode == 3, rel.stderr
    rows = {row["server"]: row for row in json.loads(rel.stdout)}
    assert [rows[s]["status"] for s in (r1.addr, r2.addr, dead)] == ["ok", "ok", "unreachable"]
    assert [r.daemon.ctl_json("status")["generation"] for r in racks] == [g + 1 for g in gens]
    # a daemon's refusal is an error, not ok: exit 1 even though the others succeeded
    bad = sidusctl(*srv[:4], *as_(pki, "bob"), "reload")
    assert bad.returncode == 1 and "read-only" in bad.stdout, bad.stdout


def test_bad_tls_config_refused_at_start(pki, tmp_path):
    cfg = tcp_config(tmp_path, pki, free_tcp_port())
    cfg["control"]["tcp"]["tls_key"] = str(pki / "site" / "alice.key")     # not the key of rack.crt
    d = SidusDaemon(tmp_path, config=cfg)
    with pytest.raises(RuntimeError) as exc:
        d.start()
    d.stop()
    assert "control.tcp.tls_key" in str(exc.value) and "is not the key of the certificate" in str(exc.value)


def test_check_refuses_what_the_start_would(pki, tmp_path):
    cfg = tcp_config(tmp_path, pki, free_tcp_port())
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"profiles": {"default": {"image": "demo"}}}))
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    check = [sys.executable, "-m", "sidusd", "--check", "--config", str(tmp_path / "sidus.yaml")]
    ok = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ok.returncode == 0, ok.stderr
    cfg["control"]["tcp"]["client_ca"] = str(tmp_path / "missing-ca.crt")
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    bad = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "control.tcp.client_ca" in bad.stderr and "no such file" in bad.stderr, bad.stderr
