"""The e2e suite's one debootstrap (tests/debian_tree.py): test_debian_image.py's build and
test_migration.py's tree must ask for the same debootstrap, or the suite makes two."""

from __future__ import annotations

import dataclasses

from debian_tree import EXCLUDE, INCLUDE, SharedDebootstrap, debootstrap_argv, key

from sidusd import data
from sidusd.image.recipe import read_recipe
from sidusd.image.stages import debootstrap_argv as builder_argv

MIRROR = "http://mirror.example/debian"


def test_the_builder_asks_for_the_migration_tree():
    recipe = dataclasses.replace(read_recipe(data.RECIPES / "debian-e2e.yaml"), include=INCLUDE, exclude=EXCLUDE)
    built = builder_argv(recipe, "/images/debian-e2e/gen-0001.partial", MIRROR, "/elsewhere/debs")
    assert key(built) == key(debootstrap_argv("/srv/nfsroot/sidus", MIRROR))
    # what makes another tree is another key: the mirror, the lists, the suite
    assert key(debootstrap_argv("/t", MIRROR + "2")) != key(debootstrap_argv("/t", MIRROR))
    plain = builder_argv(read_recipe(data.RECIPES / "debian-e2e.yaml"), "/t", MIRROR, None)
    assert key(plain) != key(built)


def test_other_commands_run_as_usual():
    res = SharedDebootstrap().run(["sh", "-c", "echo $0; exit 3", "ran"], timeout_s=10)
    assert (res.rc, res.out.strip()) == (3, "ran")
