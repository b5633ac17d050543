"""netascii as a stream: the converted text read by offset, a block at a time (pure).

RFC 1350 section 1 (and RFC 764): in ``netascii`` mode LF goes on the wire as
CR LF and a bare CR as CR NUL; every local byte becomes one or two.  Converting
a whole file in memory costs up to twice its size per request, so
:class:`NetasciiSource` converts on demand: a read at converted offset ``o``
starts from a *checkpoint* (the local offset whose conversion begins at ``o``,
and whether the first converted byte of it was already sent: a CR LF or CR NUL
pair may straddle two blocks, the *carry*) and records the checkpoint where it
ends.  A transfer reads forward and goes back at most a window, so the
checkpoints it needs are the ones just recorded (``CHECKPOINTS`` kept, plus
offset 0); an older offset is reached again by converting forward from the
nearest earlier one, a bounded chunk at a time.

The converted size (what ``tsize`` reports and what fixes the last block) is
:func:`converted_size` over the raw size and the counts of CR and LF, which
the edge takes off the event loop (:func:`count_chunk` per chunk).

The source is not ``contiguous``: a session reads it a block at a time, and
the C lockstep engine (which is handed contiguous runs only) leaves netascii
transfers to the Python path.
"""

from __future__ import annotations

import bisect

from .tftp_records import Source

CHECKPOINTS = 256           # recent block starts remembered (a window goes back at most 64 blocks)
_CHUNK = 64 * 1024          # local bytes converted at once when going forward to an old offset


def convert(raw: bytes) -> bytes:
    """Local text to netascii: CR -> CR NUL, then LF -> CR LF (RFC 1350 section 1)."""
    return raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def count_chunk(raw: bytes) -> int:
    """How many bytes the conversion adds to ``raw`` (one per CR and per LF)."""
    return raw.count(b"\r") + raw.count(b"\n")


def converted_size(raw_size: int, added: int) -> int:
    """The netascii size of a file of ``raw_size`` bytes whose chunks added ``added`` in all."""
    return raw_size + added


def _grown(raw: bytes, i: int) -> int:
    """Converted length of ``raw[:i]``."""
    return i + raw.count(b"\r", 0, i) + raw.count(b"\n", 0, i)


class NetasciiSource:
    """The netascii conversion of ``raw`` (a :class:`Source` of local text), read by offset.

    ``size`` is the converted size (:func:`converted_size`), given by the caller
    who counted it.  Memory: one block's worth of text per read, and the
    checkpoints (``CHECKPOINTS`` pairs of ints).
    """

    contiguous = False

    def __init__(self, raw: Source, size: int):
        self.raw = raw
        self.size = size
        # converted offset -> (local offset, converted bytes of that local byte already sent)
        self._keys: list[int] = [0]
        self._points: dict[int, tuple[int, int]] = {0: (0, 0)}

    def _remember(self, offset: int, point: tuple[int, int]) -> None:
        if offset in self._points:
            return
        keys = self._keys
        if not keys or offset > keys[-1]:
            keys.append(offset)
        else:
            bisect.insort(keys, offset)
        self._points[offset] = point
        if len(keys) > CHECKPOINTS + 1:         # keep offset 0 and the newest ones
            del self._points[keys.pop(1)]

    def _produce(self, point: tuple[int, int], n: int) -> tuple[bytes, tuple[int, int]]:
        """``n`` converted bytes from ``point`` (fewer at the end) and the point after them."""
        at, skip = point
        raw = self.raw.read_block(at, n + skip)     # each local byte gives at least one
        out = convert(raw)[skip:skip + n]
        if len(out) < n:                        # the end of the text
            return out, (at + len(raw), 0)
        target = skip + n                       # converted bytes from ``at`` to the next point
        lo, hi = 0, len(raw)                    # the largest i with _grown(raw, i) <= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _grown(raw, mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        return out, (at + lo, target - _grown(raw, lo))

    def read_block(self, offset: int, size: int) -> bytes:
        """The converted bytes ``[offset, offset + size)`` (fewer at the end)."""
        if offset >= self.size or size <= 0:
            return b""
        size = min(size, self.size - offset)
        keys = self._keys
        start = keys[bisect.bisect_right(keys, offset) - 1]
        point = self._points[start]
        while start < offset:                   # forward from an older checkpoint
            step = min(_CHUNK, offset - start)
            got, point = self._produce(point, step)
            if len(got) < step:
                raise OSError(5, "the text is shorter than its counted netascii size")  # EIO
            start += step
        out, after = self._produce(point, size)
        if len(out) < size:
            raise OSError(5, "the text is shorter than its counted netascii size")  # EIO
        self._remember(offset, point)
        self._remember(offset + len(out), after)
        return out
