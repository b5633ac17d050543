"""``python3 -m sidusd.lab demo [--keep] [--workdir DIR] [--timeout-s N]``: the demo boot lab.

Builds the demo image, makes the isolated lab network (a namespace with a
bridge and a tap, and a second namespace with the site's DHCP server), starts
nfs-ganesha and sidusd (proxyDHCP beside the site DHCP), PXE-boots a qemu VM
and prints the boot timeline as it happens, then a verdict:

    PASS: 52:54:00:13:20:01 booted over the network in 47.3 s (root on NFS read-only, / writable via overlay)

Exit code 0 on PASS, 1 on FAIL, 2 when the machine lacks a tool.  Everything
it started is stopped (by PID) and the namespaces removed: at the end, on a
failure, on Ctrl-C and on SIGTERM.  ``--keep`` boots the VM with
``sidus.demo=shell`` and puts its console on this terminal; leaving it
(Ctrl-A X) tears the lab down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from .demo import HostSpec, Lab, missing_requirements, tree_fingerprint
from .timeline import boot_markers
from .vm import mac_for

DEFAULT_WORKDIR = Path("/var/tmp/sidus-demo")
DEFAULT_TIMEOUT_S = 300.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SERVER_STEPS = ("dhcp", "pxelinux.0", "ldlinux.c32", "config", "kernel", "initrd")


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived: unwind through ``finally`` and tear down."""


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _verdict(lab: Lab, vm, tl, mac: str, image_untouched: bool) -> int:
    """Print PASS or FAIL (with the console tail); the exit code."""
    missing = tl.first_missing()
    if missing is None and image_untouched:
        _say(f"PASS: {mac} booted over the network in {tl.reached['ready'].t_s:.1f} s "
             "(root on NFS read-only, / writable via overlay)")
        return 0
    if missing is None:
        missing = "the image root on the server stayed unchanged (the guest wrote into it)"
    elif "writable: no" in boot_markers(vm.console_text()):
        missing += " (the guest reported 'writable: no')"
    _say(f"FAIL: {missing} — last 30 console lines:")
    for line in vm.console_tail(30):
        _say(f"  | {line}")
    _say("last sidusd log lines:")
    for line in lab.sidusd_log_tail(10):
        _say(f"  | {line}")
    return 1


def run_demo(workdir: Path, keep: bool, timeout_s: float) -> int:
    """The whole demo; returns the exit code.  Tears everything down before returning."""
    from .image import build_demo_image

    lab = Lab(workdir, mode="proxy", progress=lambda m: _say(f"== {m}"))
    mac = mac_for(0)
    try:
        _say("== building the demo image (busybox root, Debian kernel, initramfs with the overlay hook)")
        image = build_demo_image(workdir / "image", progress=lambda m: _say(f"   {m}"))
        before = tree_fingerprint(image.root)
        lab.up(image, [HostSpec(mac, "demo1", "sidus.demo=" + ("shell" if keep else "poweroff"))])
        if keep:
            return _run_keep(lab, mac)
        _say(f"== booting VM {mac} (qemu, TCG, iPXE firmware); timeline:")
        vm = lab.boot_vm(mac, name="demo1")
        tl = lab.timeline(vm)
        lab.follow(vm, tl, timeout_s, on_step=lambda st: _say(f"  {st.t_s:6.1f} s  {st.label}"))
        if "ready" in tl.reached:
            vm.wait_exit(30)            # sidus.demo=poweroff: the guest ends itself
        elif vm.running():
            _say(f"  (gave up after {timeout_s:g} s)")
        vm.stop()
        untouched = tree_fingerprint(image.root) == before
        if untouched and "ready" in tl.reached:
            _say(f"         image root on the server unchanged ({len(before)} entries)")
        return _verdict(lab, vm, tl, mac, untouched)
    finally:
        _say("== tearing down the lab")
        # a second Ctrl-C (or a SIGTERM) must not cut the tear-down short
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            lab.close()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        _say("== lab removed")


def _run_keep(lab: Lab, mac: str) -> int:
    _say(f"== booting VM {mac} with its console on this terminal (sidus.demo=shell)")
    _say("== leave the console with Ctrl-A X (Ctrl-A C: qemu monitor); the lab is then removed")
    _say(f"== meanwhile, from another terminal: sidusctl --socket {lab.control_socket} clients")
    time.sleep(1)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C belongs to the guest now
    try:
        vm = lab.boot_vm(mac, name="demo1", interactive=True)
        tl = lab.timeline(vm)
        vm.wait_exit(None)
    finally:
        signal.signal(signal.SIGINT, old)
    _say("")
    _say("== the boot, as sidusd and the console saw it:")
    for step in tl.poll():
        # sidusd's events carry their own time; console markers were read after the fact
        when = f"{step.t_s:6.1f} s" if step.key in SERVER_STEPS else "        "
        _say(f"  {when}  {step.label}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m sidusd.lab",
                                description="sidus demo boot lab: PXE-boot a VM through sidusd")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build the lab, boot a VM over the network, print the timeline")
    d.add_argument("--keep", action="store_true",
                   help="keep the lab up and give the VM console on this terminal (Ctrl-A X ends)")
    d.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help=f"where the image, configs and logs go (default {DEFAULT_WORKDIR})")
    d.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"give up on the boot after this many seconds (default {DEFAULT_TIMEOUT_S:g})")
    args = p.parse_args(argv)

    if os.geteuid() != 0:
        print("sidus lab: run as root (it creates network namespaces and starts an NFS server)",
              file=sys.stderr)
        return 2
    missing = missing_requirements()
    if missing:
        pkgs = sorted({pkg for _, pkg in missing})
        for what, pkg in missing:
            print(f"sidus lab: missing {what} (Debian package {pkg})", file=sys.stderr)
        print(f"sidus lab: install them with: apt-get install {' '.join(pkgs)}"
              "   (./scripts/demo does it for you)", file=sys.stderr)
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        return run_demo(args.workdir.resolve(), args.keep, args.timeout_s)
    except Interrupted as exc:
        print(f"sidus lab: interrupted ({exc}); everything it started was stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"FAIL: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
