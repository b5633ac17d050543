"""The live views during a scripted boot (scapy DHCP, tftpy, curl up-reports; tests/integration/scripted_boot.py)
against the real sidusd: ``sidusctl watch`` driven in tmux (send-keys, capture-pane), and the web page of the
room in a real headless chromium (selenium + chromedriver), its tile going never -> booting -> up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time

import pytest
import yaml
from conftest import require_root, require_tool
from observers import InNetns, Tmux, chrome, keep_artifact, line_of, poll_until, tile_js
from scripted_boot import CLIENT_IP, METRICS_PORT, REPO, SERVER_IP, boot_lab

pytestmark = pytest.mark.netns

MAC, OTHER = "52:54:00:00:17:21", "52:54:00:00:17:22"
HOSTS = [{"mac": MAC, "hostname": "rack1-node1", "profile": "default"},
         {"mac": OTHER, "hostname": "rack1-node2", "profile": "default"}]


def lab_for(tmp_path, prefix: str, web: bool = False, privsep: bool = True):
    require_root()
    require_tool("ip")
    require_tool("curl")
    pytest.importorskip("scapy", reason="missing tool: scapy (pip, pyproject test extra)")
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    cm = boot_lab(tmp_path, HOSTS, prefix, privsep=privsep)
    lab = cm.__enter__()
    if web:
        cfg = yaml.safe_load((lab.tmp / "sidus.yaml").read_text())
        cfg["web"] = {"enabled": True}
        (lab.tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    return cm, lab


def first_stages(lab) -> None:
    """The boot up to the first file: DHCP and pxelinux.0 (the machine is 'booting at first_file')."""
    lab.dhcp(MAC, 0x7201)
    assert lab.tftp_get("pxelinux.0") == lab.files["pxelinux.0"]


def last_stages(lab) -> None:
    """The rest: the per-MAC config, kernel, initrd, then the up-reports."""
    assert b"images/demo/vmlinuz" in lab.tftp_get("pxelinux.cfg/01-" + MAC.replace(":", "-"))
    assert lab.tftp_get("images/demo/vmlinuz") == lab.files["images/demo/vmlinuz"]
    assert lab.tftp_get("images/demo/initrd.img") == lab.files["images/demo/initrd.img"]
    for stage in ("root", "multiuser"):
        code, body = lab.report(stage, MAC)
        assert code == 200, (code, body)


# -- sidusctl watch in tmux --------------------------------------------------------------

def test_watch_in_tmux_shows_the_boot_and_filters(tmp_path):
    require_tool("tmux")
    cm, lab = lab_for(tmp_path, "sidus-t-watch")
    tmux = None
    try:
        lab.start()
        sock = lab.tmp / "control.sock"
        tmux = Tmux(["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "sidusd.ctl", "--socket", str(sock),
                     "watch", "--interval", "0.3"])
        pane = tmux.until(lambda p: MAC in p and OTHER in p, 20,
                      "both inventory hosts on the watch page")
        assert line_of(pane, MAC).split()[3] == line_of(pane, OTHER).split()[3] == "never", pane

        first_stages(lab)
        pane = tmux.until(lambda p: "first_file" in line_of(p, MAC), 20,
                      "the machine booting at first_file")
        assert line_of(pane, MAC).split()[1:4] == ["rack1-node1", "default", "booting"], pane
        assert "tftp pxelinux.0" in pane, pane                    # the last events

        last_stages(lab)
        pane = tmux.until(lambda p: line_of(p, MAC).split()[3:4] == ["up"], 20,
                      "the machine up")
        assert "up (multiuser) after" in pane, pane
        # the clients reply carries each machine's summary, its stages named after the boot target's files
        summary = [c for c in json.loads(lab.ctl("--json", "clients").stdout) if c["mac"] == MAC][0]["summary"]
        assert summary["state"] == "up" and list(summary["stages"]) == ["first_file", "kernel", "initrd", "root", "up"]

        # the filter: / then the hostname: the other machine goes away, then Esc brings it back
        tmux.run("send-keys", "-t", "w", "/", "rack1-node1", "Enter")
        pane = tmux.until(lambda p: "filter: rack1-node1" in p, 10,
                      "the filter typed")
        pane = tmux.until(lambda p: OTHER not in p, 10,
                      "the other machine hidden")
        assert line_of(pane, MAC) and "1 hidden by the filter" in pane, pane
        tmux.run("send-keys", "-t", "w", "Escape")
        poll_until(lambda: OTHER in tmux.pane() or None, timeout=10, what="the filter cleared")
        tmux.run("send-keys", "-t", "w", "q")
        poll_until(lambda: "w" not in tmux.run("list-sessions", "-F", "#{session_name}").split()
                   if tmux.alive() else True, timeout=10, what="watch quit on q")
    finally:
        if tmux is not None:
            tmux.close()
        cm.__exit__(None, None, None)


def slow_tftp(lab, name: str, seconds: float, stop: threading.Event) -> int:
    """A TFTP client in the machine's namespace that ACKs one 512-byte block every 0.2 s (a transfer
    kept in flight for ``seconds``); returns the bytes received."""
    import socket
    import struct

    from netns import socket_in_netns

    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2.0)
        return s
    sock = socket_in_netns(lab.client.name, make)
    got = 0
    try:
        sock.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00", (SERVER_IP, 69))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            data, peer = sock.recvfrom(2048)
            op, block = struct.unpack("!HH", data[:4])
            assert op == 3, data[:60]
            got = max(got, (block - 1) * 512 + len(data) - 4)
            time.sleep(0.2)
            sock.sendto(struct.pack("!HH", 4, block), peer)
    finally:
        sock.close()
    return got


@pytest.mark.parametrize("privsep", [True, False], ids=["privsep", "one-process"])
def test_watch_shows_a_transfer_in_flight_with_its_speed(tmp_path, privsep):
    """The transfers in flight (with privilege separation: the worker's) reach ``sidusctl status``
    (``transfers``) and the watch page, with the peer's MAC and the speed."""
    require_tool("tmux")
    cm, lab = lab_for(tmp_path, "sidus-t-watchx", privsep=privsep)
    tmux = None
    stop = threading.Event()
    t = threading.Thread(target=slow_tftp, args=(lab, "images/demo/vmlinuz", 15.0, stop), daemon=True)
    try:
        lab.start()
        lab.dhcp(MAC, 0x7301)
        t.start()
        rows = poll_until(lambda: [r for r in json.loads(lab.ctl("--json", "status").stdout)["transfers"]
                                   if r["bytes"] >= 2048], 10, "the transfer in flight in sidusctl status")
        assert rows[0]["service"] == "tftp" and rows[0]["file"] == "images/demo/vmlinuz", rows
        assert rows[0]["size"] == 300_000 and rows[0]["duration_s"] > 0 and rows[0]["peer"].startswith(CLIENT_IP)
        tmux = Tmux(["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "sidusd.ctl", "--socket",
                     str(lab.tmp / "control.sock"), "watch", "--interval", "0.3"])
        pane = tmux.until(lambda p: re.search(r"tftp\s+" + MAC + r"\s+images/demo/vmlinuz\s+[\d.]+ KiB of 293\.0 KiB"
                                              r"\s+[\d.]+ (B|KiB)/s", p), 10, "the transfer and its speed")
        assert "TRANSFERS" in pane
    finally:
        stop.set()
        if t.is_alive():
            t.join(5)              # the client stops before its namespace goes
        if tmux is not None:
            tmux.close()
        cm.__exit__(None, None, None)


# -- the web page in a headless chromium -------------------------------------------------

def test_web_page_tile_goes_booting_then_up(tmp_path):
    require_tool("chromium")
    require_tool("chromedriver")
    pytest.importorskip("selenium", reason="missing tool: selenium (pip, pyproject test extra)")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cm, lab = lab_for(tmp_path, "sidus-t-web", web=True)
    ns = InNetns(lab.server.name)
    driver = None
    try:
        lab.start()
        driver = ns.call(lambda: chrome(tmp_path, require_tool("chromium"), require_tool("chromedriver")))
        url = f"http://127.0.0.1:{METRICS_PORT}/"

        js = tile_js(MAC)

        def wait_tile(pred, what: str) -> dict:
            """The tile (read in one script: the page replaces tiles as events come) once ``pred`` holds."""
            return ns.call(lambda: WebDriverWait(driver, 30, 0.2).until(
                lambda d: (t := d.execute_script(js)) and pred(t) and t, what))

        ns.call(lambda: driver.get(url))
        assert ns.call(lambda: driver.title) == "sidus: the room"
        wait_tile(lambda t: t["state"] == "never", "the inventory host as never seen")
        ns.call(lambda: WebDriverWait(driver, 15, 0.2).until(
            lambda d: d.find_element(By.ID, "live").text == "live", "the event stream open"))
        group = ns.call(lambda: driver.find_element(By.CSS_SELECTOR, ".group h2").text)
        assert group == "profile default"

        first_stages(lab)                                  # pushed over server-sent events, no reload
        t = wait_tile(lambda t: t["state"] == "booting" and "first_file" in t["text"], "the tile booting: first_file")
        assert t["bg"] == "rgb(255, 221, 68)", t           # .booting { background: #fd4 }
        last_stages(lab)
        t = wait_tile(lambda t: t["state"] == "up", "the tile up")
        assert t["bg"] == "rgb(85, 204, 85)" and "up after" in t["text"], t   # .up { background: #5c5 }

        # its timeline on click, and the counters
        ns.call(lambda: WebDriverWait(driver, 10, 0.2, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: d.find_element(By.CSS_SELECTOR, f'.tile[data-mac="{MAC}"]').click() or True, "a click"))
        ns.call(lambda: WebDriverWait(driver, 10, 0.2).until(
            lambda d: "multiuser" in d.find_element(By.ID, "timeline").text, "the timeline shown"))
        timeline = ns.call(lambda: driver.find_element(By.ID, "timeline").text)
        assert "dhcp.offer" in timeline and "images/demo/vmlinuz" in timeline, timeline
        ns.call(lambda: WebDriverWait(driver, 10, 0.2).until(
            lambda d: "http.up.accepted" in d.find_element(By.ID, "counters").text, "the counters"))
        states = ns.call(lambda: driver.find_element(By.ID, "states").text)
        assert "up 1" in states and "never 1" in states, states

        shot = tmp_path / "room.png"
        ns.call(lambda: driver.save_screenshot(str(shot)))
        assert shot.stat().st_size > 10_000
        kept = keep_artifact(shot, "web_room.png")
        print(f"\nscreenshot of the room: {shot} (copied to {kept})")
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                ns.call(driver.quit)
        ns.close()
        cm.__exit__(None, None, None)


def test_the_page_sends_no_secret_and_safe_headers(tmp_path):
    """/, /room.json, /machine, /events from the running daemon: CSP, no append, a bad MAC is a 400."""
    cm, lab = lab_for(tmp_path, "sidus-t-webh", web=True)
    try:
        inv = yaml.safe_load((lab.tmp / "inventory.yaml").read_text())
        inv["hosts"][0]["append"] = "sidus.secret=hunter2"
        (lab.tmp / "inventory.yaml").write_text(yaml.safe_dump(inv))
        lab.start()
        lab.boot(MAC)
        base = f"http://127.0.0.1:{METRICS_PORT}"
        head = lab.server.run("curl", "-fsS", "-D", "-", "-o", "/dev/null", base + "/").stdout.lower()
        assert "content-security-policy: default-src 'none'; script-src 'self'" in head, head
        bodies = [lab.server.run("curl", "-fsS", base + p).stdout for p in ("/", "/room.json", f"/machine?mac={MAC}")]
        bodies.append(lab.server.run("curl", "-sS", "-m", "3", base + "/events", check=False).stdout)
        assert all(MAC in b for b in bodies), bodies
        assert not any("hunter2" in b or '"append"' in b for b in bodies)
        assert "event: room" in bodies[3] and '"state":"up"' in bodies[3]
        bad = lab.server.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", base + "/machine?mac=%3Cx%3E",
                             check=False).stdout
        assert bad == "400"

        # at most MAX_SUBSCRIBERS event streams: the next one gets 503, and a stream that closes frees its place
        from sidusd.web import MAX_SUBSCRIBERS

        def code() -> str:
            return lab.server.run("curl", "-sS", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}", base + "/events",
                                  check=False).stdout
        time.sleep(2.0)                                 # the streams above have gone (freed within 1 s)
        streams = [lab.server.popen(["curl", "-sSN", "-o", "/dev/null", base + "/events"])
                   for _ in range(MAX_SUBSCRIBERS)]
        try:
            time.sleep(1.0)
            assert [p.poll() for p in streams] == [None] * MAX_SUBSCRIBERS     # all eight admitted, open
            assert code() == "503"
        finally:
            for p in streams:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait(5)
        poll_until(lambda: code() == "200", 15, "a stream admitted again")
        streams = [lab.server.popen(["curl", "-sSN", "-o", "/dev/null", base + "/events"]) for _ in range(2)]
        time.sleep(1.0)
        assert lab.stop() == 0                          # the open event streams do not hold the stop
    finally:
        cm.__exit__(None, None, None)
