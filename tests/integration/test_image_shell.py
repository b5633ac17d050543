"""`sidus-image shell` never throws work away silently (issue 15, "Images an admin can trust").

A busybox root is generation 1.  The real CLI runs the shell in a real chroot:

* on a pseudo-terminal (its controlling terminal), typed at like an admin: the prompt names
  the image and the generation, Ctrl-C does not end the session, a plain ``exit`` after a
  failed command asks publish / keep / discard, and each answer does what it says;
* with a script on stdin (no terminal): the session is kept, the output says how to publish
  it or drop it; ``publish``, ``shell --from``, ``drop`` and ``gc`` treat it as asked.

Before, the ``exit`` after ``false`` made the generation fail and removed it.
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from sidusd.image.build import Administrator
from sidusd.image.chroot import mounts_under
from tests.conftest import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]
NAME = "img"
PROMPT = b"(sidus-image img gen 2) "


@pytest.fixture
def adm(tmp_path):
    require_root()
    bb = require_tool("busybox")
    require_tool("chroot")
    require_tool("unshare")
    a = Administrator(tmp_path / "images", tmp_path / "tftp", out=io.StringIO())
    n, part = a.store.begin(NAME, None)
    for d in ("bin", "etc", "usr", "root"):
        (part / d).mkdir()
    shutil.copy2(bb, part / "bin/busybox")
    for app in ("sh", "touch", "cat", "false", "ls"):
        os.symlink("busybox", part / "bin" / app)
    (part / "etc/motd").write_text("hello\n")
    a.store.commit(NAME, n, {"kind": "build"})
    a.serve(NAME, n)
    yield a
    assert mounts_under(tmp_path) == []


def argv(adm: Administrator, *args: str) -> list[str]:
    return [sys.executable, "-m", "sidusd.image", "--images-dir", str(adm.store.dir), "--tftp-root",
            str(adm.tftp_root), *args]


def cli(adm: Administrator, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(argv(adm, *args), input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120)


class Terminal:
    """The CLI on a pseudo-terminal that is its controlling terminal."""

    def __init__(self, cmd: list[str]):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.seen = b""

    def expect(self, what: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {what!r} on the terminal; it shows: {self.seen[-800:]!r}"
            r, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if r:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:               # EIO: the program closed the terminal
                    assert what in self.seen, f"terminal closed before {what!r}: {self.seen[-800:]!r}"

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self, timeout: float = 60) -> int | None:
        """The exit status, or None when it did not end in ``timeout`` (then it is killed)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


@pytest.mark.parametrize("answer", ["p", "k", "d"])
def test_terminal_session_prompt_ctrl_c_and_the_question_at_exit(adm, answer):
    t = Terminal(argv(adm, "shell", NAME))
    try:
        t.expect(PROMPT)
        t.send(b"touch /etc/made-in-shell && echo touched-$((1+1))\n")
        t.expect(b"touched-2")
        t.send(b"echo image=$SIDUS_IMAGE gen=$SIDUS_GENERATION\n")
        t.expect(b"image=img gen=2")
        t.send(b"\x03")                                   # Ctrl-C at the prompt: the session goes on
        time.sleep(0.5)
        t.send(b"echo alive-$((40+2))\n")
        t.expect(b"alive-42")
        t.send(b"false\n")
        t.send(b"exit\n")                                 # the last status is 1: no verdict on the work
        t.expect(b"[p]ublish")
        assert b"status 1" in t.seen
        t.send(answer.encode() + b"\n")
        t.expect(b"discarded" if answer == "d" else b"generation 2 complete")
        if answer == "k":
            t.expect(b"sidus-image drop img 2")
        rc = t.close()
    finally:
        if t.proc.poll() is None:
            t.close(timeout=5)
    assert rc == 0, t.seen[-800:]
    gen2 = adm.store.path(NAME, 2)
    if answer == "d":
        assert adm.store.numbers(NAME) == [1] and adm.store.leftovers(NAME) == ()
        assert b"discarded" in t.seen
        return
    assert (gen2 / "etc/made-in-shell").exists() and not (gen2 / ".sidus-image-shell.rc").exists()
    assert adm.store.meta(NAME, 2)["shell_status"] == 1
    if answer == "p":
        assert adm.store.current(NAME) == 2
    else:
        assert adm.store.current(NAME) == 1 and adm.store.meta(NAME, 2)["kept"] is True
        assert b"sidus-image publish img 2" in t.seen


def test_scripted_session_is_kept_then_continued_published_and_dropped(adm):
    r = cli(adm, "shell", NAME, stdin="touch /etc/x\necho in $SIDUS_IMAGE gen $SIDUS_GENERATION\nfalse\nexit\n")
    assert r.returncode == 0, r.stderr
    assert "in img gen 2" in r.stdout
    assert "sidus-image publish img 2" in r.stderr and "sidus-image drop img 2" in r.stderr
    assert adm.store.current(NAME) == 1 and (adm.store.path(NAME, 2) / "etc/x").exists()
    # gc keeps a kept session even when it is not among the newest
    r = cli(adm, "shell", NAME, stdin="touch /etc/other\n")                           # generation 3, kept
    assert r.returncode == 0, r.stderr
    assert cli(adm, "gc", NAME, "--keep", "0").returncode == 0
    assert adm.store.numbers(NAME) == [1, 2, 3]
    # continue generation 2 in generation 4, publish it
    r = cli(adm, "shell", NAME, "--from", "2", stdin="touch /etc/y\n")
    assert r.returncode == 0, r.stderr
    g4 = adm.store.path(NAME, 4)
    assert (g4 / "etc/x").exists() and (g4 / "etc/y").exists() and adm.store.meta(NAME, 4)["parent"] == 2
    r = cli(adm, "publish", NAME)                                  # the newest kept one
    assert r.returncode == 0 and "generation 4: switched; not confirmed served" in r.stdout, r.stderr
    assert adm.store.current(NAME) == 4 and adm.store.meta(NAME, 4)["kept"] is False
    # generation 3 was made on 1, and 4 is served now: publishing it would drop 4's changes
    r = cli(adm, "publish", NAME, "3")
    assert r.returncode == 1 and "would drop 4's changes" in r.stderr
    assert adm.store.current(NAME) == 4
    r = cli(adm, "drop", NAME, "3")
    assert r.returncode == 0, r.stderr
    assert adm.store.numbers(NAME) == [1, 2, 4]
    assert cli(adm, "drop", NAME, "4").returncode == 1               # the served one stays


def _hang_up(t: Terminal) -> int | None:
    """The terminal goes away (an ssh session dropped): the kernel sends SIGHUP to the CLI, the
    session leader, and to the terminal's foreground process group."""
    os.close(t.master)
    try:
        return t.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        t.proc.kill()
        t.proc.wait()
        return None


def _kept(adm: Administrator) -> None:
    assert adm.store.numbers(NAME) == [1, 2] and adm.store.leftovers(NAME) == ()
    assert adm.store.current(NAME) == 1 and adm.store.meta(NAME, 2)["kept"] is True
    assert (adm.store.path(NAME, 2) / "etc/made-in-shell").exists()


@pytest.mark.parametrize("how", ["ctrl-d", "ctrl-c", "hang-up"])
def test_no_answer_at_the_question_keeps_the_session(adm, how):
    """End of input (Ctrl-D), Ctrl-C or a hang-up at the question: kept, not served.  Before, the
    hang-up there raised the SystemExit of SIGHUP and the session was removed."""
    t = Terminal(argv(adm, "shell", NAME))
    try:
        t.expect(PROMPT)
        t.send(b"touch /etc/made-in-shell\nexit\n")
        t.expect(b"[p]ublish")
        if how == "hang-up":
            assert _hang_up(t) is not None, "the CLI did not end after the hang-up"
        else:
            t.send(b"\x04" if how == "ctrl-d" else b"\x03")
            t.expect(b"(no answer: kept)")
            t.expect(b"sidus-image publish img 2")
            assert t.close() == 0, t.seen[-800:]
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
    _kept(adm)


def test_hang_up_during_the_session_keeps_it(adm):
    t = Terminal(argv(adm, "shell", NAME))
    try:
        t.expect(PROMPT)
        t.send(b"touch /etc/made-in-shell && echo done-$((2+3))\n")
        t.expect(b"done-5")
        assert _hang_up(t) is not None, "the CLI did not end after the hang-up"
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
    _kept(adm)


def test_sigterm_during_the_session_stops_it_and_leaves_nothing(adm):
    """SIGTERM (kill, a shutdown) is not a hang-up: the session stops like any interrupted
    operation (docs/images.md "Interrupted"): the shell is stopped, the generation removed,
    nothing left mounted, and the CLI says so (exit 143)."""
    import signal
    t = Terminal(argv(adm, "shell", NAME))
    try:
        t.expect(PROMPT)
        t.send(b"touch /etc/made-in-shell && echo done-$((2+3))\n")
        t.expect(b"done-5")
        t.proc.send_signal(signal.SIGTERM)
        t.expect(b"no half-made generation is left")
        assert b"sidus-image: stopped by SIGTERM; the served generation is unchanged" in t.seen, t.seen[-800:]
        rc = t.close()
    finally:
        if t.proc.poll() is None:
            t.close(timeout=5)
    assert rc == 143, t.seen[-800:]
    assert adm.store.numbers(NAME) == [1] and adm.store.leftovers(NAME) == ()
    assert adm.store.current(NAME) == 1
