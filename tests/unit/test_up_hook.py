"""sidusd/data/initramfs/scripts/init-bottom/sidus-up, run for real (sh + busybox wget) against an HTTP
server on loopback: the root up-report is one POST with the stage and BOOTIF's MAC; without
sidus.up= nothing is sent; a dead server or a strange URL never fails the boot."""

from __future__ import annotations

import http.server
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import require_tool

SCRIPT = Path(__file__).resolve().parents[2] / "sidusd/data/initramfs/scripts/init-bottom/sidus-up"


@pytest.fixture
def server():
    got: list[tuple[str, str]] = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(("POST", self.path))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"up after 3.0 s (root)\n")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], got
    srv.shutdown()
    srv.server_close()


def run(cmdline: str) -> subprocess.CompletedProcess:
    require_tool("busybox")
    return subprocess.run(["sh", str(SCRIPT)], env={"SIDUS_CMDLINE": cmdline, "SIDUS_WGET": "busybox wget",
                                                    "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=20)


def test_root_report_is_one_post_with_stage_and_bootif_mac(server):
    port, got = server
    r = run(f"root=/dev/nfs BOOTIF=01-52-54-00-00-17-01 sidus.up=http://127.0.0.1:{port}/up quiet")
    assert r.returncode == 0 and "reported stage root" in r.stdout, r
    assert got == [("POST", "/up?stage=root&mac=52:54:00:00:17:01")]


def test_no_url_no_report_and_failures_never_stop_the_boot(server):
    port, got = server
    assert run("root=/dev/nfs BOOTIF=01-52-54-00-00-17-01").returncode == 0
    r = run("sidus.up=http://127.0.0.1:1/up")                 # nobody listens there
    assert r.returncode == 0 and "not reported" in r.stdout, r
    r = run("sidus.up=http://127.0.0.1/up;reboot")
    assert r.returncode == 0 and "not a plain http URL" in r.stdout, r
    assert got == []
    assert subprocess.run(["sh", str(SCRIPT), "prereqs"], capture_output=True, text=True).stdout.strip() \
        == "sidus-overlay"


def test_images_built_by_sidus_image_get_the_script():
    from sidusd.image.build import initramfs_files
    from sidusd.image.recipe import parse_recipe
    from sidusd.image.stages import plan
    files = initramfs_files()
    assert files["scripts/init-bottom/sidus-up"] == SCRIPT.read_bytes()
    st = plan(parse_recipe("name: k\npackages: [linux-image-amd64]\n"), mirror="http://deb.example/debian",
              initramfs=files)
    placed = {p: m for s in st if s.name == "initramfs" for p, _, m in s.files}
    assert placed["etc/initramfs-tools/scripts/init-bottom/sidus-up"] == 0o755
