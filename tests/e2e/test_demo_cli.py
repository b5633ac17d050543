"""The README's first command, `python3 -m sidusd.lab demo`, run as a user runs it.

One whole boot (PASS, exit 0) and one interrupted boot (Ctrl-C in the middle:
everything it started is gone afterwards).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sidusd.lab.topology import netns_list

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo(workdir, *args):
    return subprocess.Popen([sys.executable, "-m", "sidusd.lab", "demo", "--workdir", str(workdir), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO), start_new_session=True)


def running(pid):
    """``comm (state)`` of a process that still runs, or None (gone, or a zombie being reaped)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return None
    comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return None if state in "ZX" else f"{pid} {comm} ({state})"


def lab_namespaces(pid):
    return [ns for ns in netns_list() if ns.startswith((f"sidus-lab-{pid}x", f"sidus-site-{pid}x"))]


def test_demo_boots_and_says_pass(demo_image):
    workdir = demo_image.root.parent.parent
    proc = demo(workdir, "--timeout-s", "300")
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    lines = out.splitlines()
    verdict = [ln for ln in lines if ln.startswith(("PASS:", "FAIL:"))]
    assert len(verdict) == 1 and verdict[0].startswith("PASS: 52:54:00:13:20:01 booted over the network in "), out
    assert verdict[0].endswith("(root on NFS read-only, / writable via overlay)"), out
    # the timeline names every step, in boot order
    wanted = ["proxyDHCP offer from sidusd", "TFTP pxelinux.0", "TFTP ldlinux.c32",
              "TFTP pxelinux.cfg/01-52-54-00-13-20-01", "TFTP kernel demo/vmlinuz",
              "TFTP initrd demo/initrd.img", "Linux kernel started", "root mounted", "READY"]
    positions = [next((i for i, ln in enumerate(lines) if w in ln), None) for w in wanted]
    assert None not in positions and positions == sorted(positions), out
    assert lines[-1] == "== lab removed" and not lab_namespaces(proc.pid), out


def test_demo_interrupted_mid_boot_removes_everything(demo_image):
    workdir = demo_image.root.parent.parent
    proc = demo(workdir)
    out = []
    try:
        for line in proc.stdout:                 # wait until the VM is booting
            out.append(line)
            if "booting VM" in line:
                break
        time.sleep(5)
        assert "booting VM" in out[-1], "".join(out)
        namespaces = lab_namespaces(proc.pid)
        assert len(namespaces) == 2, "".join(out)
        pids = [p for ns in namespaces for p in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
        assert len(pids) >= 4, pids              # qemu, sidusd, ganesha, rpcbind, dnsmasq
        os.kill(proc.pid, signal.SIGINT)         # Ctrl-C
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(out)
    assert proc.returncode == 130, text
    assert "== lab removed" in text and "interrupted" in text, text
    assert not lab_namespaces(proc.pid), text
    alive = [p for p in pids if running(p)]
    assert not alive, (alive, text)
