"""A rack server through a PostgreSQL outage (issue #19 scenarios, docs/scale.md): the real sidusd
(privilege separation, full DHCP, TFTP, in a network namespace; scapy DISCOVERs and tftpy from a
second one) with `state.backend: postgresql` on a real private cluster.

(b) PostgreSQL stopped mid-run: DHCP and the per-MAC config keep being served; the events wait in
    the queue and all reach the database when it is back; past the bound the oldest are dropped,
    and rows + dropped == queued (nothing lost without being counted).
(c) sidusd restarted while PostgreSQL is down: it serves from its local copy (a host that exists
    only in the database), and picks up a change once the database is back.
"""

from __future__ import annotations

import re
import time

import pytest
import yaml
from conftest import require_root, require_tool
from scripted_boot import boot_lab

from sidusd.state import pg as spg
from tests.pg_running import require_postgres, running_postgres

MAC = "52:54:00:00:19:51"
NAME = "pxelinux.cfg/01-" + MAC.replace(":", "-")
BOUND = 30


def _metric(text: str, result: str) -> int:
    m = re.search(r'^sidus_state_events_total\{result="' + result + r'"\} ([0-9.e+]+)$', text, re.M)
    assert m, text[-3000:]
    return int(float(m.group(1)))


def _queued_since(lab, before: int, at_least: int, timeout_s: float = 30) -> int:
    """Events queued since ``before``, once at least ``at_least`` (the worker forwards in batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        n = _metric(lab.metrics(), "queued") - before
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _rows(conn) -> int:
    return conn.execute("SELECT count(*) FROM sidus_events").fetchone()[0]


def _settled(lab, pg, timeout_s: float = 90) -> tuple[int, int, int]:
    """Wait until every queued event is either in the database or counted as dropped."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = lab.metrics()
        queued, dropped = _metric(text, "queued"), _metric(text, "dropped")
        conn = pg.connect()
        rows = _rows(conn)
        conn.close()
        if rows + dropped == queued or time.monotonic() > deadline:
            return queued, dropped, rows
        time.sleep(0.2)


def _configure(lab, dsn: str) -> None:
    cfg = yaml.safe_load((lab.tmp / "sidus.yaml").read_text())
    cfg["state"] = {"backend": "postgresql", "dsn": dsn, "queue_max": BOUND, "batch_max": 10,
                    "flush_interval_s": 0.2, "poll_s": 60, "connect_timeout_s": 2, "server_name": "rack1"}
    (lab.tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    (lab.tmp / "inventory.yaml").unlink()       # the hosts are in PostgreSQL only


def _prereqs():
    require_root()
    require_tool("ip")
    require_tool("curl")
    require_postgres()
    pytest.importorskip("scapy", reason="missing tool: scapy (pip, pyproject test extra)")
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")


def test_b_c_outage_queues_events_and_a_restart_serves_the_local_copy(tmp_path):
    _prereqs()
    with running_postgres() as pg, boot_lab(tmp_path, [], "sidus-t-pgo") as lab:
        conn = pg.connect()
        spg.migrate(conn)
        spg.put_profile(conn, "default", {"image": "demo", "overlay": "tmpfs", "append": ""})
        spg.put_host(conn, {"mac": MAC, "profile": "default", "append": "sidus.from=pg"})
        conn.close()
        _configure(lab, pg.dsn)
        lab.start()
        lab.dhcp(MAC, 0x1901)
        assert b"sidus.from=pg" in lab.tftp_get(NAME)
        queued, dropped, rows = _settled(lab, pg)
        assert rows > 0 and dropped == 0 and rows == queued, (queued, dropped, rows, lab.log_tail())

        # (b) a short outage: served all along, every event arrives afterwards
        pg.stop()
        for i in range(3):
            lab.dhcp(MAC, 0x1910 + i)
        assert b"sidus.from=pg" in lab.tftp_get(NAME)
        during = _queued_since(lab, queued, 3)
        assert 3 <= during < BOUND, during
        pg.start()
        queued2, dropped2, rows2 = _settled(lab, pg)
        assert dropped2 == 0 and rows2 == queued2 == queued + during, (queued2, dropped2, rows2, lab.log_tail())

        # (b) a longer one: past the bound the oldest are dropped, and counted
        pg.stop()
        for i in range(2 * BOUND):
            lab.dhcp(MAC, 0x1920 + i)
        during = _queued_since(lab, queued2, 2 * BOUND)
        assert during >= 2 * BOUND, during
        pg.start()
        queued3, dropped3, rows3 = _settled(lab, pg)
        arrived = rows3 - rows2
        print(f"\noutage past the bound: {during} events queued, {arrived} arrived, {dropped3} dropped")
        assert rows3 + dropped3 == queued3, (queued3, dropped3, rows3)
        assert dropped3 > 0 and arrived >= BOUND, (during, arrived, dropped3)
        assert any(e.get("event") == "state.db_unreachable" for e in lab.events())

        # (c) restarted with PostgreSQL down: the local copy serves the host that is only in PostgreSQL
        assert lab.stop() == 0
        pg.stop()
        lab.start()
        assert any(e.get("event") == "state.local_copy_used" for e in lab.events())
        lab.dhcp(MAC, 0x1990)
        assert b"sidus.from=pg" in lab.tftp_get(NAME)
        pg.start()
        conn = pg.connect()
        spg.put_host(conn, {"mac": MAC, "profile": "default", "append": "sidus.from=pg2"})
        conn.close()
        deadline = time.monotonic() + 60          # the watcher reconnects (backoff up to 5 s)
        while b"sidus.from=pg2" not in lab.tftp_get(NAME):
            assert time.monotonic() < deadline, lab.log_tail()
            time.sleep(0.3)
        assert lab.stop() == 0
