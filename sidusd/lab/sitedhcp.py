"""The site's DHCP server of the boot lab: dnsmasq, addresses only.

It plays the IT department's DHCP server that sidus must live beside: it hands
out addresses from 10.13.20.100-199 and says nothing about booting (no option
66/67, no PXE vendor options).  sidusd's proxyDHCP (PXE spec 2.1, section 2.2.5:
"proxyDHCP") adds the boot part on its own.  dnsmasq runs in the site network
namespace, in the foreground, DHCP only (``--port=0`` turns its DNS off), with
no configuration file but the argv built here.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidusd.errors import StartupError

from .proc import terminate
from .topology import SITE_IF, Topology

RANGE = ("10.13.20.100", "10.13.20.199", "255.255.255.0", "1h")
STOP_TIMEOUT_S = 5.0


@dataclass
class SiteDhcp:
    """dnsmasq as the site DHCP server.  ``start()``, ``leases()``, ``stop()`` (by PID)."""

    topology: Topology
    workdir: Path
    interface: str = SITE_IF
    #: siaddr ("next-server") of every reply, with no boot file: what a site must set for Debian's
    #: signed GRUB in proxy mode (docs/quirks.md, "GRUB takes its TFTP server from the DHCP ACK")
    next_server: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def lease_file(self) -> Path:
        """dnsmasq's lease file (one ``expiry mac ip hostname clientid`` line per lease)."""
        return self.workdir / "site.leases"

    @property
    def log_file(self) -> Path:
        """dnsmasq's log (``--log-dhcp``: every DISCOVER/OFFER/REQUEST/ACK)."""
        return self.workdir / "site-dhcp.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "site-dhcp.pid"

    def argv(self) -> list[str]:
        """The dnsmasq command line (DHCP only, no boot options)."""
        return [
            "dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null",
            f"--interface={self.interface}", "--bind-interfaces",
            "--dhcp-range=" + ",".join(RANGE),
            f"--dhcp-leasefile={self.lease_file}", "--log-dhcp",
            f"--log-facility={self.log_file}", f"--pid-file={self.pid_file}",
            "--user=root", "--group=root",
            # dhcp-boot with an empty file name: siaddr only, option 67 / the file field stay empty
            *([f"--dhcp-boot=,,{self.next_server}"] if self.next_server else []),
        ]

    def start(self, timeout_s: float = 10.0) -> None:
        """Start dnsmasq in the site namespace; raise StartupError if it dies at once."""
        if self.proc is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lease_file.touch()
        stderr = open(self.workdir / "site-dhcp.stderr", "wb")
        try:
            self.proc = subprocess.Popen(self.topology.site_argv(self.argv()),
                                         stdin=subprocess.DEVNULL, stdout=stderr,
                                         stderr=stderr, start_new_session=True)
        finally:
            stderr.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.workdir / "site-dhcp.stderr").read_text(errors="replace")
                self.proc = None
                raise StartupError(f"site dnsmasq exited at start: {err.strip()[-500:]}")
            if self.log_file.exists() and "DHCP, IP range" in self.log_file.read_text(errors="replace"):
                return
            time.sleep(0.1)
        self.stop()
        raise StartupError(f"site dnsmasq did not start within {timeout_s:g} s")

    def leases(self) -> dict[str, str]:
        """Current leases as ``{mac: ip}`` (MACs lower-case)."""
        try:
            lines = self.lease_file.read_text().splitlines()
        except FileNotFoundError:
            return {}
        out = {}
        for line in lines:
            parts = line.split()
            if len(parts) >= 3:
                out[parts[1].lower()] = parts[2]
        return out

    def log_tail(self, n: int = 30) -> list[str]:
        """The last ``n`` lines of dnsmasq's log."""
        try:
            return self.log_file.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        """SIGTERM the dnsmasq we started (by PID), SIGKILL if it lingers.  Idempotent."""
        proc, self.proc = self.proc, None
        terminate(proc, STOP_TIMEOUT_S)
