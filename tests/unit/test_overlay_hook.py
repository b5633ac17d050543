"""sidusd/data/initramfs: the sidus-overlay init-bottom script, run for real.

Each case runs the script in a throwaway mount namespace (``unshare -m``) with
a fake ``${rootmnt}`` (a tmpfs holding a file, mounted read-only) and stub
initramfs functions (``panic``, ``log_*``) that record their calls.  It is
run by both dash and busybox sh (the initramfs shell).  What this cannot
check: the NFS lower layer and the real initramfs init around it; that is
proven by booting the demo image in qemu (docs/boot-chain.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root, require_tool

from sidusd import data

SCRIPT = data.INITRAMFS / "scripts/init-bottom/sidus-overlay"
HOOK = data.INITRAMFS / "hooks/sidus-overlay"

STUBS = """\
panic() { echo "PANIC: $*" >> "$STUB_LOG"; }
log_begin_msg() { echo "BEGIN: $*" >> "$STUB_LOG"; }
log_end_msg() { echo "END" >> "$STUB_LOG"; }
log_success_msg() { echo "OK: $*" >> "$STUB_LOG"; }
log_failure_msg() { echo "FAIL: $*" >> "$STUB_LOG"; }
log_warning_msg() { echo "WARN: $*" >> "$STUB_LOG"; }
"""

# $1 shell, $2 script, $3 work dir, $4 root setup (plain|stacked|none).  Prints facts as KEY=VALUE.
DRIVER = r"""
set -u
sh_impl=$1; script=$2; w=$3; setup=$4
root=$w/root
mkdir -p "$root"
case $setup in
plain)
  mount -t tmpfs -o size=4m fake-nfs "$root"
  echo original > "$root/file"; mkdir "$root/dev" "$root/etc"
  mount -o remount,ro "$root" ;;
stacked)   # root = overlay on overlay: a third layer exceeds the kernel's stacking depth
  mkdir -p "$w/l0" "$w/m1" "$w/u1" "$w/k1" "$w/u2" "$w/k2"
  mount -t tmpfs -o size=4m t0 "$w/l0"; echo original > "$w/l0/file"
  mount -t tmpfs -o size=4m t1 "$w/u1"; mkdir "$w/u1/u" "$w/u1/k"
  mount -t overlay -o "lowerdir=$w/l0,upperdir=$w/u1/u,workdir=$w/u1/k" o1 "$w/m1"
  mount -t tmpfs -o size=4m t2 "$w/u2"; mkdir "$w/u2/u" "$w/u2/k"
  mount -t overlay -o "lowerdir=$w/m1,upperdir=$w/u2/u,workdir=$w/u2/k" o2 "$root" ;;
none) ;;
esac
rootmnt=$root "$sh_impl" "$script"
echo "RC=$?"
while read -r dev mnt fs opts rest; do
  case $mnt in "$root"|"$w/base/ro"|"$w/base/rw") echo "MOUNT $mnt $fs $opts" ;; esac
done < /proc/mounts
# the size of the upper tmpfs as statvfs(2) reports it (/proc/mounts leaves size= out at the default)
if [ -d "$w/base/rw" ]; then
  "$PYTHON" -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(f"RW_BYTES={s.f_blocks * s.f_frsize}")' "$w/base/rw"
fi
if [ "$setup" = plain ]; then
  echo "READ=$(cat "$root/file")"
  if echo changed > "$root/file" 2>/dev/null && echo new > "$root/newfile" 2>/dev/null; then
    echo "WRITABLE=yes"; else echo "WRITABLE=no"; fi
  echo "AFTER=$(cat "$root/file" 2>/dev/null)"
  echo "LOWER=$(cat "$w/base/ro/file" 2>/dev/null)"
  [ -e "$w/base/ro/newfile" ] && echo "LOWER_NEW=present" || echo "LOWER_NEW=absent"
  [ -e "$w/base/rw/upper/newfile" ] && echo "UPPER_NEW=present" || echo "UPPER_NEW=absent"
  touch "$w/base/ro/probe" 2>/dev/null && echo "LOWER_RO=no" || echo "LOWER_RO=yes"
fi
"""


def run_hook(tmp_path: Path, shell: str, cmdline: str, setup: str = "plain"):
    require_root()
    require_tool("unshare")
    w = tmp_path / "w"
    w.mkdir()
    stubs = tmp_path / "functions"
    stubs.write_text(STUBS)
    log = tmp_path / "stub.log"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SIDUS_FUNCTIONS": str(stubs),
           "SIDUS_CMDLINE": cmdline, "SIDUS_OVERLAY_BASE": str(w / "base"), "STUB_LOG": str(log),
           "PYTHON": sys.executable}
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", DRIVER, "driver",
                           shell, str(SCRIPT), str(w), setup],
                          env=env, capture_output=True, text=True, timeout=60)
    facts: dict[str, str] = {}
    mounts: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("MOUNT "):
            _, mnt, fs, opts = line.split(" ", 3)
            mounts[mnt] = (fs, opts)
        elif "=" in line:
            k, v = line.split("=", 1)
            facts[k] = v
    calls = log.read_text().splitlines() if log.exists() else []
    assert "RC" in facts, proc.stderr
    return facts, mounts, calls, w


def shells():
    out = ["dash"]
    if shutil.which("busybox"):
        out.append("busybox-sh")
    return out


def shell_path(tmp_path: Path, name: str) -> str:
    if name == "dash":
        return require_tool("dash")
    wrapper = tmp_path / "busybox-sh"    # "busybox sh" as one executable path
    wrapper.write_text(f'#!/bin/sh\nexec {require_tool("busybox")} sh "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("path", [SCRIPT, HOOK])
def test_syntax(path):
    assert subprocess.run([require_tool("dash"), "-n", str(path)]).returncode == 0
    assert subprocess.run([require_tool("busybox"), "sh", "-n", str(path)]).returncode == 0
    assert path.stat().st_mode & 0o111


def test_prereqs_boilerplate():
    out = subprocess.run(["sh", str(SCRIPT), "prereqs"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == ""


def test_overlay_sysfs_support():
    """Say plainly whether this kernel can run the real cases below."""
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            subprocess.run(["modprobe", "overlay"], capture_output=True)
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            pytest.skip("missing kernel feature: overlayfs (the VM boot is the only proof here)")


@pytest.mark.parametrize("shell", shells())
def test_tmpfs_overlay_makes_root_writable_lower_untouched(tmp_path, shell):
    facts, mounts, calls, w = run_hook(tmp_path, shell_path(tmp_path, shell),
                                       "console=ttyS0 root=/dev/nfs sidus.overlay=tmpfs sidus.overlay_size=16m")
    root = str(w / "root")
    assert facts["RC"] == "0", calls
    assert not [c for c in calls if c.startswith("PANIC")]
    assert mounts[root][0] == "overlay"
    assert f"lowerdir={w}/base/ro" in mounts[root][1] and f"upperdir={w}/base/rw/upper" in mounts[root][1]
    assert mounts[str(w / "base/ro")][0] == "tmpfs" and mounts[str(w / "base/ro")][1].split(",")[0] == "ro"
    fs, opts = mounts[str(w / "base/rw")]
    assert fs == "tmpfs" and "size=16384k" in opts.split(",")
    assert facts["READ"] == "original"
    assert facts["WRITABLE"] == "yes" and facts["AFTER"] == "changed"
    assert facts["LOWER"] == "original" and facts["LOWER_NEW"] == "absent"
    assert facts["UPPER_NEW"] == "present" and facts["LOWER_RO"] == "yes"
    assert calls[0].startswith("BEGIN: sidus-overlay") and calls[-1] == "END"


def test_default_size_is_half_of_memory(tmp_path):
    facts, mounts, calls, w = run_hook(tmp_path, "sh", "sidus.overlay=tmpfs")
    assert facts["RC"] == "0", calls
    assert mounts[str(w / "base/rw")][0] == "tmpfs"
    # statvfs, not /proc/mounts: the kernel leaves size= out of the mount options when a tmpfs
    # has its default size (50% of RAM), so the options say nothing on some machines
    size_kib = int(facts["RW_BYTES"]) // 1024
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    assert abs(size_kib - total_kib // 2) <= 4 * 1024   # tmpfs rounds to pages


def test_without_sidus_overlay_nothing_happens(tmp_path):
    facts, mounts, calls, w = run_hook(tmp_path, "sh", "console=ttyS0 root=/dev/nfs boot=nfs")
    assert facts["RC"] == "0" and calls == []
    assert mounts[str(w / "root")][0] == "tmpfs" and facts["WRITABLE"] == "no"
    assert not (w / "base").exists()


@pytest.mark.parametrize("cmdline,message", [
    ("sidus.overlay=iscsi sidus.fallback=stop", "sidus-overlay: iSCSI disk: sidus.iscsi.target= is missing"),
    ("sidus.overlay=zram", "sidus-overlay: sidus.overlay=zram: unknown mode (known: tmpfs, iscsi)"),
    ("sidus.overlay=tmpfs sidus.overlay_size=lots", "sidus-overlay: sidus.overlay_size=lots: not a tmpfs size"),
])
def test_refused_command_lines_panic(tmp_path, cmdline, message):
    facts, mounts, calls, w = run_hook(tmp_path, "sh", cmdline)
    assert facts["RC"] == "1"
    assert calls[0].startswith("PANIC: " + message), calls
    assert mounts[str(w / "root")][0] == "tmpfs"       # root left as it was


def test_no_root_mounted_panics(tmp_path):
    facts, mounts, calls, w = run_hook(tmp_path, "sh", "sidus.overlay=tmpfs", setup="none")
    assert facts["RC"] == "1"
    assert calls == [f"PANIC: sidus-overlay: root {w}/root: nothing is mounted there (did the NFS mount fail?)"]


@pytest.mark.parametrize("shell", shells())
def test_overlay_mount_failure_panics_with_the_reason(tmp_path, shell):
    facts, mounts, calls, w = run_hook(tmp_path, shell_path(tmp_path, shell), "sidus.overlay=tmpfs",
                                       setup="stacked")
    assert facts["RC"] == "1"
    panics = [c for c in calls if c.startswith("PANIC")]
    assert len(panics) == 1, calls
    prefix = f"PANIC: sidus-overlay: mount overlay on {w}/root: "
    assert panics[0].startswith(prefix), panics
    assert len(panics[0]) > len(prefix)     # mount's own reason follows, on the same line
    assert calls.index(panics[0]) == len(calls) - 1
    assert "END" not in calls


def test_demo_conf_dir_carries_the_overlay_parts(tmp_path):
    from sidusd.lab.image import make_conf_dir
    conf = tmp_path / "conf"
    make_conf_dir(conf)
    text = (conf / "initramfs.conf").read_text()
    for setting in ("BOOT=nfs", "MODULES=netboot", "BUSYBOX=y"):
        assert setting in text.splitlines()
    assert "overlay" in (conf / "modules").read_text().split()
    for rel in ("hooks/sidus-overlay", "scripts/init-bottom/sidus-overlay"):
        assert not (conf / rel).is_symlink()
        assert (conf / rel).read_bytes() == (data.INITRAMFS / rel).read_bytes()
        assert (conf / rel).stat().st_mode & 0o111


def test_hook_adds_overlay_even_with_an_empty_module_list(tmp_path):
    """MODULES=list and no modules file: only the hook can bring overlay.ko in."""
    require_tool("mkinitramfs")
    from sidusd.lab.image import make_conf_dir, newest_kernel
    kver = newest_kernel()
    conf = tmp_path / "conf"
    make_conf_dir(conf, modules="list")
    (conf / "modules").write_text("")
    initrd = tmp_path / "initrd"
    res = subprocess.run(["mkinitramfs", "-d", str(conf), "-o", str(initrd), kver],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    files = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert any(f.endswith("/fs/overlayfs/overlay.ko") for f in files)
    assert "scripts/init-bottom/sidus-overlay" in files
    # and without the hook, it is not there: the test can tell the difference
    (conf / "hooks/sidus-overlay").unlink()
    subprocess.run(["mkinitramfs", "-d", str(conf), "-o", str(initrd), kver],
                   capture_output=True, check=True, timeout=300)
    files = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True,
                           check=True).stdout.split()
    assert not any(f.endswith("/overlay.ko") for f in files)
