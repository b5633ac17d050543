"""`sidusctl hosts adopt` on a rack server (``state.backend: postgresql``, issue #19): the machine that
got no answer becomes a row of the shared state in a real PostgreSQL, not a line of a YAML file, and
is answered from then on.  DHCP requests built by scapy in a netns made and removed here
(test_dhcp_netns.Lab)."""

from __future__ import annotations

import pytest
import yaml
from test_dhcp_netns import lab, request  # noqa: F401  (lab: the fixture)
from test_inventory_admin import BIOS, ctl, discover

from sidusd.state import pg as spg
from tests.pg_running import require_postgres, running_postgres

pytestmark = pytest.mark.netns

STRANGER = "52:54:00:00:19:51"


def test_adopt_writes_the_shared_state(lab):  # noqa: F811  (the fixture)
    require_postgres()
    with running_postgres() as pg:
        conn = pg.connect()
        spg.migrate(conn)
        spg.put_profile(conn, "default", {"image": "demo", "overlay": "tmpfs", "append": ""})
        lab.configure("proxy")
        path = lab.tmp / "sidus.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["dhcp"]["unknown_hosts"] = "ignore"
        cfg["state"] = {"backend": "postgresql", "dsn": pg.dsn, "server_name": "rack1"}
        path.write_text(yaml.safe_dump(cfg))
        (lab.tmp / "inventory.yaml").unlink()            # the hosts are in PostgreSQL only
        lab.start()

        assert discover(lab, STRANGER, 0x1900) is None   # unknown, ignored
        r = ctl(lab, "hosts", "adopt", STRANGER, "--hostname", "node19")
        assert r.returncode == 0 and "adopted" in r.stdout, r.stdout + r.stderr
        doc = conn.execute("SELECT doc FROM sidus_hosts WHERE mac = %s", (STRANGER,)).fetchone()
        assert doc is not None and doc[0] == {"mac": STRANGER, "profile": "default", "hostname": "node19"}, doc
        assert not (lab.tmp / "inventory.yaml").exists()
        got = discover(lab, STRANGER, 0x1901, BIOS, wait_s=3.0)
        assert got is not None, lab.log_tail()
        assert got[0].file.rstrip(b"\0") == b"pxelinux.0", got[0].file
        # adopting it again is refused with the YAML path's message, and writes nothing
        before = conn.execute("SELECT revision FROM sidus_revision").fetchone()[0]
        r = ctl(lab, "hosts", "adopt", STRANGER)
        assert r.returncode != 0 and "in the inventory already" in r.stderr, r.stderr
        assert conn.execute("SELECT revision FROM sidus_revision").fetchone()[0] == before
        conn.close()
