"""Simulated racks (issue #19): K racks as network namespaces, PostgreSQL in its own, a storm.

Shared by the bench (:mod:`bench.racks`) and the scenario tests (tests/integration/test_racks.py).

    core (router, ip_forward) ── u0 ── rack k (bridge br0 10.4k.0.1/16, router)
      │   tc netem on both ends of every rack uplink         ├─ e0 sidusd k.1 (netns of its own) 10.4k.0.11
      │                                                      ├─ e0 sidusd k.2                      10.4k.0.12
      └── pg0 ── PostgreSQL (netns of its own, 10.30.250.2)  └─ c0 clients (one netns, one address each)

Each rack server is a real ``sidusd`` in proxyDHCP mode on its e0 with TFTP, and
``state.backend: postgresql`` over TCP through the core (so the netem delay/loss is on its way to
the database).  The clients of a rack are the bench's own PXE DHCP client process
(:mod:`bench.dhcpclient`, one per rack, a boot per MAC, the first OFFER taken) and, for TFTP, curl
bound to the client's own address (``--interface``) in the client namespace: pxelinux.0, then its
``pxelinux.cfg/01-<mac>``.  A client whose DHCP gets no answer retransmits (a new DISCOVER every
2 s, at most ``DISCOVERS``); one whose TFTP fails starts over from DHCP (a PXE ROM's retry, at most
``BOOT_TRIES`` boots), and the record says so (``restarts``).

Every process is started through :class:`tests.netns.NetNs` and stopped by its PID; the
namespaces are removed on :meth:`Racks.close` (also on Ctrl-C: the caller's ``finally``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.netns import NetNs
from tests.pg_running import PgCluster, _as_user

from .peers import REPO, BenchSetupError

PG_ADDR, PG_PORT = "10.30.250.2", 5432
DISCOVERS = 8                 # DISCOVERs before a boot counts as failed (2 s each)
BOOT_TRIES = 3                # whole boots (DHCP + TFTP) before a client counts as failed
PROFILE = {"image": "demo", "overlay": "tmpfs", "append": ""}


def rack_net(k: int) -> str:
    return f"10.{40 + k}"


def server_ip(k: int, j: int) -> str:
    return f"{rack_net(k)}.0.{11 + j}"


def client_ip(k: int, i: int) -> str:
    return f"{rack_net(k)}.{1 + i // 250}.{1 + i % 250}"


def mac(k: int, i: int) -> str:
    return f"52:54:19:{k:02x}:{i >> 8:02x}:{i & 255:02x}"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


@dataclass
class Server:
    name: str
    rack: int
    ip: str
    ns: NetNs
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.dir / "sidusd.log"

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def ctl_json(self, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.dir / "control.sock"),
                            "--json", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
        if r.returncode != 0:
            raise BenchSetupError(f"sidusctl {args} on {self.name}: {r.stderr}")
        return json.loads(r.stdout)


@dataclass
class RackClients:
    """One rack's client namespace and its DHCP client process (:mod:`bench.dhcpclient`)."""
    rack: int
    ns: NetNs
    proc: asyncio.subprocess.Process | None = None
    waiters: dict[int, asyncio.Future] = field(default_factory=dict)
    next_id: int = 0
    reader: asyncio.Task | None = None
    discovers: int = DISCOVERS
    tries: int = BOOT_TRIES
    tftp_slots: asyncio.Semaphore | None = None      # at most this many curl processes at once
    tftp_timeout_s: float = 10.0                      # curl's wait for the first answer

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = await asyncio.create_subprocess_exec(
            *self.ns.argv(sys.executable, "-m", "bench.dhcpclient"), cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        hello = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60) or b"{}")
        if "hello" not in hello:
            raise BenchSetupError(f"rack {self.rack} DHCP client did not start: {hello}")
        self.reader = asyncio.create_task(self._read())
        # a storm before this one left the first client's address in place ("up" adds it)
        self.ns.run("ip", "addr", "del", client_ip(self.rack, 0) + "/16", "dev", "c0", check=False)
        ok = await self.call({"op": "up", "iface": "c0", "address": client_ip(self.rack, 0) + "/16"})
        if not ok.get("ok"):
            raise BenchSetupError(f"rack {self.rack} DHCP client link: {ok}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            fut = self.waiters.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(BenchSetupError("the DHCP client process exited"))

    async def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiters[self.next_id] = fut
        self.proc.stdin.write((json.dumps({**cmd, "id": self.next_id}) + "\n").encode())
        return await fut

    async def tftp(self, i: int, server: str, names: list[str]) -> tuple[int, bytes, str]:
        """curl, bound to client ``i``'s address, fetches ``names``; (rc, the last file, stderr)."""
        argv = ["curl", "-sS", "--interface", client_ip(self.rack, i), "--tftp-blksize", "1468",
                "--connect-timeout", str(self.tftp_timeout_s), "--max-time", str(6 * self.tftp_timeout_s)]
        for n, name in enumerate(names):
            argv += ["-o", "/dev/null" if n < len(names) - 1 else "-", f"tftp://{server}/{name}"]
        if self.tftp_slots is not None:
            async with self.tftp_slots:
                return await self._curl(argv)
        return await self._curl(argv)

    async def _curl(self, argv: list[str]) -> tuple[int, bytes, str]:
        p = await asyncio.create_subprocess_exec(*self.ns.argv(*argv), stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        out, err = await p.communicate()
        return p.returncode or 0, out, err.decode(errors="replace")[-300:]

    async def boot(self, i: int, delay: float, expect: bytes | None = None) -> dict[str, Any]:
        """Client ``i``: DHCP (retransmitted), then TFTP; started over on a TFTP failure."""
        await asyncio.sleep(delay)
        m = mac(self.rack, i)
        t0 = time.monotonic()
        rec: dict[str, Any] = {"rack": self.rack, "client": i, "mac": m, "ok": False, "restarts": 0,
                               "errors": [], "start": t0}
        for attempt in range(self.tries):
            rec["restarts"] = attempt
            rec["t_dhcp"] = time.monotonic()
            for _ in range(self.discovers):
                r = await self.call({"op": "boot", "mac": m, "ipxe": False})
                if r.get("ok"):
                    break
                rec["errors"].append(r.get("error"))
            else:
                continue
            rec.setdefault("dhcp_s", time.monotonic() - t0)       # first DISCOVER -> ACK, retries in
            rec.setdefault("exchange_ms", r["offer_ms"] + (r["ack_ms"] or 0.0))   # the client's own clock
            rec["server"] = r["siaddr"]
            rec["t_cfg_start_wall"] = time.time()
            rc, out, err = await self.tftp(i, r["siaddr"], [r["file"], "pxelinux.cfg/01-" + m.replace(":", "-")])
            rec["t_cfg_wall"] = time.time()            # the config was served before this (wall clock)
            if rc == 0 and b"vmlinuz" in out and (expect is None or expect in out):
                rec["ok"] = True
                rec["config"] = out.decode(errors="replace")[-2000:]
                break
            rec["errors"].append(f"tftp from {r['siaddr']}: curl rc {rc} {err.strip()}")
        rec["duration_s"] = time.monotonic() - t0
        rec["end"] = time.monotonic()
        return rec

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()
        self.proc, self.reader, self.waiters = None, None, {}


class Racks:
    """The topology: ``build()``, ``start_postgres()``, ``seed()``, ``start_servers()``, ``close()``."""

    def __init__(self, racks: int, servers_per_rack: int | list[int], clients_per_rack: int,
                 delay_ms: float = 0.0, loss_pct: float = 0.0, work: Path | None = None,
                 prefix: str = "sidus-rk", rollout: bool = False, rollout_ssh: bool = False):
        self.k, self.cpr = racks, clients_per_rack
        self.spr = servers_per_rack if isinstance(servers_per_rack, list) else [servers_per_rack] * racks
        self.delay_ms, self.loss_pct = delay_ms, loss_pct
        self.work = work or Path(tempfile.mkdtemp(prefix="sidus-racks-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.namespaces: list[NetNs] = []
        self.servers: list[Server] = []
        self.clients: list[RackClients] = []
        self.pg: PgCluster | None = None
        self.pg_ns: NetNs | None = None
        self.wire: subprocess.Popen | None = None
        self.link_kind = "veth"
        self.rollout = None                 # bench.racksroll.Rollout: each rack its own disk, served from it
        if rollout:
            from .racksroll import Rollout
            self.rollout = Rollout(self.work, racks, ssh=rollout_ssh)

    def _ns(self, tag: str) -> NetNs:
        ns = NetNs(f"{self.prefix}{tag}")
        ns.__enter__()
        self.namespaces.append(ns)
        return ns

    def _netem_args(self) -> list[str]:
        args = ["netem", "limit", "100000"]
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms / 2}ms"]           # half each way: the RTT is delay_ms
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct}%"]
        return args

    def _has_netem(self, ns: NetNs) -> bool:
        r = ns.run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
        ns.run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return r.returncode == 0

    def _uplinks(self, core: NetNs, racks: list[NetNs]) -> None:
        """core r<k> <-> rack u0: veth + tc netem, or the user-space wire when there is no netem."""
        shaped = bool(self.delay_ms or self.loss_pct)
        self.link_kind = "veth" if not shaped else "veth + tc netem" if self._has_netem(core) else "wire"
        if self.link_kind == "wire":
            pairs = [f"{core.name}:r{k}:{rack.name}:u0" for k, rack in enumerate(racks)]
            self.wire = subprocess.Popen(
                [sys.executable, "-m", "bench.rackwire", "--delay-ms", str(self.delay_ms),
                 "--loss-pct", str(self.loss_pct), *pairs], cwd=REPO, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=open(self.work / "wire.log", "ab"), start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            assert self.wire.stdout is not None
            if self.wire.stdout.readline().strip() != b"ready":
                raise BenchSetupError(f"the wire did not start: {(self.work / 'wire.log').read_text()[-2000:]}")
        for k, rack in enumerate(racks):
            if self.link_kind != "wire":
                core.run("ip", "link", "add", f"r{k}", "type", "veth", "peer", "name", "u0", "netns", rack.name)
            core.run("ip", "addr", "add", f"10.30.{k}.1/24", "dev", f"r{k}")
            core.run("ip", "link", "set", f"r{k}", "up")
            core.run("ip", "route", "add", f"{rack_net(k)}.0.0/16", "via", f"10.30.{k}.2")
            rack.run("ip", "addr", "add", f"10.30.{k}.2/24", "dev", "u0")
            rack.run("ip", "link", "set", "u0", "up")
            rack.run("ip", "route", "add", "default", "via", f"10.30.{k}.1")
            if self.link_kind == "veth + tc netem":
                for ns, dev in ((core, f"r{k}"), (rack, "u0")):
                    ns.run("tc", "qdisc", "add", "dev", dev, "root", *self._netem_args())

    # -- topology ------------------------------------------------------------------
    def build(self) -> None:
        core = self._ns("c")
        core.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.pg_ns = pgns = self._ns("p")
        core.run("ip", "link", "add", "pg0", "type", "veth", "peer", "name", "e0", "netns", pgns.name)
        core.run("ip", "addr", "add", "10.30.250.1/24", "dev", "pg0")
        core.run("ip", "link", "set", "pg0", "up")
        pgns.run("ip", "addr", "add", f"{PG_ADDR}/24", "dev", "e0")
        pgns.run("ip", "link", "set", "e0", "up")
        pgns.run("ip", "route", "add", "default", "via", "10.30.250.1")
        racks = [self._ns(f"r{k}") for k in range(self.k)]
        self._uplinks(core, racks)
        for k, rack in enumerate(racks):
            net = rack_net(k)
            rack.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            rack.run("ip", "link", "add", "br0", "type", "bridge")
            rack.run("ip", "addr", "add", f"{net}.0.1/16", "dev", "br0")
            rack.run("ip", "link", "set", "br0", "up")
            for j in range(self.spr[k]):
                ns = self._ns(f"r{k}s{j}")
                self._port(rack, ns, f"s{j}", server_ip(k, j), f"{net}.0.1")
                d = self.work / f"rack{k}-{j}"
                d.mkdir(parents=True)
                self.servers.append(Server(f"rack{k}-{j}", k, server_ip(k, j), ns, d))
            cns = self._ns(f"r{k}c")
            self._port(rack, cns, "cl", None, f"{net}.0.1", dev="c0")
            batch = "".join(f"address add {client_ip(k, i)}/16 dev c0\n" for i in range(1, self.cpr))
            if batch:
                cns.run("ip", "-batch", "-", input=batch)
            self.clients.append(RackClients(k, cns))

    @staticmethod
    def _port(rack: NetNs, ns: NetNs, port: str, ip: str | None, gw: str, dev: str = "e0") -> None:
        rack.run("ip", "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns.name)
        rack.run("ip", "link", "set", port, "master", "br0", "up")
        if ip:
            ns.run("ip", "addr", "add", f"{ip}/16", "dev", dev)
        ns.run("ip", "link", "set", dev, "up")
        if ip:
            ns.run("ip", "route", "add", "default", "via", gw)

    # -- PostgreSQL ----------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return f"host={PG_ADDR} port={PG_PORT} user=sidus dbname=postgres"

    def start_postgres(self, timeout_s: float = 60) -> None:
        """The private cluster of tests/pg_running.py, listening on its veth address in its netns."""
        if self.pg is None:
            self.pg = PgCluster()
            with open(self.pg.data / "pg_hba.conf", "a") as f:
                f.write("host all all 10.0.0.0/8 trust\n")
        pg, ns = self.pg, self.pg_ns
        assert ns is not None
        log = open(pg.log, "ab")
        pg.proc = ns.popen([*_as_user(), str(pg.bin / "postgres"), "-D", str(pg.data), "-k", str(pg.sock),
                            "-p", str(PG_PORT), "-c", f"listen_addresses={PG_ADDR}", "-c", "fsync=off",
                            "-c", "synchronous_commit=off", "-c", "max_connections=100"],
                           stdout=log, stderr=subprocess.STDOUT, cwd=pg.dir)
        log.close()
        pg.port = PG_PORT                       # the unix socket's name too (.s.PGSQL.5432)
        deadline = time.monotonic() + timeout_s
        while True:
            if pg.proc.poll() is not None:
                raise BenchSetupError(f"postgres exited:\n{pg.log.read_text()[-2000:]}")
            try:
                pg.connect().close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise BenchSetupError(f"postgres not ready:\n{pg.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop_postgres(self) -> None:
        assert self.pg is not None
        self.pg.stop()

    def seed(self, append: str = "sidus.rev=0") -> None:
        """The profile and every client as a host, in PostgreSQL only (no inventory file)."""
        from sidusd.state import pg as spg
        assert self.pg is not None
        with self.pg.connect() as conn:
            spg.migrate(conn)
            spg.put_profile(conn, "default", PROFILE)
            rows = [(mac(k, i), json.dumps({"mac": mac(k, i), "profile": "default", "hostname": f"r{k}n{i}",
                                            "append": append}))
                    for k in range(self.k) for i in range(self.cpr)]
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO sidus_hosts (mac, doc) VALUES (%s, %s) "
                                "ON CONFLICT (mac) DO UPDATE SET doc = EXCLUDED.doc", rows)

    def event_rows(self) -> int:
        assert self.pg is not None
        with self.pg.connect() as conn:
            return int(conn.execute("SELECT count(*) FROM sidus_events").fetchone()[0])

    def pg_stats(self) -> tuple[int, int]:
        """(connections to the database, transactions committed so far)."""
        assert self.pg is not None
        with self.pg.connect() as conn:
            row = conn.execute("SELECT numbackends, xact_commit FROM pg_stat_database "
                               "WHERE datname = 'postgres'").fetchone()
        return int(row[0]), int(row[1])

    # -- rack servers --------------------------------------------------------------
    def tftp_root(self) -> Path:
        root = self.work / "tftp"
        if not root.exists():
            for rel, src in (("pxelinux.0", "/usr/lib/PXELINUX/pxelinux.0"),
                             ("ldlinux.c32", "/usr/lib/syslinux/modules/bios/ldlinux.c32")):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(Path(src).read_bytes())
            for rel in ("images/demo/vmlinuz", "images/demo/initrd.img"):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(f"stand-in {rel}\n".encode())
            (self.work / "images" / "demo").mkdir(parents=True, exist_ok=True)
        return root

    def config(self, s: Server) -> dict[str, Any]:
        cfg = self._config(s)
        if self.rollout is not None:         # the rack's disk: what its pushes made of it, nothing else
            disk = self.rollout.rack_dir(s.rack)
            cfg["tftp"]["root"] = str(disk / "tftp")
            cfg.pop("images")
            cfg["images_file"] = str(disk / "images" / "images.yaml")
        return cfg

    def _config(self, s: Server) -> dict[str, Any]:
        return {
            "state_dir": str(s.dir / "state"),
            "log": {"format": "json", "level": "info"},
            "control": {"socket_path": str(s.dir / "control.sock")},
            "security": {"privsep": False},
            "dhcp": {"mode": "proxy", "interfaces": ["e0"]},
            "tftp": {"root": str(self.tftp_root()), "max_transfers": 1024, "timeout_s": 1.0, "retries": 5},
            "nfs": {"backend": "none", "server_address": s.ip},
            "images": {"demo": {"root": str(self.work / "images" / "demo"), "kernel": "images/demo/vmlinuz",
                                "initrd": "images/demo/initrd.img", "append": "console=ttyS0"}},
            "state": {"backend": "postgresql", "dsn": self.dsn, "server_name": s.name, "poll_s": 60,
                      "connect_timeout_s": 2, "flush_interval_s": 0.5},
        }

    def start_server(self, s: Server, timeout_s: float = 90) -> None:
        (s.dir / "state").mkdir(exist_ok=True)
        (s.dir / "sidus.yaml").write_text(yaml.safe_dump(self.config(s)))
        start = s.log.stat().st_size if s.log.exists() else 0
        log = open(s.log, "ab")
        s.proc = s.ns.popen([sys.executable, "-m", "sidusd", "--config", str(s.dir / "sidus.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if s.proc.poll() is not None:
                raise BenchSetupError(f"sidusd {s.name} exited {s.proc.returncode}:\n{s.log.read_text()[-3000:]}")
            with open(s.log, "rb") as f:
                f.seek(start)
                if b'"daemon.ready"' in f.read():
                    return
            if time.monotonic() > deadline:
                raise BenchSetupError(f"sidusd {s.name} not ready:\n{s.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def start_servers(self) -> None:
        if self.rollout is not None and not self.rollout.rack_dir(0).exists():
            self.rollout.prepare({"pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
                                  "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")})
        if self.rollout is not None and self.rollout.want_ssh and not self.rollout.ssh:
            self.rollout.start_sshd(self.servers, self.pg_ns)
        for s in self.servers:          # one after the other: the first start creates the tables
            self.start_server(s)

    def kill_server(self, s: Server) -> None:
        assert s.proc is not None
        os.killpg(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)

    async def start_clients(self) -> None:
        await asyncio.gather(*(c.start() for c in self.clients))

    # -- the storm -----------------------------------------------------------------
    async def storm(self, spread_s: float = 0.0, expect: bytes | None = None,
                    during: Any = None, racks: list[int] | None = None) -> dict[str, Any]:
        """Every client of every rack (or of ``racks``) boots once, arrivals spread over ``spread_s``.

        ``during``: an optional coroutine run alongside (a kill, an outage), its result returned.
        """
        clients = [c for c in self.clients if racks is None or c.rack in racks]
        n = len(clients) * self.cpr
        t0 = time.monotonic()
        tasks = [asyncio.create_task(c.boot(i, spread_s * (i * len(clients) + x) / n, expect))
                 for x, c in enumerate(clients) for i in range(self.cpr)]
        extra = asyncio.create_task(during) if during is not None else None
        recs = await asyncio.gather(*tasks)
        side = await extra if extra is not None else None
        t_last = max(r["end"] for r in recs) - t0
        dhcp = sorted(r["dhcp_s"] for r in recs if "dhcp_s" in r)
        exch = sorted(r["exchange_ms"] for r in recs if "exchange_ms" in r)
        return {"clients": n, "records": recs, "time_to_last_s": t_last, "during": side,
                "failed": [r for r in recs if not r["ok"]],
                "restarted": sum(1 for r in recs if r["restarts"]),
                "dhcp_p50_ms": pct(dhcp, 50) * 1000, "dhcp_p99_ms": pct(dhcp, 99) * 1000,
                "exchange_p50_ms": pct(exch, 50), "exchange_p99_ms": pct(exch, 99),
                "boot_p99_s": pct([r["duration_s"] for r in recs], 99)}

    async def close_clients(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)

    def run_storm(self, **kw: Any) -> dict[str, Any]:
        """:meth:`storm` in an event loop of its own, with the clients' processes started and stopped."""
        async def go() -> dict[str, Any]:
            try:
                await self.start_clients()
                return await self.storm(**kw)
            finally:
                await self.close_clients()
        return asyncio.run(go())

    def close(self) -> None:
        """Every process by its PID (NetNs.close), the cluster, the namespaces."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                try:
                    os.killpg(s.proc.pid, signal.SIGTERM)
                    s.proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(s.proc.pid, signal.SIGKILL)
        if self.pg is not None:
            self.pg.remove()
        if self.wire is not None and self.wire.poll() is None:
            self.wire.terminate()
            try:
                self.wire.wait(10)
            except subprocess.TimeoutExpired:
                self.wire.kill()
                self.wire.wait(5)
        for ns in reversed(self.namespaces):
            ns.close()
        self.namespaces.clear()
