"""The e2e suite's one debootstrap (tests/debian_tree.py): test_debian_image.py's build and
test_migration.py's tree must ask for the same debootstrap, or the suite makes two."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


def test_two_processes_wanting_the_tree_at_once_build_it_once(tmp_path, monkeypatch):
    """scripts/test's serial and background runs may both want the tree first on a fresh
    machine: one builds it, the other waits on the lock and takes it (before the lock, the
    second removed the first's half-made tree and started again)."""
    import threading
    import time as _time

    import debian_tree

    from sidusd.storage.runner import Result
    monkeypatch.setattr(debian_tree, "TREES", tmp_path / "trees")
    monkeypatch.setattr(debian_tree, "DEBS", tmp_path / "debs")
    builds: list[str] = []

    class SlowDebootstrap:
        def run(self, argv, timeout_s=30, input=None, env=None):
            builds.append(argv[-2])
            _time.sleep(0.5)                                  # the other one arrives meanwhile
            (Path(argv[-2]) / "etc").mkdir(parents=True)
            return Result(tuple(argv), 0)

    argv = debootstrap_argv("TARGET", MIRROR)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(
        debian_tree.cached_tree(argv, SlowDebootstrap(), log=lambda m: None))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 2 and got[0] == got[1]
    assert (got[0] / "etc").is_dir()
