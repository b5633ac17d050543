"""Replay every file of tests/fuzz/corpus/<target>/ through its decoder.

The corpus is grown by hand with tests/fuzz/fuzz.py (atheris) and seeded by
tests/fuzz/seed.py; CI replays it here.  Each input must either decode or
raise RemoteProtocolError (the targets catch exactly that type): any other
exception, an assertion in a target included, fails the test and names the
file.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import targets  # noqa: E402

CORPUS = HERE / "corpus"


def corpus_files(name: str) -> list[Path]:
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_corpus_replays_cleanly(name):
    files = corpus_files(name)
    assert len(files) >= 10, f"corpus for {name} is missing (run tests/fuzz/seed.py)"
    outcomes: Counter[str] = Counter()
    failures = []
    for path in files:
        try:
            outcomes[targets.TARGETS[name](path.read_bytes())] += 1
        except Exception as exc:  # noqa: BLE001 - anything but RemoteProtocolError is a bug
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    # the corpus must reach past the decoder's first check: some inputs decode, some are refused
    assert outcomes["refused"] > 0 or name == "control", outcomes
    assert sum(v for k, v in outcomes.items() if k != "refused") > 0, outcomes


def test_superscript_digit_option_is_ignored_not_a_crash():
    """Regression (found here): '²'.isdigit() is True but int('²') raises ValueError;
    negotiate() must ignore such a value as it ignores any invalid one (RFC 2347 §2)."""
    from sidusd.proto import tftp
    neg = tftp.negotiate({"blksize": "²", "windowsize": "٣", "timeout": "¹"}, tftp.Limits())
    assert (neg.blksize, neg.windowsize, neg.timeout_s, neg.oack) == (512, 1, None, ())
    assert targets.fuzz_tftp((CORPUS / "tftp" / "seed-rrq-blksize-superscript").read_bytes()) == "rrq"


def test_targets_refuse_with_the_protocol_error_only():
    """A target lets a non-protocol exception through: the replay would see it."""
    from sidusd.errors import RemoteProtocolError
    from sidusd.proto import dhcp
    with pytest.raises(RemoteProtocolError):
        dhcp.decode(b"\x01" * 10)
    assert targets.fuzz_dhcp(b"\x01" * 10) == "refused"
