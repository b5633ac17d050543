"""``sidus-image shell``: an interactive shell in a new generation that never throws work away.

The shell runs in the chroot of the new generation (an overlay over the served one, or over
``--from N``).  Its prompt says where you are: ``(sidus-image NAME gen N) ...`` (an rc file
written into the root for the session, removed before the generation is published; bash reads
it with ``--rcfile`` after /etc/bash.bashrc and ~/.bashrc, a POSIX sh through ``$ENV``), and
``$SIDUS_IMAGE`` / ``$SIDUS_GENERATION`` are set.  Ctrl-C belongs to the shell: it never ends
the session.

When the shell ends, whatever its exit status (the status of the last command typed is no
verdict on the session), the session is decided by :func:`decide`:

* on a terminal, the admin is asked: **p**ublish (generation N is committed and served),
  **k**eep (committed, not served), **d**iscard (removed; only on this explicit answer);
* without a terminal (stdin a pipe or a file), or at end of input: keep.

A kept generation is complete and durable; ``gc`` never removes it.  ``sidus-image publish
NAME [N]`` serves it, ``sidus-image drop NAME N`` removes it, ``sidus-image shell NAME --from N``
continues it in a new generation (docs/images.md "sidus-image shell").
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sidusd.errors import BackendError
from sidusd.fsutil import atomic_write
from sidusd.image import publish
from sidusd.image.chroot import Chroot, ImageLock
from sidusd.image.lazylog import get_logger
from sidusd.storage.runner import Runner

if TYPE_CHECKING:
    from sidusd.image.build import Administrator

log = get_logger("image.shell")
RC_PATH = ".sidus-image-shell.rc"          # inside the root, for the session only
ANSWERS = {"p": "publish", "publish": "publish", "k": "keep", "keep": "keep", "d": "discard", "discard": "discard"}
SHELL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class Discarded(BackendError):
    """The admin chose to discard the session (the generation is removed)."""


def rc_file(name: str, number: int) -> bytes:
    """The session's rc file: the usual bash start-up files, then the prompt naming the image."""
    bash_ps1 = shlex.quote(f"(sidus-image {name} gen {number}) \\u@\\h:\\w\\$ ")
    sh_ps1 = shlex.quote(f"(sidus-image {name} gen {number}) # ")
    return (f"# sidus-image shell: generation {number} of {name} (removed when the shell ends)\n"
            'if [ -n "$BASH_VERSION" ]; then\n'
            "  [ -r /etc/bash.bashrc ] && . /etc/bash.bashrc\n"
            '  [ -r "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n'
            f"  PS1={bash_ps1}\n"
            "else\n"
            f"  PS1={sh_ps1}\n"
            "fi\n").encode()


def shell_argv(root: Path) -> list[str]:
    """bash with the session rc file when the image has bash, else sh (which reads ``$ENV``)."""
    if (root / "bin/bash").exists() or (root / "usr/bin/bash").exists():
        return ["/bin/bash", "--rcfile", f"/{RC_PATH}", "-i"]
    return ["/bin/sh", "-i"]


def shell_env(name: str, number: int) -> dict[str, str]:
    return {"PATH": SHELL_PATH, "TERM": os.environ.get("TERM", "vt100"), "HOME": "/root",
            "ENV": f"/{RC_PATH}", "SIDUS_IMAGE": name, "SIDUS_GENERATION": str(number),
            "PS1": f"(sidus-image {name} gen {number}) # "}


@contextlib.contextmanager
def _noted(signals: tuple[int, ...], ignore_once_noted: bool = False) -> Iterator[list[int]]:
    """While inside, ``signals`` are only noted (in the list yielded).  Ctrl-C at the terminal
    reaches the shell (our whole process group gets it): nothing to do here.  A hang-up (the ssh
    session dropped) ends the shell, and is noted from the chroot's set-up to the question: the
    session is then kept; ``ignore_once_noted``: and ignored for the rest of the command (the
    terminal is gone; the kernel may send it twice, and a second one must not undo the keep
    during the commit).  Python handlers, not SIG_IGN, so the shell's programs get the
    defaults again."""
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signals}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN if ignore_once_noted and got else h)


def _take_terminal(fd: int) -> None:
    """Be the terminal's foreground process group again (a job-control shell that exited may
    have left its own there: reading the answer would stop us with SIGTTIN)."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass                                    # not our controlling terminal: nothing to take
    finally:
        signal.signal(signal.SIGTTOU, old)


class _HungUp(Exception):
    """SIGHUP while the question waits (the terminal went away)."""


def decide(rc: int, number: int, stdin: TextIO, out: TextIO, hung_up: list[int] | None = None) -> str:
    """``publish``, ``keep`` or ``discard``: asked on a terminal, else ``keep``; end of input,
    Ctrl-C or a hang-up (SIGHUP, or the terminal gone: EIO) at the question keep it too (before,
    SIGHUP there raised the image commands' SystemExit and the session was removed).  Every
    SIGHUP is noted in ``hung_up``; only the first one interrupts (the kernel may send two)."""
    if not stdin.isatty():
        return "keep"
    got = hung_up if hung_up is not None else []
    seen_before = len(got)

    def on_hang_up(signum, frame) -> None:
        got.append(signum)
        if len(got) == seen_before + 1:
            raise _HungUp

    old = signal.signal(signal.SIGHUP, on_hang_up)
    try:
        try:
            _take_terminal(stdin.fileno())
            while True:
                try:
                    print(f"\nThe shell ended (status {rc}). Generation {number}: [p]ublish and serve it, "
                          "[k]eep it for later (not served), [d]iscard it? ", end="", file=out, flush=True)
                    line = stdin.readline()
                except (KeyboardInterrupt, OSError):
                    line = ""
                if not line:
                    with contextlib.suppress(OSError):
                        print("(no answer: kept)", file=out, flush=True)
                    return "keep"               # end of input, Ctrl-C: nothing is thrown away
                answer = ANSWERS.get(line.strip().lower())
                if answer:
                    return answer
        except _HungUp:
            return "keep"                       # hang-up: nobody to ask, nothing is thrown away
    finally:
        signal.signal(signal.SIGHUP, old)


def how_to(name: str, number: int) -> str:
    return (f"{name}: generation {number} is kept, not served.  Serve it: sidus-image publish {name} {number}; "
            f"continue it: sidus-image shell {name} --from {number}; remove it: sidus-image drop {name} {number}")


def shell_work(name: str, runner: Runner, stdin: TextIO, out: TextIO) -> Callable[[Path, Path], dict]:
    """The ``work`` of :meth:`Administrator._new_generation` for an interactive shell."""
    def work(part: Path, logfile: Path) -> dict:
        number = int(part.name.removesuffix(".partial").removeprefix("gen-"))
        rc_path = part / RC_PATH
        with _noted((signal.SIGHUP,), ignore_once_noted=True) as hung_up:
            with Chroot(part, runner, logfile) as ch:
                atomic_write(rc_path, rc_file(name, number), 0o644)
                try:
                    with _noted((signal.SIGINT,)):
                        # the one program not run through Runner: it needs the terminal
                        rc = subprocess.call(ch.argv(shell_argv(part)), env=shell_env(name, number))
                finally:
                    rc_path.unlink(missing_ok=True)
            choice = "keep" if hung_up else decide(rc, number, stdin, out, hung_up)
        log.info("image.shell.ended", image=name, generation=number, status=rc, choice=choice)
        if choice == "discard":
            raise Discarded(f"{name}: generation {number} discarded, as asked")
        meta: dict = {"command": ["shell"], "shell_status": rc, "kept": choice == "keep"}
        meta.update(publish.boot_meta(part))
        return meta
    return work


def kept(adm: Administrator, name: str) -> list[int]:
    """Generations kept by a shell session and not served since (never removed by gc)."""
    cur = adm.store.current(name)
    return [n for n in adm.store.numbers(name) if n != cur and adm.store.meta(name, n).get("kept")]


def _unkeep(adm: Administrator, name: str, number: int) -> None:
    meta = adm.store.meta(name, number)
    if meta.get("kept"):
        meta["kept"] = False
        atomic_write(adm.store.image_dir(name) / "meta" / f"gen-{number:04d}.json",
                     (json.dumps(meta, indent=1) + "\n").encode())


def publish_kept(adm: Administrator, name: str, number: int | None = None, force: bool = False) -> int:
    """Serve a kept generation (the newest one by default); refused when a generation newer
    than the one it was made on is served now (its changes are not in it), unless ``force``."""
    with ImageLock(adm.store.image_dir(name), "publish"):
        waiting = kept(adm, name)
        if number is None:
            if not waiting:
                raise BackendError(f"image {name} has no kept generation to publish")
            number = max(waiting)
        if number not in adm.store.numbers(name):
            raise BackendError(f"image {name} has no generation {number}")
        parent, cur = adm.store.meta(name, number).get("parent"), adm.store.current(name)
        if not force and cur is not None and parent is not None and cur > parent and cur != number:
            raise BackendError(f"{name}: generation {number} was made on generation {parent}, and generation "
                               f"{cur} is served now: publishing {number} would drop {cur}'s changes",
                               detail=f"continue it on top instead (sidus-image shell {name} --from {number}), "
                                      "or publish --force")
        adm.serve(name, number)
        _unkeep(adm, name, number)
        return number


def drop(adm: Administrator, name: str, number: int) -> None:
    """Remove generation ``number`` (not the served one): out of the images file, then off the disk."""
    with ImageLock(adm.store.image_dir(name), "drop"):
        if number not in adm.store.numbers(name):
            raise BackendError(f"image {name} has no generation {number}")
        if number == adm.store.current(name):
            raise BackendError(f"image {name}: generation {number} is served; roll back first")
        adm.write_images_file({name: {number}})
        adm.store.remove(name, number)
        publish.unpublish_generation(adm.tftp_root, name, number)
        log.info("image.generation.removed", image=name, generation=number, why="drop")
