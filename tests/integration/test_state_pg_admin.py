"""An admin's `sidusctl hosts ...` on one rack server applies to every rack server (issue #19,
docs/scale.md "Control plane"): with `state.backend: postgresql` the hosts commands write the
shared state in PostgreSQL (one transaction, the inventory file's checks and messages), and the
NOTIFY brings the change to the other server.  Two real sidusd processes on one real PostgreSQL;
the boot config of the MAC fetched from both over TFTP by real clients (tftpy, curl)."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import require_tool
from tests.integration.daemon_fixture import REPO, SidusDaemon
from tests.integration.test_state_pg import MAC, NAME, pg_daemon, seed
from tests.pg_running import require_postgres, running_postgres

NEW = "52:54:00:00:19:a1"


def curl_tftp(d: SidusDaemon, name: str) -> bytes:
    r = subprocess.run(["curl", "-sS", "--max-time", "20", f"tftp://127.0.0.1:{d.tftp_port}/{name}"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def served_by(d: SidusDaemon, name: str, want: bytes, timeout_s: float = 30.0) -> bytes:
    """The config ``d`` serves for ``name`` once it has ``want`` (the NOTIFY is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = d.tftp_get(name)
        if want in got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def rows(conn) -> tuple[int, list]:
    """(revision, every host row): what a refused write must leave as it was."""
    rev = conn.execute("SELECT revision FROM sidus_revision").fetchone()[0]
    return rev, conn.execute("SELECT mac, doc FROM sidus_hosts ORDER BY mac").fetchall()


def per_mac(mac: str) -> str:
    return "pxelinux.cfg/01-" + mac.replace(":", "-")


def test_hosts_set_and_add_on_one_rack_server_are_served_by_both(tmp_path):
    require_postgres()
    require_tool("curl")
    with running_postgres() as pg:
        conn = pg.connect()
        seed(conn)
        a, b = pg_daemon(tmp_path, pg.dsn, "rack1"), pg_daemon(tmp_path, pg.dsn, "rack2")
        with a, b:
            assert b"sidus.rev=0" in a.tftp_get(NAME) and b"sidus.rev=0" in curl_tftp(b, NAME)
            out = a.ctl_json("hosts", "set", MAC, "--append", "sidus.admin=1", "--hostname", "node1")
            assert out["changed"] == ["append", "hostname"] and out["previous"]["append"] == "sidus.rev=0", out
            # the server that took the command serves it as soon as the command returns
            assert b"sidus.admin=1" in a.tftp_get(NAME), a.log_tail()
            # the other one by NOTIFY, fetched with curl
            assert b"sidus.admin=1" in served_by(b, NAME, b"sidus.admin=1"), b.log_tail()
            assert b"sidus.admin=1" in curl_tftp(b, NAME)
            doc = conn.execute("SELECT doc FROM sidus_hosts WHERE mac = %s", (MAC,)).fetchone()[0]
            assert doc == {"mac": MAC, "profile": "default", "hostname": "node1", "append": "sidus.admin=1"}, doc

            # hosts add through the other server, then hosts list on the first
            b.ctl("hosts", "add", NEW, "--profile", "default", "--append", "sidus.new=1")
            assert b"sidus.new=1" in served_by(a, per_mac(NEW), b"sidus.new=1"), a.log_tail()
            assert b"sidus.new=1" in curl_tftp(b, per_mac(NEW))
            assert {h["mac"] for h in a.ctl_json("hosts", "list")} == {MAC, NEW}
            # and removed again through the first: gone from the other one too
            a.ctl("hosts", "remove", NEW)
            deadline = time.monotonic() + 30
            while NEW in {h["mac"] for h in b.ctl_json("hosts", "list")} and time.monotonic() < deadline:
                time.sleep(0.1)
            assert {h["mac"] for h in b.ctl_json("hosts", "list")} == {MAC}, b.log_tail()

            # the YAML inventory was never written: there is none on either server
            for d in (a, b):
                assert not (d.tmp / "inventory.yaml").exists()
                writes = [e for e in d.events() if e.get("event") == "state.hosts_written"]
                assert len(writes) == (2 if d is a else 1), d.log_tail()
        conn.close()


def test_a_refused_hosts_write_changes_nothing_in_the_database(tmp_path):
    require_postgres()
    with running_postgres() as pg:
        conn = pg.connect()
        seed(conn)
        with pg_daemon(tmp_path, pg.dsn, "rack1") as a, pg_daemon(tmp_path, pg.dsn, "rack2") as b:
            a.ctl("hosts", "set", MAC, "--hostname", "oldname")
            served_by(b, NAME, b"sidus.rev=0")
            before = rows(conn)
            # the daemon refuses the batch as a whole, naming the file and line of the bad entry
            csv = tmp_path / "clash.csv"
            csv.write_text("mac,hostname,profile\n52:54:00:77:00:01,fresh,default\n"
                           "52:54:00:77:00:02,OLDNAME,default\n")
            r = b.ctl("hosts", "import", str(csv), check=False)
            assert r.returncode == 1, r
            assert "duplicate host name 'OLDNAME'" in r.stderr and f"(imported from {csv}:3)" in r.stderr, r.stderr
            assert "nothing imported" in r.stderr
            assert rows(conn) == before
            # an import naming a MAC already in the shared state: refused with its file and line
            csv2 = tmp_path / "taken.csv"
            csv2.write_text(f"mac,hostname,profile\n52:54:00:77:00:03,n3,default\n{MAC},again,default\n")
            r = a.ctl("hosts", "import", str(csv2), check=False)
            assert r.returncode == 2 and f"taken.csv:3: MAC {MAC} is already in the inventory" in r.stderr, r.stderr
            # a profile the shared state does not have: the inventory's own message
            r = a.ctl("hosts", "set", MAC, "--profile", "nosuch", check=False)
            assert r.returncode == 1 and "nosuch" in r.stderr, r.stderr
            r = a.ctl("hosts", "set", "52:54:00:77:00:09", "--append", "x=1", check=False)
            assert r.returncode == 1 and "no host 52:54:00:77:00:09 in the inventory" in r.stderr, r.stderr
            assert rows(conn) == before

            # the good batch: one transaction, every host on both servers
            good = tmp_path / "good.csv"
            good.write_text("mac,hostname,profile\n52:54:00:77:00:01,fresh,default\n"
                            "52:54:00:77:00:02,other,default\n")
            r = b.ctl("hosts", "import", str(good))
            assert "imported 2 host(s): 2 added" in r.stdout, r.stdout
            rev, after = rows(conn)
            assert [m for m, _ in after] == [MAC, "52:54:00:77:00:01", "52:54:00:77:00:02"]
            assert rev <= before[0] + 2       # one transaction: a delete and an insert statement
            deadline = time.monotonic() + 30
            while len(a.ctl_json("hosts", "list")) != 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert {h["hostname"] for h in a.ctl_json("hosts", "list")} == {"oldname", "fresh", "other"}

            # PostgreSQL down: the write is refused with the reason, the servers keep serving
            pg.stop()
            r = a.ctl("hosts", "set", MAC, "--append", "sidus.down=1", check=False)
            assert r.returncode == 1 and "PostgreSQL" in r.stderr and "nothing changed" in r.stderr, r.stderr
            assert b"sidus.rev=0" in a.tftp_get(NAME)
            assert a.ctl_json("hosts", "show", MAC)["host"]["append"] == "sidus.rev=0"
            pg.start()
            conn = pg.connect()
            assert rows(conn)[1] == after
        conn.close()


def test_two_rack_servers_writing_at_once_are_checked_one_after_the_other(tmp_path):
    """Two `hosts add` with the same host name, one per server, both waiting for the same moment:
    the second is checked against the first's commit and refused (without the revision row lock
    both checks would pass and the shared state would hold a snapshot every server refuses)."""
    require_postgres()
    with running_postgres() as pg:
        conn, probe = pg.connect(), pg.connect()
        seed(conn)
        with pg_daemon(tmp_path, pg.dsn, "rack1") as a, pg_daemon(tmp_path, pg.dsn, "rack2") as b:
            procs = []
            with conn.transaction():               # the test holds the writers' lock
                conn.execute("SELECT revision FROM sidus_revision FOR UPDATE")
                for d, mac in ((a, "52:54:00:00:19:c1"), (b, "52:54:00:00:19:c2")):
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "sidusd.ctl", "--socket", str(d.socket_path), "hosts", "add", mac,
                         "--profile", "default", "--hostname", "twin"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] < 2:
                    time.sleep(0.05)
            results = [(p.wait(60), *p.communicate()) for p in procs]
            assert sorted(r[0] for r in results) == [0, 1], results
            refused = next(r for r in results if r[0] == 1)
            assert "duplicate host name 'twin'" in refused[2], refused
            names = [doc.get("hostname") for _, doc in rows(probe)[1]]
            assert names.count("twin") == 1, names
            for d in (a, b):          # both serve the one that was written, neither refused a snapshot
                assert not [e for e in d.events() if e.get("event") == "state.snapshot_refused"], d.log_tail()
        probe.close()
        conn.close()
