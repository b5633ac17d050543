"""storage/runner.py: real programs (sh, sleep) through Runner, and the fake."""

from __future__ import annotations

import asyncio
import os

import pytest
from conftest import poll_until

from sidusd.errors import BackendError
from sidusd.storage.runner import RecordingRunner, Result, Runner


def test_run_captures_rc_stdout_stderr():
    r = Runner().run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert r.rc == 3 and r.stdout == b"out\n" and r.stderr == b"err\n"
    assert r.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.duration_s >= 0


def test_argv_is_not_parsed_by_a_shell(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x")
    r = Runner().run(["echo", f"; rm {victim}"]).check()
    assert r.out == f"; rm {victim}\n"
    assert victim.exists()


def test_shell_string_refused():
    with pytest.raises(TypeError):
        Runner().run("echo hi")
    with pytest.raises(TypeError):
        Runner().run([])


def test_input_is_piped():
    assert Runner().run(["cat"], input=b"abc").stdout == b"abc"


def test_env_is_passed():
    r = Runner().run(["sh", "-c", 'printf %s "$SIDUS_T"'], env={"SIDUS_T": "v", "PATH": os.environ["PATH"]})
    assert r.out == "v"


def test_check_raises_with_stderr_detail():
    r = Runner().run(["sh", "-c", "echo 'exportfs: bad line' >&2; exit 1"])
    with pytest.raises(BackendError) as ei:
        r.check()
    assert ei.value.detail == "exportfs: bad line"
    assert "status 1" in str(ei.value)
    assert Runner().run(["true"]).check().ok


def test_missing_program_is_backend_error():
    with pytest.raises(BackendError) as ei:
        Runner().run(["/nonexistent/sidus-prog"])
    assert "cannot run /nonexistent/sidus-prog" in str(ei.value)




def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the shell starts a background grandchild, records its pid, then blocks
    with pytest.raises(BackendError) as ei:
        Runner().run(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; echo started >&2; wait"],
                     timeout_s=1)
    assert "timed out" in str(ei.value)
    assert "started" in ei.value.detail
    child = int(pidfile.read_text())
    poll_until(lambda: not _alive(child))       # SIGKILL is delivered asynchronously
    assert not _alive(child)


def test_arun_captures_and_times_out(tmp_path):
    async def main():
        r = await Runner().arun(["sh", "-c", "cat; exit 2"], input=b"zz")
        assert (r.rc, r.stdout) == (2, b"zz")
        pidfile = tmp_path / "p"
        with pytest.raises(BackendError, match="timed out"):
            await Runner().arun(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout_s=1)
        return int(pidfile.read_text())
    child = asyncio.run(main())
    poll_until(lambda: not _alive(child))
    assert not _alive(child)


def test_recording_runner_records_and_scripts():
    rr = RecordingRunner()
    rr.script(["exportfs"], rc=1, stderr=b"no")
    rr.script(["exportfs", "-v"], rc=0, stdout=b"list")
    assert rr.run(["exportfs", "-ra"]).rc == 1
    assert rr.run(["exportfs", "-v"]).stdout == b"list"     # longest prefix wins
    assert rr.run(["other"], input=b"i").rc == 0
    assert rr.calls == [["exportfs", "-ra"], ["exportfs", "-v"], ["other"]]
    assert rr.inputs == [None, None, b"i"]
    rr.results[("dyn",)] = lambda argv: Result(tuple(argv), len(argv))
    assert asyncio.run(rr.arun(["dyn", "a", "b"])).rc == 3
