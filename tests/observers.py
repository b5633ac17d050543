"""Observers of a boot, shared by the integration tests (scripted boots) and the e2e suite (a qemu VM):
a real Prometheus server, ``sidusctl watch`` in a private tmux server, and a headless chromium
(selenium + chromedriver) running inside a network namespace.  Each one is started and stopped
by the test (every process by its PID)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from netns import CLONE_NEWNET

ARTIFACTS = Path(os.environ.get("SIDUS_TEST_ARTIFACTS", "/tmp/sidus-test-artifacts"))


def poll_until(fn, timeout: float, what: str):
    """``fn()``'s first true value, polled every 0.2 s; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def keep_artifact(path: Path, name: str) -> Path:
    """Copy ``path`` to the artifacts directory (``$SIDUS_TEST_ARTIFACTS``) as ``name``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return ARTIFACTS / name


# -- Prometheus --------------------------------------------------------------------------

class Prometheus:
    """Debian's ``prometheus`` in namespace ``ns`` (its config and data under ``workdir``),
    scraping ``target`` every second as job ``sidus``; queried with curl in the same namespace."""

    def __init__(self, ns: str, workdir: Path, target: str, port: int = 9090):
        self.ns, self.workdir, self.port = ns, workdir, port
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: sidus\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        (workdir / "prom-data").mkdir(exist_ok=True)
        self.log = workdir / "prometheus.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, "prometheus", f"--config.file={cfg}",
                 f"--storage.tsdb.path={workdir / 'prom-data'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """The instant vector of ``promql`` (now, or at unix time ``at``); [] while Prometheus does not answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query=" + urllib.parse.quote(promql)
        if at is not None:
            url += f"&time={at:.3f}"
        r = subprocess.run(["ip", "netns", "exec", self.ns, "curl", "-sS", url],
                           capture_output=True, text=True, timeout=15)
        if r.returncode != 0:
            return []
        data = json.loads(r.stdout)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_value(self, promql: str, want, timeout_s: float = 30.0) -> list[dict]:
        """The result of ``promql`` once ``want(first value)`` holds; fails with Prometheus' log."""
        deadline = time.monotonic() + timeout_s
        while True:
            res = self.query(promql)
            if res and want(float(res[0]["value"][1])):
                return res
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: {res}\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- sidusctl watch in tmux --------------------------------------------------------------

class Tmux:
    """A private tmux server (its own socket name) running one command; killed at the end."""

    def __init__(self, argv: list[str]):
        self.sock = f"sidus-watch-{uuid.uuid4().hex[:8]}"
        self.run("new-session", "-d", "-s", "w", "-x", "160", "-y", "48", " ".join(argv))

    def run(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def pane(self) -> str:
        return self.run("capture-pane", "-p", "-t", "w")

    def until(self, pred, timeout: float, what: str) -> str:
        """The pane once ``pred(pane)`` holds."""
        last = [""]

        def check():
            last[0] = self.pane()
            return last[0] if pred(last[0]) else None
        try:
            return poll_until(check, timeout, what)
        except AssertionError as exc:
            size = self.run("display", "-p", "-t", "w", "#{window_width}x#{window_height}").strip()
            raise AssertionError(f"{exc}; the pane ({size}):\n{last[0]}") from None

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.sock, "has-session", "-t", "w"],
                              capture_output=True, timeout=10).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True, timeout=10)


def line_of(pane: str, mac: str) -> str:
    """The watch page's line of machine ``mac`` ("" if absent)."""
    return next((line for line in pane.splitlines() if line.startswith(mac)), "")


# -- a headless chromium -----------------------------------------------------------------

class InNetns:
    """A thread inside network namespace ``ns`` that runs the callables given to :meth:`call` (the
    browser and its driver, started from it, live there too: the page is on the namespace's loopback)."""

    def __init__(self, ns: str):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(ns,), daemon=True)
        self.thread.start()

    def _run(self, ns: str) -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        entered = libc.setns(fd, CLONE_NEWNET) == 0
        os.close(fd)
        while True:
            fn, out = self.jobs.get()
            if fn is None:
                return
            try:
                if not entered:
                    raise OSError(ctypes.get_errno(), "setns")
                out.put((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.put((False, exc))

    def call(self, fn):
        out: queue.Queue = queue.Queue()
        self.jobs.put((fn, out))
        ok, value = out.get(timeout=120)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.jobs.put((None, None))
        self.thread.join(10)


def chrome(tmp_path: Path, chromium: str, chromedriver: str):
    """A headless chromium under selenium (call it from :class:`InNetns`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(chromedriver, log_output=str(tmp_path / "driver.log")), options=opts)


def tile_js(mac: str) -> str:
    """A script returning machine ``mac``'s tile (state, text, colour) read at once (the page replaces
    tiles as events come), or null."""
    return ("const t = document.querySelector('.tile[data-mac=\"" + mac + "\"]'); return t && "
            "{state: t.getAttribute('data-state'), text: t.textContent, bg: getComputedStyle(t).backgroundColor};")
