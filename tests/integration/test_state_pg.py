"""Rack servers on one real PostgreSQL (issue #19, docs/scale.md): two real sidusd processes
(loopback TFTP, `state.backend: postgresql`) get every `hosts` change written to the database
through LISTEN/NOTIFY, and serve it; the delay of each change is measured (p50/p99 printed).
A single-server YAML install starts and serves with psycopg made unimportable."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest
import yaml

from sidusd.state import pg as spg
from tests.integration.daemon_fixture import REPO, SidusDaemon, base_config, free_udp_port
from tests.pg_running import require_postgres, running_postgres

MAC = "52:54:00:00:19:01"
NAME = "pxelinux.cfg/01-" + MAC.replace(":", "-")
PROFILES = {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}
CHANGES = 50
SITE_HOSTS = 1000


def pg_daemon(tmp, dsn: str, name: str, **state) -> SidusDaemon:
    d_tmp = tmp / name
    d_tmp.mkdir()
    port = free_udp_port()
    cfg = base_config(d_tmp, port)
    cfg["security"] = {"privsep": False}
    # poll_s 60: a change that arrives sooner came by NOTIFY, not by the safety-net poll
    cfg["state"] = {"backend": "postgresql", "dsn": dsn, "poll_s": 60, "server_name": name, **state}
    d = SidusDaemon(d_tmp, config=cfg)
    d.tftp_port = port
    (d_tmp / "inventory.yaml").unlink()           # no inventory file: the state is in PostgreSQL
    return d


def seed(conn, extra_hosts: int = 0) -> None:
    spg.migrate(conn)
    spg.put_profile(conn, "default", PROFILES["default"])
    spg.put_host(conn, {"mac": MAC, "profile": "default", "append": "sidus.rev=0"})
    docs = [{"mac": f"52:54:01:00:{i >> 8:02x}:{i & 255:02x}", "profile": "default", "hostname": f"n{i}"}
            for i in range(extra_hosts)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO sidus_hosts (mac, doc) VALUES (%s, %s)", [(d["mac"], json.dumps(d)) for d in docs])


def revision(conn) -> int:
    return conn.execute("SELECT revision FROM sidus_revision").fetchone()[0]


def _pg_stats(conn) -> tuple[int, int]:
    """(connections to the database, transactions committed so far)."""
    return conn.execute("SELECT numbackends, xact_commit FROM pg_stat_database WHERE datname = 'postgres'").fetchone()


def applied(d: SidusDaemon) -> dict[int, float]:
    return {e["revision"]: e["t"] for e in d.events() if e.get("event") == "state.applied" and e.get("ok")}


def test_a_hosts_change_reaches_both_rack_servers_by_notify(tmp_path):
    require_postgres()
    with running_postgres() as pg:
        conn = pg.connect()
        seed(conn, extra_hosts=SITE_HOSTS - 1)       # a site's inventory: each change reloads all of it
        a, b = pg_daemon(tmp_path, pg.dsn, "rack1"), pg_daemon(tmp_path, pg.dsn, "rack2")
        with a, b:
            assert b"sidus.rev=0" in a.tftp_get(NAME) and b"sidus.rev=0" in b.tftp_get(NAME)
            stats0, t0 = _pg_stats(conn), time.monotonic()
            writes: list[tuple[int, float]] = []
            for i in range(1, CHANGES + 1):
                t = time.time()
                spg.put_host(conn, {"mac": MAC, "profile": "default", "append": f"sidus.rev={i}"})
                writes.append((revision(conn), t))
                time.sleep(0.05)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = [applied(a), applied(b)]
                if all(max(g, default=0) >= writes[-1][0] for g in got):
                    break
                time.sleep(0.1)
            stats1, t1 = _pg_stats(conn), time.monotonic()
            delays = []
            for d, seen in zip((a, b), got, strict=True):
                assert max(seen, default=0) >= writes[-1][0], f"{d.tmp.name} missed changes:\n{d.log_tail()}"
                for rev, t in writes:   # the first swap at or after this write's revision served it
                    delays.append(min(at for r, at in seen.items() if r >= rev) - t)
            delays.sort()
            p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
            print(f"\nstate change ({SITE_HOSTS} hosts) -> both rack servers: {len(delays)} deliveries, "
                  f"p50 {statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                  f"max {delays[-1] * 1000:.0f} ms; PostgreSQL: {(stats1[1] - stats0[1]) / (t1 - t0):.0f} "
                  f"transactions/s, {stats1[0]} connections (2 per rack server + this test's)")
            assert stats1[0] <= 2 * 2 + 1           # watcher + flusher per server, not one per change
            # not a timing claim on a loaded machine: far below poll_s (60 s), so NOTIFY carried them
            assert p99 < 10.0, delays
            st = a.ctl_json("status")["backend_status"]["state"]
            assert st["connected"] and st["source"] == "postgresql" and st["revision"] >= writes[-1][0], st
            final = f"sidus.rev={CHANGES}".encode()
            assert final in a.tftp_get(NAME) and final in b.tftp_get(NAME)
            for d in (a, b):
                copy = json.loads((d.tmp / "state" / "state-snapshot.json").read_text())
                assert copy["hosts"][0]["append"] == f"sidus.rev={CHANGES}"
        conn.close()


def test_a_refused_snapshot_keeps_the_old_one_serving(tmp_path):
    require_postgres()
    with running_postgres() as pg:
        conn = pg.connect()
        seed(conn)
        with pg_daemon(tmp_path, pg.dsn, "rack1") as d:
            check = [sys.executable, "-m", "sidusd", "--config", str(d.config_path), "--check"]
            r = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
            assert r.returncode == 0 and "1 host(s)" in r.stdout, r.stdout + r.stderr
            spg.put_host(conn, {"mac": "52:54:00:00:19:02", "profile": "nosuch"})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    e.get("event") == "state.snapshot_refused" for e in d.events()):
                time.sleep(0.1)
            refused = [e for e in d.events() if e.get("event") == "state.snapshot_refused"]
            assert refused and "hosts[1].profile" in refused[0]["error"], d.log_tail()
            assert b"sidus.rev=0" in d.tftp_get(NAME)
            r = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
            assert r.returncode == 2 and "hosts[1].profile" in r.stderr, r.stdout + r.stderr
        conn.close()


def _blocked_run(config_path, *args) -> list[str]:
    """sidusd with ``import psycopg`` failing (as on a machine without it)."""
    code = ("import sys; sys.modules['psycopg'] = None; from sidusd.__main__ import main; "
            f"sys.exit(main(['--config', {str(config_path)!r}, *{list(args)!r}]))")
    return [sys.executable, "-c", code]


def test_d_single_server_yaml_needs_no_psycopg(tmp_path):
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["security"] = {"privsep": False}
    d = SidusDaemon(tmp_path, hosts=[{"mac": MAC, "profile": "default", "append": "sidus.yaml=1"}], config=cfg)
    d.tftp_port = port
    r = subprocess.run(_blocked_run(d.config_path, "--check"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    log = open(d.log_path, "ab")
    proc = subprocess.Popen(_blocked_run(d.config_path), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "daemon.ready" for e in d.events()):
            assert proc.poll() is None, d.log_tail()
            assert time.monotonic() < deadline, d.log_tail()
            time.sleep(0.05)
        assert b"sidus.yaml=1" in d.tftp_get(NAME)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, d.log_tail()
        log.close()


def test_postgresql_backend_without_psycopg_names_the_package(tmp_path):
    port = free_udp_port()
    cfg = base_config(tmp_path, port)
    cfg["state"] = {"backend": "postgresql", "dsn": "host=/nonexistent"}
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(_blocked_run(tmp_path / "sidus.yaml"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "psycopg" in r.stderr and "sidusd[postgresql]" in r.stderr, r.stderr


@pytest.mark.parametrize("state", [{"backend": "postgresql"}, {"backend": "mysql", "dsn": "x"}])
def test_bad_state_section_is_refused_with_its_key(tmp_path, state):
    cfg = base_config(tmp_path, free_udp_port())
    cfg["state"] = state
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "sidusd", "--config", str(tmp_path / "sidus.yaml"), "--check"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and ("state.backend" in r.stderr or "state.dsn" in r.stderr), r.stderr


def test_start_with_postgresql_down_and_no_local_copy_is_refused(tmp_path):
    require_postgres()
    d = pg_daemon(tmp_path, f"host={tmp_path}/nosuch port=5 user=sidus dbname=postgres connect_timeout=1", "rack1")
    r = subprocess.run([sys.executable, "-m", "sidusd", "--config", str(d.config_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "PostgreSQL cannot be reached" in r.stderr and "no local copy" in r.stderr, r.stderr
