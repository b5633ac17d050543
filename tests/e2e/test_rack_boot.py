"""One real boot through a rack server (issue #19, docs/scale.md): qemu + iPXE (BIOS) -> sidusd in
proxy mode with ``state.backend: postgresql`` -> pxelinux -> NFS root, the machine's per-host
kernel argument taken from a row of a real PostgreSQL (tests/pg_running.py), changed there by
``sidusctl hosts set`` before the boot.  The lab's YAML inventory names the same MAC with another
argument: the marker on the console says which of the two the rack server served.
The rest of the rack scenarios run with simulated clients (tests/integration/test_racks.py)."""

from __future__ import annotations

import pytest
from conftest import poll_until

from sidusd.lab.demo import HostSpec, boot_markers
from sidusd.lab.vm import mac_for
from sidusd.state import pg as spg
from tests.pg_running import require_postgres, running_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

BOOT_TIMEOUT_S = 300         # ~45 s under TCG on an idle machine; CI machines are shared
DEFAULT_PROFILE = {"image": "demo", "overlay": "tmpfs", "append": ""}


def test_bios_boot_through_a_rack_server_with_hosts_from_postgresql(make_lab, demo_image):
    require_postgres()
    mac = mac_for(0)
    with running_postgres() as pg:
        conn = pg.connect()
        spg.migrate(conn)
        spg.put_profile(conn, "default", DEFAULT_PROFILE)
        spg.put_host(conn, {"mac": mac, "profile": "default", "hostname": "rack-vm",
                            "append": "sidus.demo=poweroff sidus.test=pgrow"})
        state = {"backend": "postgresql", "dsn": pg.dsn, "server_name": "rack1", "poll_s": 60}
        # the YAML inventory says otherwise: served only if the state backend were ignored
        lab = make_lab("proxy", [HostSpec(mac, "yaml-vm", "sidus.demo=poweroff sidus.test=yaml")],
                       demo_image, extra_config={"state": state})
        st = lab.sidusctl("status")["backend_status"]["state"]
        assert st["source"] == "postgresql" and st["connected"], st
        # the admin's change goes to the database row (and would reach every rack server)
        lab.sidusctl("hosts", "set", mac, "--append", "sidus.demo=poweroff sidus.test=pgadmin")
        doc = conn.execute("SELECT doc FROM sidus_hosts WHERE mac = %s", (mac,)).fetchone()[0]
        assert doc["append"] == "sidus.demo=poweroff sidus.test=pgadmin" and doc["hostname"] == "rack-vm", doc

        vm = lab.boot_vm(mac, name="rack1")
        tl = lab.timeline(vm)
        ok = lab.follow(vm, tl, BOOT_TIMEOUT_S, until="ready")
        assert ok, f"did not reach ready; first missing step: {tl.first_missing()}\n{lab.diagnostics(vm)}"
        assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)
        cmdline = " ".join(m.split(":", 1)[1] for m in boot_markers(vm.console_text()) if m.startswith("cmdline:"))
        assert "sidus.test=pgadmin" in cmdline, lab.diagnostics(vm)
        assert "sidus.test=yaml" not in cmdline and "sidus.test=pgrow" not in cmdline, cmdline
        # the rack server queued the boot's events and wrote them to the shared state
        def written() -> set[str]:
            return {r[0] for r in conn.execute("SELECT kind FROM sidus_events WHERE server = 'rack1' AND mac = %s",
                                               (mac,))}
        assert poll_until(lambda: "dhcp.offer" in written(), 30), (written(), lab.diagnostics(vm))
        conn.close()
