"""One real qemu boot (BIOS, proxyDHCP) seen end to end by the three observers of issue 17.

sidusd runs in the lab with ``metrics:`` and ``web:`` on (the monitoring endpoint on the lab
namespace's loopback).  Before the VM starts, the module's fixture starts a real Prometheus
(scraping sidusd every second), ``sidusctl watch`` in a private tmux server and a headless chromium
(selenium) on the web page of the room, all inside the lab namespace or on sidusd's control
socket.  Two recorder threads note, with timestamps, every state the VM's line in the watch pane
and its tile on the page go through; then the VM boots once (~45 s under TCG) and each test
asserts on what its observer saw.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import require_tool
from observers import InNetns, Prometheus, Tmux, chrome, keep_artifact, line_of, poll_until, tile_js

from sidusd.lab.demo import CODE_DIR, HostSpec
from sidusd.lab.vm import mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

BOOT_TIMEOUT_S = 300
METRICS_PORT = 9743
MAC = mac_for(17)
HOST = "e2e-observed"
BOOTING_BG, UP_BG = "rgb(255, 221, 68)", "rgb(85, 204, 85)"      # room.css: .booting #fd4, .up #5c5


@dataclass
class Seen:
    """What one observer saw: ``(unix time, state, detail)`` at each change of the VM's state."""
    changes: list[tuple[float, str, object]] = field(default_factory=list)

    def note(self, state: str, detail: object) -> None:
        if not self.changes or self.changes[-1][1] != state:
            self.changes.append((time.time(), state, detail))

    def states(self) -> list[str]:
        return [s for _, s, _ in self.changes]

    def first(self, state: str) -> tuple[float, str, object]:
        return next(c for c in self.changes if c[1] == state)


@dataclass
class Observed:
    lab: object
    vm: object
    prom: Prometheus
    boot_started: float
    boot_ended: float
    watch: Seen
    page: Seen
    screenshots: dict[str, Path]
    pane_up: str


def recorder(stop: threading.Event, poll, seen: Seen, errors: list) -> threading.Thread:
    """A thread calling ``poll() -> (state, detail) | None`` every 0.3 s, noting changes in ``seen``."""
    def run():
        while not stop.is_set():
            try:
                got = poll()
                if got:
                    seen.note(*got)
            except Exception as exc:      # reported by the fixture, not lost in the thread
                errors.append(exc)
                return
            stop.wait(0.3)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def observed(make_module_lab, demo_image, tmp_path_factory):
    for tool in ("prometheus", "curl", "tmux", "chromium", "chromedriver"):
        require_tool(tool)
    pytest.importorskip("selenium", reason="missing tool: selenium (pip, pyproject test extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = tmp_path_factory.mktemp("observers")
    lab = make_module_lab("proxy", [HostSpec(MAC, HOST, "sidus.demo=poweroff sidus.test=observed")], demo_image,
                          extra_config={"metrics": {"enabled": True, "address": "127.0.0.1", "port": METRICS_PORT},
                                        "web": {"enabled": True}})
    ns_name = lab.topology.lab_ns
    prom = tmux = ns = driver = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        # 1. the observers, before the boot
        prom = Prometheus(ns_name, tmp, f"127.0.0.1:{METRICS_PORT}")
        prom.wait_value('up{job="sidus"}', lambda v: v == 1.0, timeout_s=60)
        tmux = Tmux(["env", f"PYTHONPATH={CODE_DIR}", sys.executable, "-m", "sidusd.ctl",
                     "--socket", str(lab.control_socket), "watch", "--interval", "0.3"])
        tmux.until(lambda p: line_of(p, MAC).split()[3:4] == ["never"], 30, "the host on the watch page, never seen")
        ns = InNetns(ns_name)
        driver = ns.call(lambda: chrome(tmp, require_tool("chromium"), require_tool("chromedriver")))
        ns.call(lambda: driver.get(f"http://127.0.0.1:{METRICS_PORT}/"))
        ns.call(lambda: WebDriverWait(driver, 30, 0.2).until(
            lambda d: d.find_element(By.ID, "live").text == "live", "the event stream open"))
        js = tile_js(MAC)
        watch, page, errors = Seen(), Seen(), []
        screenshots: dict[str, Path] = {}
        last_pane = {"up": ""}

        def poll_watch():
            pane = tmux.pane()
            words = line_of(pane, MAC).split()
            if len(words) < 4:
                return None
            if words[3] == "up":
                last_pane["up"] = pane
            return words[3], line_of(pane, MAC)

        def poll_page():
            tile = ns.call(lambda: driver.execute_script(js))
            if not tile:
                return None
            state = tile["state"]
            if state in ("booting", "up") and state not in screenshots:
                shot = tmp / f"room-{state}.png"
                ns.call(lambda: driver.save_screenshot(str(shot)))
                screenshots[state] = shot
            return state, tile

        threads = [recorder(stop, poll_watch, watch, errors), recorder(stop, poll_page, page, errors)]
        poll_until(lambda: watch.states() == ["never"] and page.states() == ["never"], 20,
                   "both recorders seeing the host as never seen")

        # 2. the one boot
        boot_started = time.time()
        vm = lab.boot_vm(MAC, name="observed")
        tl = lab.timeline(vm)
        assert lab.follow(vm, tl, BOOT_TIMEOUT_S, until="ready"), (
            f"no boot; first missing step: {tl.first_missing()}\n{lab.diagnostics(vm)}")
        boot_ended = time.time()
        # 3. until both views show it up, a recorder failed, or 30 s (each test asserts on its own view)
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline and not (
                watch.states()[-1:] == ["up"] and page.states()[-1:] == ["up"] and "up" in screenshots):
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(10)
        assert not errors, errors
        print(f"\nboot of {MAC}: {boot_ended - boot_started:.1f} s; load average {os.getloadavg()}")
        yield Observed(lab, vm, prom, boot_started, boot_ended, watch, page, screenshots, last_pane["up"])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        if driver is not None:
            with contextlib.suppress(Exception):
                ns.call(driver.quit)
        if ns is not None:
            ns.close()
        if tmux is not None:
            tmux.close()
        if prom is not None:
            prom.close()


def test_prometheus_scraped_the_boot(observed):
    prom = observed.prom
    # before the VM started, the scraped series said: no boot yet
    before = prom.query("sidus_boots_total", at=observed.boot_started - 1)
    assert before and float(before[0]["value"][1]) == 0, before
    prom.wait_value("sidus_boots_total", lambda v: v == 1)
    prom.wait_value('sidus_dhcp_replies_total{kind="offer"}', lambda v: v >= 1)
    # pxelinux.0, ldlinux.c32, the per-MAC config, kernel, initrd
    prom.wait_value('sidus_tftp_transfers_total{result="done"}', lambda v: v >= 5)
    prom.wait_value("sidus_tftp_sent_bytes_total", lambda v: v >= os.path.getsize(observed.lab.image.kernel))
    prom.wait_value("sidus_tftp_transfer_duration_seconds_count", lambda v: v >= 5)
    for stage in ("first_file", "kernel", "initrd", "root", "up"):
        prom.wait_value(f'sidus_boot_stage_seconds_count{{stage="{stage}"}}', lambda v: v == 1)
    # the boot's "up" duration lies within what the test measured (the +Inf bucket has it, the 1 s one not)
    prom.wait_value('sidus_boot_stage_seconds_bucket{stage="up",le="+Inf"}', lambda v: v == 1)
    prom.wait_value('sidus_boot_stage_seconds_bucket{stage="up",le="1.0"}', lambda v: v == 0)
    up_s = float(prom.query('sidus_boot_stage_seconds_sum{stage="up"}')[0]["value"][1])
    assert 1 < up_s <= observed.boot_ended - observed.boot_started + 1, up_s
    prom.wait_value('sidus_up_reports_total{result="accepted"}', lambda v: v == 2)


def test_watch_in_tmux_showed_booting_then_up(observed):
    states = observed.watch.states()
    assert states[0] == "never" and states[-1] == "up" and "booting" in states, observed.watch.changes
    assert states.index("booting") < states.index("up"), observed.watch.changes
    t_booting, _, line = observed.watch.first("booting")
    t_up = observed.watch.first("up")[0]
    assert observed.boot_started < t_booting < t_up, observed.watch.changes
    assert line.split()[1:3] == [HOST, "default"], line
    assert "up (multiuser) after" in observed.pane_up, observed.pane_up


def test_web_page_tile_went_booting_then_up(observed):
    states = observed.page.states()
    assert states[0] == "never" and states[-1] == "up" and "booting" in states, observed.page.changes
    t_booting, _, booting = observed.page.first("booting")
    t_up, _, up = observed.page.first("up")
    assert observed.boot_started < t_booting < t_up, observed.page.changes
    assert booting["bg"] == BOOTING_BG, booting
    assert up["bg"] == UP_BG and "up after" in up["text"], up
    for state, shot in observed.screenshots.items():
        assert shot.stat().st_size > 10_000, shot
        print(f"\nscreenshot ({state}): {keep_artifact(shot, f'e2e_room_{state}.png')}")
