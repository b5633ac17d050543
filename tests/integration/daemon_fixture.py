"""Run the real sidusd as a subprocess on loopback, for integration tests.

    with SidusDaemon(tmp_path, hosts=[...]) as d:
        d.tftp_get("pxelinux.cfg/01-52-54-00-00-00-01")
        d.ctl("status")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: what the default boot files need in tftp.root (sidusd/preflight.py: --check refuses without them)
BOOT_FILES = ("pxelinux.0", "ldlinux.c32", "syslinux.efi", "ldlinux.e64")


def populate_tftp_root(root: Path, image: str = "demo") -> None:
    """Stand-ins for the boot files and the image's kernel and initrd (kept if already there)."""
    for rel in (*BOOT_FILES, f"images/{image}/vmlinuz", f"images/{image}/initrd.img"):
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            f.write_bytes(f"stand-in {rel}\n".encode())


def base_config(tmp: Path, tftp_port: int) -> dict:
    root = tmp / "tftp"
    populate_tftp_root(root)
    (tmp / "images" / "demo").mkdir(parents=True, exist_ok=True)
    return {
        "state_dir": str(tmp / "state"),
        "inventory_file": str(tmp / "inventory.yaml"),
        "log": {"format": "json", "level": "info"},
        "control": {"socket_path": str(tmp / "control.sock")},
        "dhcp": {"mode": "off"},
        "tftp": {"address": "127.0.0.1", "port": tftp_port, "root": str(root),
                 "timeout_s": 0.5, "retries": 4},
        "nfs": {"backend": "none", "server_address": "10.13.20.1"},
        "images": {"demo": {"root": str(tmp / "images" / "demo"),
                            "kernel": "images/demo/vmlinuz", "initrd": "images/demo/initrd.img",
                            "append": "console=ttyS0"}},
    }


def base_inventory(hosts: list[dict] | None = None) -> dict:
    return {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}},
            "hosts": hosts or []}


def log_events(path: Path, since: int = 0) -> list[dict]:
    """The events (JSON lines) of a sidusd log from byte offset ``since``; a line that is not
    JSON comes back as ``{"event": "<non-json>", "line": ...}``."""
    out = []
    try:
        with open(path, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "<non-json>", "line": line})
    return out


# A client (python3 -c, run inside a test namespace) asking 127.0.0.1:6969 for file "f" with
# blksize 65464 until it answers; it ends the transfer and prints the first answer in hex.
RRQ_65464 = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(10)\n"
    "for i in range(100):\n"
    "    s.sendto(b'\\x00\\x01f\\x00octet\\x00blksize\\x0065464\\x00',('127.0.0.1',6969))\n"
    "    try:\n"
    "        s.settimeout(0.2); d,a=s.recvfrom(70000); break\n"
    "    except TimeoutError: pass\n"
    "s.sendto(b'\\x00\\x05\\x00\\x00done\\x00',a); sys.stdout.write(d.hex())\n")


class SidusDaemon:
    def __init__(self, tmp: Path, hosts: list[dict] | None = None, config: dict | None = None):
        self.tmp = tmp
        self.tftp_port = free_udp_port()
        self.config = config or base_config(tmp, self.tftp_port)
        self.config_path = tmp / "sidus.yaml"
        self.log_path = tmp / "sidusd.log"
        self.write_config(self.config)
        (tmp / "inventory.yaml").write_text(yaml.safe_dump(base_inventory(hosts)))
        (tmp / "state").mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def write_config(self, cfg: dict | str) -> None:
        text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
        self.config_path.write_text(text)

    @property
    def socket_path(self) -> Path:
        return Path(self.config["control"]["socket_path"])

    def start(self, timeout_s: float = 15) -> None:
        # a restart appends to the same log: only lines written from now on count
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sidusd", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidusd exited {self.proc.returncode}:\n{self.log_tail()}")
            if any(e.get("event") == "daemon.ready" for e in self.events(since=self._log_offset)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"sidusd not ready after {timeout_s}s:\n{self.log_tail()}")

    def events(self, since: int = 0) -> list[dict]:
        """Log events (JSON lines) from byte offset ``since`` of the log file."""
        return log_events(self.log_path, since)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.socket_path), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=30)
        if check and r.returncode != 0:
            raise AssertionError(f"sidusctl {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def ctl_json(self, *args: str):
        return json.loads(self.ctl("--json", *args).stdout)

    def tftp_get(self, name: str, blksize: int = 1468) -> bytes:
        import io
        import logging

        import tftpy  # a real client we did not write
        logging.getLogger("tftpy").setLevel(logging.CRITICAL)
        buf = io.BytesIO()
        client = tftpy.TftpClient("127.0.0.1", self.tftp_port, options={"blksize": blksize})
        client.download(name, buf, timeout=5)
        return buf.getvalue()

    def __enter__(self) -> SidusDaemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if getattr(self, "_log", None):
                self._log.close()
