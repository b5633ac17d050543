"""sidusd.net.files.ReadAheadSource: the same bytes as the file, whatever the order of reads."""

from __future__ import annotations

import errno
import os
import random

import pytest

from sidusd.net.files import ReadAheadSource, open_confined


def source(tmp_path, data: bytes, readahead: int = 4096) -> ReadAheadSource:
    (tmp_path / "f").write_bytes(data)
    fd, size = open_confined(tmp_path, ("f",))
    return ReadAheadSource(fd, size, readahead=readahead)


@pytest.mark.parametrize("blksize", [512, 1468, 8192])
def test_sequential_blocks_equal_the_file(tmp_path, blksize):
    data = os.urandom(50_000)
    src = source(tmp_path, data)
    got = [src.read_block(off, blksize) for off in range(0, len(data) + 1, blksize)]
    assert b"".join(got) == data
    assert all(len(g) == blksize for g in got[:-1]) and len(got[-1]) < blksize
    src.close()


def test_random_reads_equal_the_file(tmp_path):
    data = os.urandom(30_001)
    src = source(tmp_path, data, readahead=1000)
    rng = random.Random(7)
    for _ in range(2000):
        off, size = rng.randrange(0, len(data) + 10), rng.randrange(1, 5000)
        assert src.read_block(off, size) == data[off:off + size], (off, size)
    src.close()


def test_windows_go_back_and_forth(tmp_path):
    """Go-back-N re-reads an earlier window: it must come from the file again, not the buffer tail."""
    data = os.urandom(200_000)
    src = source(tmp_path, data, readahead=65536)
    w = 16 * 1468
    assert src.read_block(0, w) == data[:w]
    assert src.read_block(w, w) == data[w:2 * w]
    assert src.read_block(5 * 1468, w) == data[5 * 1468:5 * 1468 + w]
    assert src.read_block(100_000, w) == data[100_000:100_000 + w]
    assert src.read_block(3, 10) == data[3:13]
    src.close()


def test_empty_file_and_end_of_file(tmp_path):
    src = source(tmp_path, b"")
    assert src.size == 0 and src.read_block(0, 512) == b""
    src.close()
    src = source(tmp_path, b"x" * 1024)
    assert src.read_block(1024, 512) == b"" and src.read_block(512, 512) == b"x" * 512
    src.close()


def test_a_file_that_shrinks_is_an_error(tmp_path):
    data = os.urandom(300_000)
    src = source(tmp_path, data, readahead=65536)
    assert src.read_block(0, 1468) == data[:1468]
    os.truncate(tmp_path / "f", 100_000)
    assert src.read_block(1468, 1468) == data[1468:2936]     # still in the buffer: as read
    with pytest.raises(OSError) as exc:
        src.read_block(90_000, 1468)                          # needs bytes that are gone
    assert exc.value.errno == errno.EIO
    src.close()
