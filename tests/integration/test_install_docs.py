"""The README's boot-host steps, followed in a temporary root: after exactly those steps the
shipped config passes ``sidusd --check``, and no step needs a path flag.

Every path under /etc/sidus, /var/lib/sidus, /srv/sidus and /run/sidus (in the README's
commands, in the shipped config, in the package's postinst) is moved under ``tmp_path``; the
boot loaders are copied from the host's Debian packages for real.  Three steps cannot run in
a test and are done by the code they stand for: ``apt-get install ./sidus_*.deb`` (the config
file the package installs, and its real postinst with its paths moved), ``$EDITOR`` (the edit
the comment names: dhcp.interfaces), and ``sidus-image build`` (the real Administrator, found
through the same config as sidus-image finds it, makes and publishes a generation whose tree
holds a kernel and an initrd instead of running debootstrap; tests/e2e/test_debian_image.py
builds a real one).  ``systemctl`` and ``sidusctl`` need the running daemon: only their
arguments are checked (no --config, no --socket).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from sidusd import data
from sidusd.cliconfig import DEFAULT_CONFIG, image_paths
from sidusd.image.build import Administrator
from sidusd.image.recipe import read_recipe
from tests.ganesha_running import point_pid_file, running_ganesha

REPO = Path(__file__).resolve().parents[2]
PREFIXES = ("/etc/sidus", "/var/lib/sidus", "/srv/sidus", "/run/sidus", "/etc/ganesha", "/run/ganesha")
SHARE = "/usr/share/sidus"          # the package's links into sidusd/data (debian/sidus.links)


def readme_steps() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running sidusd on a boot host"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the README's boot-host section"
    joined = block.group(1).replace("\\\n", " ")
    steps = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line:
            steps += [s.strip() for s in line.split("&&")]
    return steps


def test_share_links_point_into_the_package_data():
    links = dict(line.split() for line in (REPO / "debian" / "sidus.links").read_text().splitlines() if line)
    for target, link in links.items():
        assert link.startswith(SHARE[1:] + "/")
        assert target.startswith("usr/lib/python3/dist-packages/sidusd/data/")
        assert data.path(target.removeprefix("usr/lib/python3/dist-packages/sidusd/data/")).exists()


class Root:
    """A temporary root: the sidus paths moved under it."""

    def __init__(self, base: Path):
        self.base = base

    def move(self, text: str) -> str:
        for p in PREFIXES:
            text = text.replace(p, f"{self.base}{p}")
        return text.replace(SHARE, str(data.path()))

    def inside(self, path: str) -> bool:
        return Path(path).resolve().is_relative_to(self.base)


def install_package(root: Root) -> None:
    """What `apt-get install ./sidus_*.deb` puts in place: /etc/sidus/sidus.yaml (debian/rules
    installs the example config there), then the package's own postinst, paths moved."""
    rules = (REPO / "debian" / "rules").read_text()
    assert "sidusd/data/sidus.yaml debian/sidus/etc/sidus/sidus.yaml" in rules
    conf = Path(root.move("/etc/sidus/sidus.yaml"))
    conf.parent.mkdir(parents=True)
    conf.write_text(root.move(data.EXAMPLE_CONFIG.read_text()))
    postinst = (REPO / "debian" / "sidus.postinst").read_text().replace("#DEBHELPER#", "")
    subprocess.run(["sh", "-c", root.move(postinst), "postinst", "configure"], check=True)


def edit_config(root: Root) -> None:
    """The edit the README's comment names: the interfaces to answer on (here, one that exists)."""
    conf = Path(root.move("/etc/sidus/sidus.yaml"))
    text = conf.read_text()
    conf.write_text(re.sub(r"(?m)^  interfaces: .*$", "  interfaces: [lo]", text, count=1))


def build_image(root: Root, recipe_path: str) -> str:
    """`sidus-image build RECIPE` without flags: the paths from the daemon's config, as
    sidus-image resolves them; the generation's tree holds what the recipe's kernel package
    would leave in /boot."""
    recipe = read_recipe(Path(recipe_path))
    where = image_paths(images_dir=None, tftp_root=None, images_file=None, control_socket=None,
                        config_flag=Path(root.move(str(DEFAULT_CONFIG))), environ={})
    assert root.inside(str(where.images_dir)) and root.inside(str(where.tftp_root))
    adm = Administrator(where.images_dir, where.tftp_root, images_file=where.images_file, out=io.StringIO())

    def work(part: Path, logfile: Path) -> dict:
        (part / "boot").mkdir(parents=True)
        (part / "boot" / "vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
        (part / "boot" / "initrd.img-6.1.0-99-amd64").write_bytes(b"initrd")
        return {"kernel": "vmlinuz-6.1.0-99-amd64", "initrd": "initrd.img-6.1.0-99-amd64", "kver": "6.1.0-99-amd64"}

    adm._new_generation(recipe.name, None, "build", work)
    return recipe.name


def test_the_readme_boot_host_steps_give_a_config_that_passes_check(tmp_path):
    root = Root(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDUS_")}
    env["PYTHONPATH"] = str(REPO)
    checked = built = installed = False
    for step in readme_steps():
        argv = shlex.split(step)
        cmd = argv[0]
        if cmd == "scripts/build-deb":
            assert os.access(REPO / cmd, os.X_OK)
        elif cmd == "apt-get":
            assert argv[1] == "install" and re.fullmatch(r"\./sidus_[0-9.]+_amd64\.deb", argv[2]), step
            install_package(root)
            installed = True
        elif cmd == "$EDITOR":
            assert argv[1:] == [str(DEFAULT_CONFIG)], step
            edit_config(root)
        elif cmd in ("install", "cp", "mkdir"):
            moved = shlex.split(root.move(step))
            dest = [a for a in moved[1:] if not a.startswith("-")][-1]
            assert root.inside(dest), f"README step writes outside the sidus paths: {step}"
            subprocess.run(moved, check=True, cwd=tmp_path)
        elif cmd == "sidus-image":
            assert argv[1] == "build" and len(argv) == 3, f"a path flag in {step}"
            built = build_image(root, root.move(argv[2]))
        elif cmd == "sidusd":
            assert argv[1:] == ["--check"], f"sidusd --check needs no flag after the documented steps: {step}"
            with running_ganesha(tmp_path / "nfs") as server:      # --check asks whether NFS runs
                point_pid_file(server, Path(root.move("/run/ganesha/ganesha.pid")))
                r = subprocess.run([sys.executable, "-m", "sidusd", "--check", "--config",
                                    root.move(str(DEFAULT_CONFIG))], capture_output=True, text=True, env=env,
                                   cwd=tmp_path, timeout=60)
            assert r.returncode == 0, r.stderr
            assert "OK" in r.stdout and "2 image(s)" in r.stdout, r.stdout    # the image and its gen-1 pin
            checked = True
        elif cmd in ("systemctl", "sidusctl"):
            assert not any(a.startswith(("--socket", "--config")) for a in argv), step
        else:
            raise AssertionError(f"a README step this test does not know: {step}")
    assert installed and built and checked
    # the paths the steps used are the shipped config's
    cfg = yaml.safe_load(data.EXAMPLE_CONFIG.read_text())
    assert Path(root.move(cfg["inventory_file"])).is_file()
    assert (Path(root.move(cfg["tftp"]["root"])) / "pxelinux.0").is_file()
    assert Path(root.move(cfg["images_file"])).is_file()
