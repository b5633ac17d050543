"""setup_logging writes to sys.stderr as it is at each line (a closed capture stream broke every
later log line of the process: ValueError "I/O operation on closed file", seen under xdist)."""

import io
import sys

from sidusd.observability import get_logger, setup_logging


def test_log_lines_follow_the_current_stderr(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("json", "info")
    get_logger("t").info("t.one")
    first.close()                             # e.g. pytest's capture of an earlier test
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    get_logger("t").warning("t.two", n=2)     # old code: ValueError (the closed stream)
    assert '"event": "t.two"' in second.getvalue() and '"n": 2' in second.getvalue()
