"""What the boot storm measures of a server: CPU seconds (with its children), peak RSS, percentiles.

Shared by the storm (:mod:`bench.storm`) and the DHCP latency runs (:mod:`bench.latency`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` in seconds (children once reaped)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _CLK


_CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuMeter:
    """CPU seconds of a server and every process it forks.

    A cgroup v1 ``cpuacct`` group when one can be made (tftpd-hpa's per-transfer
    children are never waited for, so they never reach the parent's cutime);
    else utime+stime+cutime+cstime from /proc/<pid>/stat.
    """

    def __init__(self, tag: str):
        self.group: Path | None = _CPUACCT / f"sidus-bench-{os.getpid()}-{tag}"
        try:
            self.group.mkdir()
        except OSError:
            self.group = None
        self.source = "cgroup-cpuacct" if self.group else "proc-stat"

    def preexec(self) -> None:
        """In the child before exec: join the group."""
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def seconds(self, pid: int) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        return proc_cpu_s(pid)

    def user_sys(self, pid: int) -> tuple[float, float]:
        """(user, system) CPU seconds so far."""
        if self.group is not None:
            st = dict(ln.split() for ln in (self.group / "cpuacct.stat").read_text().splitlines())
            return int(st["user"]) / _CLK, int(st["system"]) / _CLK
        with open(f"/proc/{pid}/stat") as f:
            v = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
        return (v[0] + v[2]) / _CLK, (v[1] + v[3]) / _CLK

    def close(self) -> None:
        if self.group is not None:
            for _ in range(50):
                try:
                    self.group.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)         # processes still leaving


def proc_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan if empty)."""
    if not sorted_vals:
        return float("nan")
    k = max(1, -(-len(sorted_vals) * p // 100))
    return sorted_vals[int(k) - 1]
