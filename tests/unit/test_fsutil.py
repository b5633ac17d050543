"""sidusd.fsutil: atomic replacement and durable appends, with failures injected and a real full disk."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_root, require_tool

from sidusd import fsutil
from sidusd.fsutil import FileWriteError, append_durable, atomic_write


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".sidus-tmp"))


@pytest.fixture
def umask_077():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o400])
def test_atomic_write_sets_exact_mode(tmp_path, umask_077, mode):
    f = tmp_path / "f"
    atomic_write(f, b"data", mode)
    assert f.read_bytes() == b"data"
    assert f.stat().st_mode & 0o7777 == mode          # not reduced by the umask
    assert _leftovers(tmp_path) == []


def test_atomic_write_default_mode_and_replacement(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"old")
    old_inode = f.stat().st_ino
    atomic_write(f, b"new content")
    assert f.read_bytes() == b"new content"
    assert f.stat().st_mode & 0o7777 == 0o644
    assert f.stat().st_ino != old_inode                # a new file was renamed in, not rewritten in place
    atomic_write(f, b"")
    assert f.read_bytes() == b""


def _fail_after(monkeypatch, n_bytes: int, err: int):
    """os.write that writes up to ``n_bytes`` in total, then fails with ``err``."""
    real = os.write
    state = {"left": n_bytes}

    def write(fd, data):
        if state["left"] <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(data)[:state["left"]])
        state["left"] -= n
        return n
    monkeypatch.setattr(fsutil.os, "write", write)


def test_failure_mid_write_keeps_old_content(tmp_path, monkeypatch):
    f = tmp_path / "inventory.yaml"
    f.write_bytes(b"old content\n")
    _fail_after(monkeypatch, 5, errno.ENOSPC)
    with pytest.raises(FileWriteError) as exc:
        atomic_write(f, b"new content that does not fit\n" * 100)
    assert exc.value.errno == errno.ENOSPC
    assert "no space left on device" in str(exc.value) and str(f) in str(exc.value)
    assert f.read_bytes() == b"old content\n"
    assert _leftovers(tmp_path) == []


def test_failure_in_fsync_keeps_old_content(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_bytes(b"old")

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    with pytest.raises(FileWriteError, match="Input/output error"):
        atomic_write(f, b"new")
    assert f.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_interrupt_mid_write_removes_temp(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_bytes(b"old")

    def write(fd, data):
        raise KeyboardInterrupt
    monkeypatch.setattr(fsutil.os, "write", write)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(f, b"new")
    assert f.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileWriteError) as exc:
        atomic_write(tmp_path / "no" / "f", b"x")
    assert exc.value.errno == errno.ENOENT and "create a temporary file" in str(exc.value)
    assert isinstance(exc.value, OSError)             # callers catching OSError keep working
    assert exc.value.filename == str(tmp_path / "no" / "f")


def test_append_durable(tmp_path, umask_077):
    j = tmp_path / "leases.jsonl"
    append_durable(j, b'{"a":1}\n')
    append_durable(j, b'{"b":2}')                       # newline added
    assert j.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert j.stat().st_mode & 0o7777 == 0o600
    k = tmp_path / "k"
    append_durable(k, b"x\n", mode=0o640)
    assert k.stat().st_mode & 0o7777 == 0o640


def test_append_failure_leaves_no_half_record(tmp_path, monkeypatch):
    j = tmp_path / "j"
    append_durable(j, b"first\n")
    _fail_after(monkeypatch, 3, errno.ENOSPC)
    with pytest.raises(FileWriteError) as exc:
        append_durable(j, b"second record\n")
    assert exc.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert j.read_bytes() == b"first\n"
    append_durable(j, b"third\n")
    assert j.read_bytes() == b"first\nthird\n"


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB tmpfs, so writes hit a real ENOSPC."""
    require_root()
    mount = require_tool("mount")
    umount = require_tool("umount")
    d = tmp_path / "tiny"
    d.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=64k,mode=0700", "sidus-test", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run([umount, str(d)], check=True)


def test_real_full_disk(tiny_fs):
    f = tiny_fs / "sidus.exports"
    atomic_write(f, b"old exports\n")
    with pytest.raises(FileWriteError) as exc:
        atomic_write(f, b"x" * (1024 * 1024))
    assert exc.value.errno == errno.ENOSPC and "no space left on device" in str(exc.value)
    assert f.read_bytes() == b"old exports\n"
    assert _leftovers(tiny_fs) == []
    j = tiny_fs / "journal"
    append_durable(j, b"one\n")
    with pytest.raises(FileWriteError):
        append_durable(j, b"y" * (1024 * 1024))
    assert j.read_bytes() == b"one\n"


def test_remove_stale_temps_only_of_dead_writers(tmp_path):
    import subprocess

    from sidusd import fsutil
    target = tmp_path / "inventory.yaml"
    target.write_text("x")
    dead = subprocess.Popen(["true"])
    dead.wait()
    prefix, suffix = fsutil._TMP_PREFIX, fsutil._TMP_SUFFIX
    stale = tmp_path / f"{prefix}inventory.yaml.{dead.pid}.abcd{suffix}"
    live = tmp_path / f"{prefix}inventory.yaml.{os.getppid()}.abcd{suffix}"
    other = tmp_path / f"{prefix}other.yaml.{dead.pid}.abcd{suffix}"
    for p in (stale, live, other):
        p.write_text("partial")
    assert fsutil.remove_stale_temps(target) == 1
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "x"
