"""A fresh build is up to date: the plan upgrades the whole root from -updates and -security
(issue 15, "Images an admin can trust"; today's images had pending upgrades)."""

from __future__ import annotations

from sidusd.image.recipe import parse_recipe
from sidusd.image.stages import APT_OPTS, plan

MIRROR = "http://deb.example/debian"
SECURITY = "http://security.example/debian-security"
INITRAMFS = {"hooks/sidus-overlay": b"#!/bin/sh\n", "modules": b"overlay\n"}


def _names(stages):
    return [s.name for s in stages]


def test_build_plan_runs_full_upgrade_after_sources_and_before_initramfs():
    r = parse_recipe("name: k\npackages: [linux-image-amd64]\n")
    st = plan(r, mirror=MIRROR, initramfs=INITRAMFS, security=SECURITY)
    n = _names(st)
    assert "upgrade" in n
    up = st[n.index("upgrade")]
    assert n.index("apt-sources") < n.index("upgrade") < n.index("packages") < n.index("initramfs")
    assert up.chroot and up.timeout_s >= 3600
    assert up.commands == (("apt-get", "-q", "update"), ("apt-get", *APT_OPTS, "full-upgrade"))
    assert "-y" in up.commands[1]                            # never waits for an answer
    # the sources it upgrades from: the suite, -updates, -security
    sources = st[n.index("apt-sources")].files[0][1].decode()
    assert f"deb {MIRROR} bookworm-updates main" in sources
    assert f"deb {SECURITY} bookworm-security main" in sources


def test_every_build_plan_upgrades_even_without_packages_or_kernel():
    for text in ("name: m\n", "name: s\nsuite: sid\n", "name: n\nsecurity_mirror: false\n"):
        n = _names(plan(parse_recipe(text), mirror=MIRROR, initramfs=INITRAMFS))
        assert n[:3] == ["apt-sources", "upgrade", "packages"], text
