"""The one way sidus runs an external program.

Every program (``exportfs``, ``ganesha.nfsd``, ``tgtadm``, ``mkinitramfs`` ...)
is called through a :class:`Runner` with an argv list, never a shell string,
so no argument is ever re-parsed by a shell.  Each call has a timeout; on
timeout the whole process group is killed (a program that forked helpers does
not leave them behind) and :class:`~sidusd.errors.BackendError` is raised.

:class:`RecordingRunner` is the fake for unit tests: it records each argv and
answers from a script of results, so backends are tested without the programs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sidusd.errors import BackendError

MAX_OUTPUT_BYTES = 4 * 1024 * 1024   # stdout/stderr kept per call (tail beyond)
DETAIL_CHARS = 2000                  # stderr characters carried into BackendError


def _check_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("argv must be a non-empty list of strings, not a shell string")
    out = [os.fspath(a) for a in argv]
    if not all(isinstance(a, str) for a in out):
        raise TypeError(f"argv items must be str or path-like: {argv!r}")
    return out


def _tail(data: bytes, limit: int = MAX_OUTPUT_BYTES) -> bytes:
    return data if len(data) <= limit else data[-limit:]


@dataclass(frozen=True)
class Result:
    """What a finished program returned: exit code, output, wall time."""

    argv: tuple[str, ...]
    rc: int
    stdout: bytes = b""
    stderr: bytes = b""
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def out(self) -> str:
        """stdout decoded (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        """stderr decoded (UTF-8, undecodable bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")

    def check(self) -> Result:
        """Return self if rc == 0, else raise BackendError with stderr as detail."""
        if self.rc != 0:
            detail = (self.err.strip() or self.out.strip())[-DETAIL_CHARS:]
            raise BackendError(f"{self.argv[0]} exited with status {self.rc}", detail=detail)
        return self


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Runner:
    """Runs programs as argv lists in their own process group, with a timeout."""

    def run(self, argv: Sequence[str], timeout_s: float = 30, input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> Result:
        """Run ``argv`` to completion; raise BackendError if it cannot start or times out.

        A non-zero exit is *not* an exception: call :meth:`Result.check`.
        """
        args = _check_argv(argv)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=dict(env) if env is not None else None, start_new_session=True)
        except OSError as e:
            raise BackendError(f"cannot run {args[0]}", detail=str(e)) from e
        try:
            out, err = proc.communicate(input=input, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            try:
                _, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:   # a helper left its group and holds the pipe
                proc.kill()
                proc.wait()
                err = b""
            raise BackendError(f"{args[0]} timed out after {timeout_s:g} s and was killed",
                               detail=_tail(err).decode("utf-8", "replace")[-DETAIL_CHARS:]) from None
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        return Result(tuple(args), proc.returncode, _tail(out), _tail(err),
                      round(time.monotonic() - start, 6))

    async def arun(self, argv: Sequence[str], timeout_s: float = 30, input: bytes | None = None,
                   env: Mapping[str, str] | None = None) -> Result:
        """Asyncio form of :meth:`run` (same semantics; cancellation kills the group)."""
        import asyncio  # here: a synchronous user (sidus-image) does not import it
        args = _check_argv(argv)
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=dict(env) if env is not None else None, start_new_session=True)
        except OSError as e:
            raise BackendError(f"cannot run {args[0]}", detail=str(e)) from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout_s)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            raise BackendError(f"{args[0]} timed out after {timeout_s:g} s and was killed") from None
        except BaseException:
            _kill_group(proc.pid)
            await proc.wait()
            raise
        return Result(tuple(args), proc.returncode if proc.returncode is not None else -1,
                      _tail(out), _tail(err), round(time.monotonic() - start, 6))


Responder = Callable[[list[str]], Result]


@dataclass
class RecordingRunner(Runner):
    """Unit-test fake: records every argv and answers from a script.

    ``results`` maps an argv prefix (tuple) to a :class:`Result` or a callable
    ``argv -> Result``; the longest matching prefix wins.  Unmatched calls
    return ``default`` (rc 0, no output).  ``inputs`` records what was piped in.
    """

    results: dict[tuple[str, ...], Result | Responder] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    inputs: list[bytes | None] = field(default_factory=list)
    default_rc: int = 0

    def script(self, prefix: Sequence[str], rc: int = 0, stdout: bytes = b"",
               stderr: bytes = b"") -> None:
        """Answer calls starting with ``prefix`` with this exit code and output."""
        self.results[tuple(prefix)] = Result(tuple(prefix), rc, stdout, stderr)

    def _answer(self, args: list[str], input: bytes | None) -> Result:
        self.calls.append(args)
        self.inputs.append(input)
        best: tuple[str, ...] | None = None
        for prefix in self.results:
            if tuple(args[:len(prefix)]) == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            return Result(tuple(args), self.default_rc)
        answer = self.results[best]
        res = answer(args) if callable(answer) else answer
        return Result(tuple(args), res.rc, res.stdout, res.stderr, 0.0)

    def run(self, argv, timeout_s=30, input=None, env=None) -> Result:
        return self._answer(_check_argv(argv), input)

    async def arun(self, argv, timeout_s=30, input=None, env=None) -> Result:
        return self._answer(_check_argv(argv), input)
