"""A qemu VM that PXE-boots inside the lab namespace.

The PXE firmware is the real iPXE ROM shipped by ``ipxe-qemu`` (loaded by
qemu for ``virtio-net-pci``); the accelerator is TCG, because nested KVM hangs
iPXE on these machines (docs: /work/shared/design/BOOT-LAB.md).  The serial
console (ttyS0) goes to a log file that :meth:`Vm.wait_for` follows; in the
interactive ``keep`` mode it is on the user's terminal as well, and leaving
qemu (Ctrl-A X) ends the VM.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidusd.errors import StartupError

from .proc import terminate
from .timeline import next_boot_ready
from .topology import Topology

STOP_TIMEOUT_S = 5.0
POLL_S = 0.2
# UEFI guests (uefi=True): OVMF (Debian ovmf) + iPXE's EFI driver ROM for virtio-net
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
EFI_NIC_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")


def mac_for(index: int) -> str:
    """A locally administered MAC for lab VM ``index`` (52:54:00 is qemu's prefix)."""
    return f"52:54:00:13:20:{index + 1:02x}"


@dataclass
class Vm:
    """One PXE-booting qemu guest on a tap of the lab bridge.

    ``reboot``: let the guest reboot (no ``-no-reboot``).  ``interactive``: the
    console is on this terminal (``stdio`` chardev, still logged to the file).
    ``uefi``: OVMF firmware (read-only code + this VM's own copy of the
    variable store, as two pflash drives) and iPXE's EFI ROM on the NIC: the
    firmware's UEFI PXE asks with option 93 = 7 (x64 UEFI).
    """

    topology: Topology
    tap: str
    mac: str
    workdir: Path
    name: str = "vm"
    memory_mib: int = 512
    reboot: bool = False
    interactive: bool = False
    uefi: bool = False
    proc: subprocess.Popen | None = field(default=None, init=False)
    started_at: float | None = field(default=None, init=False)

    @property
    def console_log(self) -> Path:
        """The file that receives everything the guest prints on ttyS0."""
        return self.workdir / f"{self.name}-console.log"

    @property
    def ovmf_vars(self) -> Path:
        """This VM's copy of the UEFI variable store (OVMF writes its boot entries there)."""
        return self.workdir / f"{self.name}-OVMF_VARS.fd"

    def argv(self) -> list[str]:
        """The qemu command line."""
        argv = ["qemu-system-x86_64", "-name", self.name, "-accel", "tcg",
                "-m", str(self.memory_mib), "-nographic", "-display", "none",
                "-boot", "n",
                "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no"]
        if self.uefi:
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}",
                     "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},romfile={EFI_NIC_ROM}"]
        else:
            argv += ["-device", f"virtio-net-pci,netdev=n0,mac={self.mac}"]
        if self.interactive:
            # console + qemu monitor multiplexed on the terminal (Ctrl-A X quits,
            # Ctrl-A C switches to the monitor), also logged to console_log;
            # signal=off: Ctrl-C goes to the guest, not to qemu.
            argv += ["-chardev", f"stdio,id=con0,mux=on,signal=off,logfile={self.console_log}",
                     "-serial", "chardev:con0", "-mon", "chardev=con0,mode=readline"]
        else:
            argv += ["-monitor", "none", "-serial", f"file:{self.console_log}"]
        if not self.reboot:
            argv.append("-no-reboot")
        return argv

    def start(self) -> None:
        """Start qemu in the lab namespace (returns at once; the boot goes on)."""
        if self.proc is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        if self.uefi:
            shutil.copyfile(OVMF_VARS, self.ovmf_vars)   # a fresh store per VM and per start
        errlog = open(self.workdir / f"{self.name}-qemu.stderr", "wb")
        try:
            if self.interactive:
                self.proc = subprocess.Popen(self.topology.lab_argv(self.argv()))
            else:
                self.proc = subprocess.Popen(self.topology.lab_argv(self.argv()),
                                             stdin=subprocess.DEVNULL, stdout=errlog,
                                             stderr=errlog, start_new_session=True)
        except OSError as exc:
            raise StartupError(f"cannot start qemu: {exc}") from exc
        finally:
            errlog.close()
        self.started_at = time.monotonic()

    def running(self) -> bool:
        """True while the qemu process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def console_text(self) -> str:
        """Everything the guest printed so far (carriage returns removed)."""
        try:
            return self.console_log.read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_tail(self, n: int = 30) -> list[str]:
        """The last ``n`` lines of the console."""
        return self.console_text().splitlines()[-n:]

    def qemu_errors(self) -> str:
        """What qemu itself wrote on stderr (empty in interactive mode)."""
        try:
            return (self.workdir / f"{self.name}-qemu.stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, marker: str | re.Pattern, timeout_s: float,
                 start: int = 0) -> re.Match | None:
        """Follow the console until ``marker`` (a regex) matches, qemu exits, or time runs out.

        Searches from character offset ``start`` of the console text (to skip
        an earlier boot).  Returns the match, or None on timeout / VM exit.
        """
        rx = re.compile(marker, re.M) if isinstance(marker, str) else marker
        return self._follow(lambda text: rx.search(text, start), timeout_s)

    def wait_next_boot_ready(self, timeout_s: float, after: int) -> re.Match | None:
        """Follow the console until the boot after offset ``after`` prints READY (see
        :func:`~sidusd.lab.timeline.next_boot_ready`); None on timeout or VM exit."""
        return self._follow(lambda text: next_boot_ready(text, after), timeout_s)

    def _follow(self, find: Callable[[str], re.Match | None], timeout_s: float) -> re.Match | None:
        deadline = time.monotonic() + timeout_s
        while True:
            m = find(self.console_text())
            if m:
                return m
            if not self.running() or time.monotonic() >= deadline:
                # one last look: the marker may have been written just before exit
                return find(self.console_text())
            time.sleep(POLL_S)

    def wait_exit(self, timeout_s: float | None) -> int | None:
        """Wait for qemu to end (guest poweroff; None: no timeout); its exit code, or None on timeout."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End qemu (SIGTERM by PID, SIGKILL if it lingers).  Idempotent."""
        proc, self.proc = self.proc, None
        terminate(proc, STOP_TIMEOUT_S)
