"""Coverage-guided fuzzing of sidus' decoders with atheris (libFuzzer), run by hand.

    python3 tests/fuzz/fuzz.py dhcp  -max_total_time=300     # grows /tmp/sidus-fuzz/dhcp
    python3 tests/fuzz/fuzz.py tftp  -max_total_time=300
    python3 tests/fuzz/fuzz.py control -max_total_time=300
    python3 tests/fuzz/fuzz.py dhcp --merge                   # minimise into tests/fuzz/corpus/dhcp

The first form reads the repository corpus (tests/fuzz/corpus/TARGET) and
writes new inputs to a scratch directory; ``--merge`` keeps, in the
repository corpus, only the inputs that add coverage (libFuzzer -merge=1), so
the corpus stays small.  tests/fuzz/test_corpus_replay.py replays the corpus
in CI.  A crash leaves ``crash-*`` in the current directory: add it to the
corpus (named for what it found) once the bug is fixed.
Needs ``pip install atheris``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

SCRATCH = Path("/tmp/sidus-fuzz")


def main(argv: list[str]) -> int:
    import atheris
    with atheris.instrument_imports():
        import targets
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        print(f"usage: fuzz.py {{{'|'.join(targets.TARGETS)}}} [--merge] [libFuzzer flags]", file=sys.stderr)
        return 2
    name, rest = argv[1], argv[2:]
    target = targets.TARGETS[name]
    corpus = HERE / "corpus" / name
    scratch = SCRATCH / name
    scratch.mkdir(parents=True, exist_ok=True)
    if "--merge" in rest:
        rest = [a for a in rest if a != "--merge"]
        # adds to the repository corpus only the scratch inputs with new coverage
        args = [argv[0], "-merge=1", *rest, str(corpus), str(scratch)]
    else:
        args = [argv[0], "-max_len=1500", *rest, str(scratch), str(corpus)]
    atheris.Setup(args, lambda data: target(bytes(data)))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
