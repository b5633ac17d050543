"""The wire between the TFTP service and its pushers (pure: messages to bytes and back).

A *pusher* (:mod:`sidusd.net.tftp_pusher`) is a process forked by the
network worker that carries out file transfers the worker's TFTP service
admitted and negotiated (:mod:`sidusd.net.tftp_pushers`).  One
``AF_UNIX`` ``SOCK_SEQPACKET`` socketpair per pusher: one datagram is one
message, JSON, declared once as :mod:`msgspec` Structs tagged by ``t``
(docs/decisions.md: the one schema mechanism).

* service -> pusher: :class:`Begin` (the file's descriptor passed with
  ``SCM_RIGHTS``), :class:`Evict`, :class:`Stop`;
* pusher -> service: :class:`Report`: the transfers that ended, their
  boot-timeline entries, counter deltas (``tftp.`` only) and what is in
  flight (bytes acknowledged, confirmed).

A pusher handles network input, so what it says is decoded strictly here
(:func:`decode_report`): unknown fields, a counter outside ``tftp.``, a
value out of bounds or more than ``MAX_ITEMS`` items raise
:class:`~sidusd.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from ..errors import RemoteProtocolError

MAX_MSG = 64 * 1024             # one datagram either way (a Report is cut to fit)
MAX_ITEMS = 256                 # progress items or ended ids in one Report (< 40 bytes each)
MAX_TIMELINE = 48               # timeline entries in one Report (< 700 bytes each)
MAX_COUNTERS = 128

Id = Annotated[int, Meta(ge=0, le=2**53)]
Port = Annotated[int, Meta(ge=1, le=65535)]
IPv4 = Annotated[str, Meta(pattern=r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")]
Str = Annotated[str, Meta(max_length=512)]
Option = Annotated[str, Meta(max_length=64)]
Count = Annotated[int, Meta(ge=0, le=2**62)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e9)]
Mac = Annotated[str, Meta(pattern=r"^[0-9a-f]{2}(?::[0-9a-f]{2}){0,15}\Z")]
CounterName = Annotated[str, Meta(pattern=r"^tftp\.[a-z0-9_.]{1,64}\Z")]
Outcome = Literal["ok", "probe", "peer-error", "timeout", "illegal", "stopped", "evicted"]


class _Message(Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class Begin(_Message, tag="begin", frozen=True):
    """Carry out this admitted, negotiated transfer (the file's descriptor comes with it)."""
    id: Id
    ip: IPv4
    port: Port
    local: IPv4
    file: Str
    mac: Mac | None
    size: Count
    blksize: Annotated[int, Meta(ge=8, le=65464)]
    windowsize: Annotated[int, Meta(ge=1, le=65535)]
    timeout_s: Annotated[float, Meta(ge=0.001, le=255.0)]
    retries: Annotated[int, Meta(ge=0, le=100)]
    max_silence_s: Annotated[float, Meta(ge=0.1, le=3600.0)]
    oack: tuple[tuple[Option, Option], ...] = ()


class Evict(_Message, tag="evict", frozen=True):
    """End this unconfirmed transfer silently (admission gave its slot away)."""
    id: Id


class Stop(_Message, tag="stop", frozen=True):
    """Let the transfers in flight finish for up to ``grace_s``, end the rest, exit."""
    grace_s: Seconds


class Progress(Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    id: Id
    bytes: Count
    confirmed: bool


class Entry(Struct, frozen=True, forbid_unknown_fields=True):
    """A ``tftp`` boot-timeline entry of a transfer that ended."""
    mac: Mac
    file: Str
    bytes: Count
    duration_s: Seconds
    outcome: Outcome


class Report(_Message, tag="report", frozen=True):
    progress: Annotated[list[Progress], Meta(max_length=MAX_ITEMS)] = []
    ended: Annotated[list[Id], Meta(max_length=MAX_ITEMS)] = []
    timeline: Annotated[list[Entry], Meta(max_length=MAX_TIMELINE)] = []
    counts: Annotated[dict[CounterName, Count], Meta(max_length=MAX_COUNTERS)] = {}


_to_pusher = msgspec.json.Decoder(Begin | Evict | Stop)
_report = msgspec.json.Decoder(Report)
_encoder = msgspec.json.Encoder()


def encode(msg: _Message) -> bytes:
    return _encoder.encode(msg)


def decode_command(data: bytes) -> Begin | Evict | Stop:
    """A message of the service (pusher side); RemoteProtocolError if it is not one."""
    return _decode(_to_pusher, data)


def decode_report(data: bytes) -> Report:
    """A pusher's report (service side: the pusher reads the network, so it is not trusted)."""
    return _decode(_report, data)


def _decode(decoder: msgspec.json.Decoder, data: bytes):  # type: ignore[no-untyped-def]
    if len(data) > MAX_MSG:
        raise RemoteProtocolError("oversized", f"message of {len(data)} bytes (limit {MAX_MSG})")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError("bad_field", str(exc)[:200]) from None
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError("bad_json", str(exc)[:200]) from None


def reports(progress: list[Progress], ended: list[int], timeline: list[Entry],
            counts: dict[str, int]) -> list[Report]:
    """What a pusher has to say as Reports that each fit a datagram (``MAX_ITEMS``,
    ``MAX_TIMELINE``, ``MAX_COUNTERS`` per list).  One Report when it fits; else counters, timeline
    entries and progress first, the ``ended`` ids last: the service hears of a transfer's
    entry before it forgets the transfer."""
    items = list(counts.items())
    if (len(progress) <= MAX_ITEMS and len(ended) <= MAX_ITEMS and len(timeline) <= MAX_TIMELINE
            and len(items) <= MAX_COUNTERS):
        one = Report(progress=progress, ended=ended, timeline=timeline, counts=counts)
        return [one] if progress or ended or timeline or counts else []
    out = [Report(counts=dict(items[i:i + MAX_COUNTERS])) for i in range(0, len(items), MAX_COUNTERS)]
    out += [Report(timeline=timeline[i:i + MAX_TIMELINE]) for i in range(0, len(timeline), MAX_TIMELINE)]
    out += [Report(progress=progress[i:i + MAX_ITEMS]) for i in range(0, len(progress), MAX_ITEMS)]
    out += [Report(ended=ended[i:i + MAX_ITEMS]) for i in range(0, len(ended), MAX_ITEMS)]
    return out
