"""What ``sidus-image`` says when interrupted is what it left (sidusd/image/__main__.py _interrupted):
the served generation (changed or not), the half-made generations still on disk."""

from __future__ import annotations

import io

from sidusd.image import __main__ as image_main
from sidusd.image.build import Administrator


def test_interrupted_says_what_is_served_and_what_is_left(tmp_path, capsys):
    adm = Administrator(tmp_path / "images", tmp_path / "tftp", out=io.StringIO())
    adm._new_generation("img", None, "build", lambda part, log: {})
    before = image_main._served_now(adm)
    assert before == {"img": 1}
    assert image_main._interrupted(adm, before, "interrupted", 130) == 130
    assert capsys.readouterr().err.strip() == ("sidus-image: interrupted; the served generation is unchanged; "
                                               "nothing is left mounted, no half-made generation is left")

    adm._new_generation("img", None, "build", lambda part, log: {})          # 2, served
    (adm.store.image_dir("img") / "gen-0003.partial").mkdir()                 # a cleanup that did not finish
    assert image_main._interrupted(adm, before, "stopped by SIGTERM", 143) == 143
    err = capsys.readouterr().err.strip()
    assert err == ("sidus-image: stopped by SIGTERM; img: generation 2 is served now; NOT cleaned up: "
                   f"{adm.store.image_dir('img') / 'gen-0003.partial'} (the next build, update, run, shell or "
                   "import of the image removes it)")
