"""One TFTP read transfer as a pure state machine (aioquic / h11 style).

Time is an argument: the edge calls :meth:`ReadSession.start`,
:meth:`ReadSession.receive` and :meth:`ReadSession.handle_timer` with ``now``
(seconds, any monotonic origin), then sends :meth:`ReadSession.datagrams_to_send`
and arms one timer at :meth:`ReadSession.next_timer`.  No socket, no clock here.

Behaviour (RFC 1350 section 6, RFC 2347, RFC 7440 section 4):

* with options accepted, the OACK goes first and the transfer waits for ACK 0;
* DATA blocks go out a window (``windowsize`` blocks) at a time; the transfer
  waits for the ACK of the window's last block.  An ACK for an earlier block of
  the window moves the window start after it; the first such ACK of a flight
  also resends from there (go-back-N, RFC 7440 section 4), later ones in the
  same flight only slide the window (see :meth:`ReadSession._on_ack`: this is
  what keeps duplicated or reordered DATA from multiplying the traffic);
* only an ACK that advances the window, or a timeout, causes sending: a
  duplicated or stale ACK is ignored (no Sorcerer's Apprentice, RFC 1123
  section 4.2.3.1).  One exception: after a timeout, a repeat of the last ACK
  means the peer is still waiting for the window start; it is answered with
  that window at once, once per timer round;
* the retransmission timer backs off (RFC 1123 section 4.2.3.2): ``timeout_s``,
  then twice, four, eight times it after consecutive timeouts without progress;
* block numbers are 16 bits on the wire and roll over from 65535 to 0 (what
  iPXE, curl, atftp and busybox expect); internally blocks are absolute;
* a timeout resends the OACK or the whole unacknowledged window; after
  ``retries`` timeouts in a row without progress the transfer fails;
* whatever timeout the peer negotiated (RFC 2349 allows 255 s, 8x that with the
  backoff), a peer without progress for ``max_silence_s`` ends it (``timeout``);
* :attr:`ReadSession.confirmed`: the peer acknowledged something (ACK 0 of
  the OACK or a DATA block), i.e. it receives what is sent to its address (a
  request with a spoofed source never gets there);
* an ERROR from the peer ends the transfer.  An ERROR in reply to the OACK
  (UEFI firmware probing ``tsize`` then aborting with code 8) is a normal end,
  outcome ``probe``, not an error;
* any other packet (DATA, RRQ, WRQ, OACK) is answered with ERROR 4 and ends it.

The last block is always shorter than ``blksize`` (an empty block when the
size is a multiple of it), RFC 1350 section 6.
"""

from __future__ import annotations

from . import tftp
from .tftp_records import _OP_DATA, BytesSource, LockstepRun, Source, TransferSummary, _pack_hdr

__all__ = ["BytesSource", "LockstepRun", "ReadSession", "Source", "TransferSummary"]

_WAIT_OACK, _DATA, _DONE = "wait-oack-ack", "data", "done"


class ReadSession:
    """A read transfer of ``source`` (RFC 1350 section 6, RFC 2347, RFC 7440)."""

    def __init__(self, source: Source, blksize: int = tftp.DEFAULT_BLKSIZE,
                 windowsize: int = 1, timeout_s: float = 1.0, retries: int = 5,
                 oack: tuple[tuple[str, str], ...] = (), max_silence_s: float | None = None):
        if not tftp.BLKSIZE_MIN <= blksize <= tftp.BLKSIZE_MAX:
            raise ValueError(f"blksize {blksize} outside 8..65464")
        if not 1 <= windowsize <= tftp.WINDOWSIZE_MAX:
            raise ValueError(f"windowsize {windowsize} outside 1..65535")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        if max_silence_s is not None and max_silence_s <= 0:
            raise ValueError("max_silence_s must be > 0")
        self.source = source
        self.blksize = blksize
        self.windowsize = windowsize
        self.timeout_s = float(timeout_s)
        self.retries = retries
        self.max_silence_s = max_silence_s
        self._heard = 0.0       # when the peer last made progress (or the start)
        self.confirmed = False  # the peer acknowledged something (it gets what we send)
        self._oack = tftp.encode(tftp.OACK(tuple(oack))) if oack else None
        self._last = source.size // blksize + 1      # number of blocks, >= 1
        self._state = _WAIT_OACK if self._oack else _DATA
        self._base = 1          # first unacknowledged block (absolute)
        self._next = 1          # next block to send (absolute)
        self._max_sent = 0      # highest block ever sent
        self._recover = 0       # max_sent at the last go-back: no other go-back up to it
        self._rescue = False    # a repeat of the last ACK may resend once (after a timeout)
        self._control: list[bytes] = []
        self._deadline: float | None = None
        self._tries = 0
        self._run: LockstepRun | None = None    # the last lockstep_run (its steps may be reported)
        self._started: float | None = None
        self._ended: float | None = None
        self.retransmits = 0
        self.ignored_acks = 0
        self.outcome = "running"
        self.error: str | None = None

    # -- state ---------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the transfer has ended (whatever the outcome)."""
        return self._state == _DONE

    @property
    def bytes_acked(self) -> int:
        return min(self.source.size, (self._base - 1) * self.blksize)

    def start(self, now: float) -> None:
        """Begin: the OACK (RFC 2347) or the first window of DATA is ready to send."""
        self._started = self._heard = now
        if self._oack:
            self._control.append(self._oack)

    def _finish(self, now: float, outcome: str, error: str | None = None) -> None:
        self._state = _DONE
        self._ended = now
        self._deadline = None
        self.outcome = outcome
        self.error = error

    def abort(self, now: float, message: str, code: int = tftp.ERR_UNDEFINED) -> None:
        """End the transfer from our side, telling the peer with an ERROR (RFC 1350 section 7)."""
        if self.done:
            return
        self._control.append(tftp.error_packet(code, message))
        self._finish(now, "stopped", message)

    def evict(self, now: float) -> None:
        """End an unconfirmed transfer to make room (outcome ``evicted``), sending nothing:
        its request's source never acknowledged anything, so it is likely forged."""
        if not self.done:
            self._finish(now, "evicted", "evicted before the peer acknowledged anything")

    # -- input ---------------------------------------------------------------
    def receive(self, packet: tftp.Packet, now: float) -> None:
        """Handle one decoded packet from the peer's TID (RFC 1350 section 4)."""
        if self.done:
            return
        if type(packet) is tftp.ACK:
            self._on_ack(packet.block, now)
        elif isinstance(packet, tftp.ERROR):
            if self._state == _WAIT_OACK:
                # RFC 2347: the client may refuse the OACK with ERROR 8; UEFI
                # PXE does it on purpose after learning tsize.  A normal end.
                self._finish(now, "probe")
            else:
                self._finish(now, "peer-error", f"peer error {packet.code}: {packet.message[:200]}")
        else:
            name = type(packet).__name__
            self._control.append(tftp.error_packet(tftp.ERR_ILLEGAL, f"unexpected {name} during a read"))
            self._finish(now, "illegal", f"peer sent {name}")

    def receive_ack(self, block: int, now: float) -> None:
        """Same as :meth:`receive` with ``ACK(block)`` (RFC 1350 section 5), without the object.

        The edge's fast path: an ACK is 4 bytes the edge can read itself.
        """
        if not self.done:
            self._on_ack(block & 0xFFFF, now)

    def ack_lockstep(self, block: int, now: float) -> bytes | None:
        """The common lockstep step in one call: ACK of the one block in flight -> the next DATA.

        Equivalent to ``receive_ack(block, now)`` then ``datagrams_to_send(now)``
        when that pair would return exactly one new DATA block (windowsize 1,
        the ACK names the block in flight, the transfer goes on, nothing else
        is pending).  In every other case it changes nothing and returns None:
        the caller then takes the general path.  This is the one thing a
        PXE ROM or iPXE transfer does ~7000 times per 10 MB, so it is worth
        one method instead of five.  A read error (``OSError``) propagates
        before any state changes.
        """
        b = self._max_sent
        if (block != (b & 0xFFFF) or b != self._base or self._next != b + 1 or self.windowsize != 1
                or b >= self._last or self._state != _DATA or self._control):
            return None
        bs = self.blksize
        out = _pack_hdr(_OP_DATA, (b + 1) & 0xFFFF) + self.source.read_block(b * bs, bs)
        self._base = self._max_sent = b + 1
        self._next = b + 2
        self._tries = 0
        self._rescue = False
        self._heard = now
        self.confirmed = True
        self._deadline = self._capped(now + self.timeout_s)
        return out

    def _lockstep_ready(self) -> bool:
        """A whole window in flight (in lockstep: the one block), its last block's ACK awaited,
        nothing else pending: the ACK of that block sends the next window, and nothing else."""
        b = self._max_sent
        return (b == self._base + self.windowsize - 1 and self._next == b + 1
                and self._base <= b < self._last and self._state == _DATA and not self._control)

    def lockstep_awaits(self, block: int) -> bool:
        """Whether an ACK of ``block`` (16 bits) ends the window in flight (see :meth:`lockstep_run`)."""
        return block == self._max_sent & 0xFFFF and self._lockstep_ready()

    @property
    def step_blocks(self) -> int:
        """The blocks the ACK :meth:`lockstep_awaits` sends: the next window, or the file's rest."""
        return min(self.windowsize, self._last - self._max_sent)

    def lockstep_run(self, max_bytes: int, head: int | None = None) -> LockstepRun | None:
        """The next steps decided now, about ``max_bytes`` of DATA (at least one window).

        A step is what the ACK of a window's last block sends: the next window (in
        lockstep one block).  None unless such an ACK would do only that (a whole
        window in flight, nothing else pending) and the source reads contiguous runs.
        Reads the run's blocks at once, or with ``head`` only the first ``head`` of
        them (the edge reads the others itself: :class:`LockstepRun`); a read error
        propagates.  The session hears of the steps from :meth:`lockstep_advance`.
        """
        if not self._lockstep_ready() or not getattr(self.source, "contiguous", False):
            return None
        b, bs, w = self._max_sent, self.blksize, self.windowsize
        steps = -(-max(1, -(-max_bytes // bs)) // w)            # whole windows for max_bytes
        count = min(steps * w, self._last - b)                  # ... or the file's rest
        size = min(count * bs, self.source.size - b * bs)
        want = size if head is None else min(size, max(0, head) * bs)
        data = self.source.read_block(b * bs, want) if want else b""
        if len(data) != want:
            raise OSError(5, "short read from the transfer's source")    # EIO
        self._run = LockstepRun(b, data, bs, count, size, w)
        return self._run

    def lockstep_advance(self, run: LockstepRun, blocks: int, now: float) -> None:
        """Record that the steps of ``run`` sent ``blocks`` blocks in all, the last at ``now``.

        Afterwards the session is exactly as after the ACKs of those steps
        (``receive_ack``, ``datagrams_to_send``; in lockstep, :meth:`ack_lockstep`),
        the last at ``now``.  The same total again changes nothing (an edge may
        report a run's progress more than once).  ``ValueError``: not the last
        run made, a count outside it or not at a step's end, or a session that
        moved in between (report a run's steps before anything else touches it).
        """
        if run is not self._run:
            raise ValueError("lockstep_advance: not the session's current run")
        w = run.window
        if not 0 <= blocks <= run.count or (blocks % w and blocks != run.count):
            raise ValueError(f"lockstep_advance: {blocks} blocks of a run of {run.count} "
                             f"in steps of {w}")
        b = run.ack + blocks
        if b == self._max_sent:
            return
        if (not self._lockstep_ready() or not run.ack <= self._max_sent < b
                or (self._max_sent - run.ack) % w):
            raise ValueError(f"lockstep_advance: the session is at block {self._max_sent}, "
                             f"not on the run from {run.ack} to {b}")
        self._base = b - ((blocks - 1) % w)          # the first block of the last step
        self._max_sent = b
        self._next = b + 1
        self._tries = 0
        self._rescue = False
        self._heard = now
        self.confirmed = True
        self._deadline = self._capped(now + self.timeout_s)

    def _on_ack(self, block: int, now: float) -> None:
        """One ACK (RFC 1350 section 5, RFC 7440 section 4); sends nothing itself.

        RFC 7440 says an ACK for a block inside the window means the peer got up
        to it and the sender continues from the next block.  Taken literally
        (go back on every such ACK) this multiplies the traffic on a link that
        duplicates or reorders: a windowed receiver such as atftp ACKs at once
        when a block arrives twice or out of order ("extra ACK", once per run of
        in-order blocks), and it counts its window from its last ACK.  A go-back
        on that ACK resends blocks the peer is still receiving; their copies
        arrive as duplicates, which make it ACK mid-flight again, and so on: 7.6x
        the file's blocks at 1% duplication, and a whole window per 4-byte ACK
        for a peer that sends increasing partial ACKs.  The rule here:

        * an ACK below the window start, beyond the highest block sent, or a
          repeat of the last one never sends (Sorcerer's Apprentice);
        * an ACK n inside the flight moves the window start to n + 1; it resends
          from n + 1 only if n is beyond ``_recover`` (the highest block sent at
          the previous go-back or timeout), and then sets ``_recover`` to the
          highest block sent: one go-back per flight.  A drop costs one go-back
          without waiting for the timer (atftp ignores the rest of the window
          after a gap, so the go-back is what it needs); partial ACKs caused by
          our own resent copies only slide the window (new blocks up to
          n + windowsize may go out), and a second loss inside a resent flight
          waits for the timer;
        * after a timeout (``_rescue``), a repeat of the last ACK is the peer's
          own retry: it is still waiting for the window start, so the window is
          resent at once, once per timer round.
        """
        if self._state == _WAIT_OACK:
            if block != 0:
                self.ignored_acks += 1
                return
            self._state = _DATA
            self._progress(now)
            return
        # Map the 16-bit number into the window [base - 1, max_sent].
        ref = self._base - 1
        n = ref + ((block - ref) & 0xFFFF)
        if n == ref and self._rescue:
            self._rescue = False                 # the peer's retry after our timeout
            self._next = self._base
            self._recover = self._max_sent
            return
        if n < self._base or n > self._max_sent:
            self.ignored_acks += 1          # duplicate or stale: never send on it
            return
        self._base = n + 1
        if n < self._max_sent and n > self._recover:
            self._next = self._base         # a gap: go back, once for this flight
            self._recover = self._max_sent
        elif self._next < self._base:
            self._next = self._base         # slide only
        self._progress(now)
        if n == self._last:
            self._finish(now, "ok")

    def _progress(self, now: float) -> None:
        self._heard = now
        self.confirmed = True
        self._tries = 0
        self._deadline = None
        self._rescue = False

    def _rto(self) -> float:
        """The retransmission timeout: doubles with each timeout in a row, up to 8x (RFC 1123 4.2.3.2).

        Besides being what RFC 1123 asks for, the backoff breaks a livelock with
        atftp: a client that already holds the resent window ignores it silently
        (after one extra ACK) and re-ACKs only after its own timer runs out with
        no packet at all; resending faster than that timer, forever, would never
        let it speak.
        """
        return self.timeout_s * (1 << min(self._tries, 3))

    def _capped(self, deadline: float) -> float:
        """``deadline``, but not after the end of the silence a peer is allowed (``max_silence_s``)."""
        if self.max_silence_s is None:
            return deadline
        return min(deadline, self._heard + self.max_silence_s)

    # -- timers --------------------------------------------------------------
    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: no timer)."""
        return None if self.done else self._deadline

    def handle_timer(self, now: float) -> None:
        """Retransmit on timeout (RFC 1350 section 2), or give up after ``retries``."""
        if self.done or self._deadline is None or now < self._deadline:
            return
        self._tries += 1
        self._deadline = None
        if self.max_silence_s is not None and now >= self._heard + self.max_silence_s:
            self._finish(now, "timeout", f"no progress for {self.max_silence_s:g} s")
            return
        if self._tries > self.retries:
            self._finish(now, "timeout", f"no ACK after {self.retries} retries")
            return
        if self._state == _WAIT_OACK:
            self._control.append(self._oack)  # type: ignore[arg-type]
            self.retransmits += 1
        else:
            self._next = self._base
            self._recover = self._max_sent  # the resent flight is this round's go-back
            self._rescue = True

    # -- output --------------------------------------------------------------
    def datagrams_to_send(self, now: float) -> list[bytes]:
        """The datagrams due now, in order; arms the retransmission timer."""
        out = self._control
        self._control = []
        if self._state == _DATA:
            end = min(self._base + self.windowsize - 1, self._last)
            first = self._next
            if first <= end:
                bs, src, header = self.blksize, self.source, tftp.data_header
                if first == end:
                    out.append(header(first) + src.read_block((first - 1) * bs, bs))
                elif getattr(src, "contiguous", False):
                    # one read for the whole run of blocks, sliced per block
                    view = memoryview(src.read_block((first - 1) * bs, (end - first + 1) * bs))
                    for i, n in enumerate(range(first, end + 1)):
                        out.append(header(n) + view[i * bs:(i + 1) * bs])
                else:
                    out.extend(header(n) + src.read_block((n - 1) * bs, bs)
                               for n in range(first, end + 1))
                if first <= self._max_sent:
                    self.retransmits += min(end, self._max_sent) - first + 1
                if end > self._max_sent:
                    self._max_sent = end
                self._next = end + 1
        if not self.done and (out or (self._deadline is None and self._state == _DATA
                                      and self._base <= self._max_sent)):
            # also after a slide that let nothing new out: blocks are still in flight
            self._deadline = self._capped(now + self._rto())
        return out

    def summary(self, now: float | None = None) -> TransferSummary:
        """The transfer's record: bytes and blocks acknowledged, retransmits, parameters."""
        start = self._started if self._started is not None else 0.0
        end = self._ended if self._ended is not None else (now if now is not None else start)
        return TransferSummary(
            bytes=self.bytes_acked, blocks=self._base - 1, retransmits=self.retransmits,
            blksize=self.blksize, windowsize=self.windowsize,
            duration_s=round(max(0.0, end - start), 6), outcome=self.outcome, error=self.error)
