"""sidusd.schema: msgspec checks the declaration, the refusal is said in our words with its dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest
from msgspec import Meta

from sidusd.errors import ConfigError
from sidusd.schema import convert, suggest


@dataclass(frozen=True)
class Inner:
    port: Annotated[int, Meta(ge=1, le=65535)] = 69
    mode: Literal["a", "b"] = "a"
    name: Annotated[str, Meta(pattern=r"^[a-z]+\Z", description="{value!r} is not lower case")] = "x"
    path: Path = Path("/default")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    required: str | None = None


def hook(tp, v):
    if tp is Path and isinstance(v, str):
        return Path(v)
    raise TypeError("expected a path as a string")


def refusal(raw) -> tuple[str, str]:
    with pytest.raises(ConfigError) as e:
        convert(raw, Outer, dec_hook=hook)
    return e.value.path, e.value.reason


@pytest.mark.parametrize("raw, path, reason", [
    ({"inner": {"prot": 1}}, "inner.prot", "unknown key (did you mean port?)"),
    ({"inner": {"zzzzzz": 1}}, "inner.zzzzzz", "unknown key (allowed: port, mode, name, path)"),
    ({"inner": {"port": 0}}, "inner.port", "out of range: must be between 1 and 65535, got 0"),
    ({"inner": {"port": True}}, "inner.port", "expected an integer, got boolean True"),
    ({"inner": {"port": None}}, "inner.port", "cannot be null (expected an integer)"),
    ({"inner": {"mode": "c"}}, "inner.mode", "must be one of: a, b (got 'c')"),
    ({"inner": {"name": "X"}}, "inner.name", "'X' is not lower case"),
    ({"inner": {"path": 5}}, "inner.path", "expected a path as a string"),
    ({"inner": "x"}, "inner", "expected a mapping, got string 'x'"),
    ({"items": [{}, {"port": 70000}]}, "items[1].port", "out of range"),
    ({"items": [{}, {"prot": 1}]}, "items[1].prot", "did you mean port?"),
    ({"counts": {"a": "b"}}, "counts[...]", "expected `int`, got `str`"),
    ({"counts": {1: 2}}, "counts.1", "a key must be a string, got integer 1"),
    ([1], "<document>", "expected a mapping, got a list"),
])
def test_refusals_name_the_path_and_the_reason(raw, path, reason):
    got_path, got_reason = refusal(raw)
    assert got_path == path and reason in got_reason, (got_path, got_reason)


def test_null_section_and_null_path_take_their_defaults():
    assert convert({"inner": None}, Outer, dec_hook=hook) == Outer()
    assert convert({"inner": {"path": None}}, Outer, dec_hook=hook).inner.path == Path("/default")
    assert convert(None, Outer, dec_hook=hook) == Outer()


def test_required_skip_and_extra():
    @dataclass(frozen=True)
    class Named:
        name: str
        size: int

    with pytest.raises(ConfigError) as e:
        convert({}, Named, "p.x", extra={"name": "x"})
    assert (e.value.path, e.value.reason) == ("p.x.size", "required key is missing")
    with pytest.raises(ConfigError, match="p.x.name: unknown key"):
        convert({"name": "y", "size": 1}, Named, "p.x", extra={"name": "x"})
    assert convert({"size": 1}, Named, "p.x", extra={"name": "x"}) == Named("x", 1)


def test_tagged_struct_keeps_its_tag():
    class Hello(msgspec.Struct, tag_field="t", tag="hello", forbid_unknown_fields=True):
        pid: Annotated[int, Meta(ge=1)]

    assert convert({"t": "hello", "pid": 3}, Hello) == Hello(3)
    with pytest.raises(ConfigError, match="pid: out of range: must be at least 1, got 0"):
        convert({"t": "hello", "pid": 0}, Hello)


def test_suggest():
    assert suggest("rnage_start", ("range_start", "range_end")) == "range_start"
    assert suggest("colour", ("format", "level")) is None
