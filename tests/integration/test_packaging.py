"""sidusd installed as a boot host installs it, outside any checkout: the wheel in a fresh venv,
the Debian package with apt on this machine.  Each run from /tmp with no PYTHONPATH, and checks
that the code, its package data (the initramfs hook, the example config) and its C module come
from the install, not from this repository.

The Debian package test installs system-wide: it refuses to run (skips, saying why) where sidus
is already installed or /etc/sidus or /var/lib/sidus exist, and purges the package at the end
(also when an assertion fails), so that a CI machine is left as it was found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool
from tests.ganesha_running import point_pid_file, running_ganesha

REPO = Path(__file__).resolve().parents[2]
PREFIXES = ("/etc/sidus", "/var/lib/sidus", "/srv/sidus", "/run/sidus", "/etc/ganesha", "/run/ganesha")
HOOK = "initramfs/hooks/sidus-overlay"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SIDUS_")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def run(argv: list[str], cwd: Path, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout, **kw)


def checkable_config(example: Path, inventory: Path, root: Path) -> Path:
    """The installed example config with its paths moved under ``root``, the installed example
    inventory where it says, and the image that inventory boots (debian12) in its images file,
    as `sidus-image build` leaves it: root tree, kernel and initrd under tftp.root."""
    text = example.read_text()
    for p in PREFIXES:
        text = text.replace(p, f"{root}{p}")
    conf = root / "etc/sidus/sidus.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(re.sub(r"(?m)^  interfaces: .*$", "  interfaces: [lo]", text, count=1))
    state = root / "var/lib/sidus"
    (state / "images/debian12/gen-0001").mkdir(parents=True)
    shutil.copy(inventory, state / "inventory.yaml")
    tftp = root / "srv/sidus/tftp"
    (tftp / "images/debian12/gen-0001").mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img"):
        (tftp / "images/debian12/gen-0001" / name).write_bytes(b"x")
    for src in ("/usr/lib/PXELINUX/pxelinux.0", "/usr/lib/syslinux/modules/bios/ldlinux.c32",
                "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi", "/usr/lib/syslinux/modules/efi64/ldlinux.e64"):
        if Path(src).exists():
            shutil.copy(src, tftp)
    (state / "images/images.yaml").write_text(
        f"images:\n  debian12:\n    root: {state}/images/debian12/gen-0001\n"
        "    kernel: images/debian12/gen-0001/vmlinuz\n    initrd: images/debian12/gen-0001/initrd.img\n")
    return conf


def where(python: str, cwd: Path) -> dict[str, str]:
    """Where the interpreter finds sidusd, its package data, its C module and msgspec."""
    code = ("import sidusd, sidusd.data as d, sidusd.net._lockstep as c, msgspec\n"
            "from sidusd.image.build import INITRAMFS_SRC, initramfs_files\n"
            "f = initramfs_files()\n"
            "print(sidusd.__file__); print(d.EXAMPLE_CONFIG); print(INITRAMFS_SRC / 'hooks/sidus-overlay')\n"
            "print(c.__file__); print(msgspec.__file__); print(len(f['hooks/sidus-overlay']))")
    r = run([python, "-c", code], cwd)
    assert r.returncode == 0, r.stderr
    keys = ("sidusd", "example", "hook", "c_module", "msgspec", "hook_bytes")
    return dict(zip(keys, r.stdout.split("\n"), strict=False))


def assert_installed_copy(found: dict[str, str], prefix: str) -> None:
    for key in ("sidusd", "example", "hook", "c_module"):
        assert found[key].startswith(prefix) and not found[key].startswith(str(REPO)), (key, found[key])
    assert int(found["hook_bytes"]) == (REPO / "sidusd/data" / HOOK).stat().st_size


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv (outside the checkout) with the wheel built from it, installed with pip."""
    base = tmp_path_factory.mktemp("wheel")
    wheels, venv = base / "wheel", base / "venv"
    r = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], base)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("sidusd-*.whl")
    assert run([sys.executable, "-m", "venv", str(venv)], base).returncode == 0
    r = run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], base)
    assert r.returncode == 0, r.stderr
    return venv


def test_the_wheel_works_in_a_venv_outside_the_checkout(venv, tmp_path):
    found = where(str(venv / "bin/python"), tmp_path)
    assert_installed_copy(found, str(venv))

    r = run([str(venv / "bin/sidus-image"), "--help"], tmp_path)
    assert r.returncode == 0 and "build" in r.stdout, r.stderr
    conf = checkable_config(Path(found["example"]), Path(found["example"]).with_name("inventory.yaml"),
                            tmp_path / "root")
    r = run([str(venv / "bin/sidusd"), "--check", "--config", str(conf)], tmp_path)
    assert r.returncode == 2 and "nfs-ganesha is not running" in r.stderr, r.stderr   # the NFS backend is asked
    with running_ganesha(tmp_path / "nfs") as server:
        point_pid_file(server, tmp_path / "root/run/ganesha/ganesha.pid")
        r = run([str(venv / "bin/sidusd"), "--check", "--config", str(conf)], tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    r = run([str(venv / "bin/sidusctl"), "--config", str(conf), "status"], tmp_path)
    assert r.returncode == 3 and f"{tmp_path}/root/run/sidus/control.sock" in r.stderr, r.stderr


def test_sidus_image_build_finds_the_hook_in_the_installed_wheel(venv, tmp_path):
    """`sidus-image build` reads the overlay hook before its first stage: from a venv it used to
    stop at once (``.../site-packages/config/initramfs/hooks/sidus-overlay`` missing).  Here it
    goes on to debootstrap, which fails on a mirror that refuses connections."""
    require_root()
    require_tool("debootstrap")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: hooktest\nsuite: bookworm\nmirror: http://127.0.0.1:9/debian\nsecurity_mirror: false\n"
                      "packages: [linux-image-amd64]\n")
    r = run([str(venv / "bin/sidus-image"), "--images-dir", str(tmp_path / "images"), "--tftp-root",
             str(tmp_path / "tftp"), "build", str(recipe)], tmp_path, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "sidus-overlay" not in out and "No such file" not in out, out
    assert "[0/" in out and "debootstrap" in out and "stage debootstrap failed" in out, out


def _dpkg_installed(name: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
    return "install ok installed" in r.stdout


def test_the_debian_package_installs_with_apt_and_runs(tmp_path):
    require_root()
    for tool in ("dpkg-buildpackage", "apt-get", "dh_python3"):
        require_tool(tool)
    if _dpkg_installed("sidus") or Path("/etc/sidus").exists() or Path("/var/lib/sidus").exists():
        pytest.skip("sidus is installed here, or /etc/sidus or /var/lib/sidus exist: not replacing them")
    out = tmp_path / "deb"
    r = subprocess.run([str(REPO / "scripts/build-deb")], cwd=REPO, env={**clean_env(), "OUT": str(out)},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (deb,) = out.glob("sidus_*_amd64.deb")
    env = {**clean_env(), "DEBIAN_FRONTEND": "noninteractive"}
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", f"./{deb.name}"],
                           cwd=out, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        files = set(run(["dpkg", "-L", "sidus"], tmp_path).stdout.split())
        for f in ("/usr/bin/sidusd", "/usr/bin/sidusctl", "/usr/bin/sidus-image", "/lib/systemd/system/sidusd.service",
                  "/usr/lib/sysusers.d/sidus.conf", "/etc/sidus/sidus.yaml", "/usr/share/sidus/recipes"):
            assert f in files, f
        conffiles = Path("/var/lib/dpkg/info/sidus.conffiles").read_text().split()
        assert conffiles == ["/etc/sidus/sidus.yaml"]
        unit = Path("/lib/systemd/system/sidusd.service").read_text()
        execs = re.findall(r"(?m)^ExecStart(?:Pre)?=(\S+)", unit)
        assert execs == ["/usr/bin/sidusd", "/usr/bin/sidusd"]
        docs = re.findall(r"file://(\S+)", re.search(r"(?m)^Documentation=(.*)$", unit).group(1))
        assert docs and all(Path(d).is_file() for d in docs), docs
        assert not list(Path("/etc/systemd/system").rglob("sidusd.service")), "the package enabled the unit"
        assert Path("/var/lib/sidus/inventory.yaml").read_bytes() == (REPO / "sidusd/data/inventory.yaml").read_bytes()
        assert run(["getent", "passwd", "sidus"], tmp_path).returncode == 0

        found = where("/usr/bin/python3", tmp_path)
        assert_installed_copy(found, "/usr/lib/python3/dist-packages/")
        assert found["msgspec"].startswith("/usr/lib/sidus/vendor/"), found
        r = run(["/usr/bin/sidus-image", "--help"], tmp_path)
        assert r.returncode == 0 and "build" in r.stdout, r.stderr
        # as installed: refused until configured (the example inventory's image is not built yet)
        r = run(["/usr/bin/sidusd", "--check"], tmp_path)
        assert r.returncode == 2 and "/etc/sidus/sidus.yaml" in r.stderr and "debian12" in r.stderr, r.stderr
        conf = checkable_config(Path("/etc/sidus/sidus.yaml"), Path("/usr/share/sidus/inventory.yaml"),
                                tmp_path / "root")
        with running_ganesha(tmp_path / "nfs") as server:
            point_pid_file(server, tmp_path / "root/run/ganesha/ganesha.pid")
            r = run(["/usr/bin/sidusd", "--check", "--config", str(conf)], tmp_path)
        assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    finally:
        purge = subprocess.run(["apt-get", "purge", "-y", "-q", "sidus"], env=env, capture_output=True, text=True,
                               timeout=600)
    assert purge.returncode == 0, purge.stderr
    assert not _dpkg_installed("sidus")
    assert not Path("/etc/sidus").exists() and not Path("/var/lib/sidus").exists()
    assert not Path("/usr/bin/sidusd").exists()
