"""What ``sidus-image`` imports before it works (issue 16: a `run` through the command costs its
Python start-up; docs/performance.md "Image generations (issue 16)").

Before, ``import sidusd.image.__main__`` pulled in structlog (and through it asyncio), msgspec,
yaml and every command's code, rollout included: about 100 ms of imports before `run` did
anything.  These tests look at ``sys.modules`` in a fresh interpreter (a structural check, not a
timing): the command module imports only the standard library, and a whole `run` (its work
replaced by one info event, dropped at the default level) never imports what it does not use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# never needed by `sidus-image run` (yaml is: the generated images file)
NOT_FOR_RUN = ("asyncio", "structlog", "msgspec", "sidusd.observability", "sidusd.control.messages",
               "sidusd.schema", "sidusd.image.rollout", "sidusd.image.cli_views", "sidusd.image.recipe",
               "sidusd.image.history", "sidusd.config")


def test_importing_the_command_imports_only_the_standard_library():
    code = ("import sys, json; import sidusd.image.__main__\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('sidusd', 'yaml', 'msgspec', "
            "'structlog', 'asyncio')))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    mods = set(json.loads(res.stdout))
    assert mods == {"sidusd", "sidusd.image", "sidusd.image.__main__"}, sorted(mods)


RUN = """
import json, sys
import sidusd.image.build as build
seen = {}
def fake_run(self, name, argv, switch=True, keep_failed=False, message=None):
    build.log.info("image.generation.committed", image=name)     # dropped unless -v
    self.store.image_dir(name)
    self.write_images_file()
    seen["imported"] = sorted(m for m in %r if m in sys.modules)
    build.log.warning("image.test.warning", n=1)                 # at the level: set up, written
    seen["after_warning"] = sorted(m for m in ("structlog", "sidusd.observability") if m in sys.modules)
    return 2
build.Administrator.run = fake_run
from sidusd.image.__main__ import main
rc = main([*json.loads(sys.argv[3]), "--images-dir", sys.argv[1], "--tftp-root", sys.argv[2],
           "run", "img", "-m", "why", "--", "true"])
print(json.dumps({"rc": rc, "yaml": "yaml" in sys.modules, **seen}))
"""


def _run(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN % (NOT_FOR_RUN,), str(tmp_path / "images"),
                           str(tmp_path / "tftp"), json.dumps(options)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_a_run_imports_only_what_it_uses(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0
    assert out["imported"] == [], out["imported"]
    assert out["yaml"] is True                                   # the images file was written
    assert (tmp_path / "images" / "images.yaml").read_text().startswith("# written by sidus-image")
    # the info event was dropped; the warning set logging up as asked (JSON: stderr is no tty)
    assert out["after_warning"] == ["sidusd.observability", "structlog"]
    lines = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    assert [x["event"] for x in lines] == ["image.test.warning"], res.stderr
    assert lines[0]["component"] == "image.build" and lines[0]["n"] == 1 and lines[0]["level"] == "warning"


def test_verbose_writes_the_info_events(tmp_path):
    res = _run(tmp_path, "-v", "--log-format", "json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(x)["event"] for x in res.stderr.splitlines() if x.startswith("{")]
    assert events == ["image.generation.committed", "image.test.warning"], res.stderr


@pytest.mark.parametrize("argv, word", [
    (["run", "img", "-m", "x"], "run"),
    (["--images-dir", "/i", "--tftp-root", "/t", "-v", "list"], "list"),
    (["--cache", "run", "push", "img", "--to", "/r"], "push"),      # an abbreviated option's value
    (["--log-format", "json", "rack-scan", "/r"], "rack-scan"),
    (["-h"], None),
    ([], None),
    (["--log-format", "bogus", "run", "x"], None),                   # argparse's own error then
])
def test_the_command_word_chooses_the_parser(argv, word):
    from sidusd.image import __main__ as m
    assert m._command_word(argv) == word


def test_the_light_parser_has_every_local_command_and_push_still_parses():
    from sidusd.image import __main__ as m
    light = m._parser(with_rollout=False)
    choices = set(light._subparsers._group_actions[0].choices)      # type: ignore[union-attr]
    assert choices == set(m._LOCAL_CMDS)
    args = m._parser(with_rollout=m._command_word(["push", "img", "--to", "/r"]) not in m._LOCAL_CMDS) \
        .parse_args(["push", "img", "--to", "/r"])
    assert args.cmd == "push" and args.racks == [Path("/r")]


def test_lazylog_without_deferral_is_the_structlog_logger():
    import structlog

    from sidusd.image import lazylog
    saved = structlog.get_config()
    structlog.reset_defaults()               # whatever level an earlier test of this process set
    try:
        with structlog.testing.capture_logs() as logs:
            lazylog.get_logger("image.x", a=1).info("ev", b=2)
            lazylog.get_logger("image.x").bind(c=3).warning("ev2")
    finally:
        structlog.configure(**saved)
    assert [(x["event"], x["log_level"]) for x in logs] == [("ev", "info"), ("ev2", "warning")]
    assert logs[0]["a"] == 1 and logs[0]["b"] == 2 and logs[0]["component"] == "image.x" and logs[1]["c"] == 3
