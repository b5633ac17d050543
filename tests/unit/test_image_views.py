"""sidusd.image.views without mounts: stacks, refcounts, depth limits, what a view mounts."""

from __future__ import annotations

import pytest

from sidusd.image import views


def _view(d, n, stack):
    (d / f"gen-{n:04d}").mkdir()
    od = views.ovl_dir(d, n)
    (od / "layer").mkdir(parents=True)
    (od / "stack").write_text(" ".join(map(str, stack)) + "\n")


def test_depth_refused_outside_its_range_with_the_reason():
    assert views.check_depth(1) == 1 and views.check_depth(views.MAX_DEPTH) == views.MAX_DEPTH
    for bad in (0, -1, views.MAX_DEPTH + 1):
        with pytest.raises(ValueError, match="mount-option page"):
            views.check_depth(bad)


def test_stacks_are_the_refcounts(tmp_path):
    d = tmp_path
    (d / "gen-0001").mkdir()
    _view(d, 2, [2, 1])
    _view(d, 3, [3, 2, 1])
    (d / "gen-0009.ovl").mkdir()
    (d / "gen-0009.ovl/stack").write_text("not numbers\n")       # garbage: not a view
    assert views.stack_of(d, 9) is None and views.stack_of(d, 1) is None
    assert views.parent_stack(d, 1) == [1] and views.parent_stack(d, 3) == [3, 2, 1]
    assert views.view_numbers(d) == [2, 3] and views.needed(d) == {1, 2, 3}
    assert views.layer_paths(d, [3, 2, 1]) == [d / "gen-0003.ovl/layer", d / "gen-0002.ovl/layer", d / "gen-0001"]
    opts = views.mount_opts(d, 3, [3, 2, 1])
    assert "index=on" in opts and "nfs_export=on" in opts and "redirect_dir=nofollow" in opts
    assert f"lowerdir={d}/gen-0003.ovl/layer:{d}/gen-0002.ovl/layer:{d}/gen-0001" in opts
    (d / "gen-0002").rmdir()                                      # generation 2 gone: 3 still needs its layer
    assert views.free_unneeded(d) == ["gen-0009.ovl"] and (d / "gen-0002.ovl").is_dir()
    (d / "gen-0001").rename(d / "gen-0001.base")                  # base 1 removed, kept for 3
    assert views.layer_paths(d, [3, 2, 1])[-1] == d / "gen-0001.base"
    assert views.kept_numbers(d) == {1, 2, 3}
    (d / "gen-0003").rmdir()
    assert views.free_unneeded(d) == ["gen-0001.base", "gen-0002.ovl", "gen-0003.ovl"]
    assert views.kept_numbers(d) == set()
