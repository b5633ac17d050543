"""The pure layers stay pure: nothing under sidusd/proto or sidusd/boot does I/O or reads a clock.

Checked on the syntax tree (``ast``), so a comment or a string that mentions
``socket`` is fine and ``import os.path as p`` or ``from .. import net`` is caught.
And checked for real, transitively: each pure module is imported in a fresh
interpreter, and what it loaded (``sys.modules``) must hold no I/O, clock or
randomness module and no edge package of sidusd; every sidusd module it
loaded on the way must not import one either, even inside a function.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import absolute_import

PKG = Path(__file__).resolve().parents[2] / "sidusd"
PURE_DIRS = ("proto", "boot")

# Modules that do I/O, read a clock, or talk to the outside world.
FORBIDDEN_MODULES = {
    "socket", "asyncio", "time", "logging", "structlog", "subprocess", "os", "io", "shutil",
    "tempfile", "select", "selectors", "signal", "threading", "multiprocessing", "concurrent",
    "fcntl", "mmap", "ssl", "socketserver", "http", "pyroute2", "scapy", "glob", "fileinput",
    "datetime", "random", "secrets",
}
# Parts of sidusd itself that are edges (I/O) rather than pure code.
FORBIDDEN_SIDUSD = {"net", "control", "storage", "lab", "daemon", "runtime", "observability", "fsutil",
                    "ctl", "__main__", "privsep", "image"}
# Calls that read or write files whatever the import.
FORBIDDEN_CALLS = {"open", "print", "input", "breakpoint"}
FORBIDDEN_PATH_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "iterdir", "mkdir",
                          "unlink", "rmdir", "touch", "rglob", "symlink_to", "hardlink_to", "readlink",
                          "is_file", "is_dir", "is_symlink", "exists", "lstat", "samefile", "expanduser", "cwd",
                          "home"}




def violations(source: str, package: str) -> list[str]:
    """What in ``source`` (a module of ``package``) breaks the layering rule, one line per finding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute_import(node.module, node.level, package)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: calls {f.id}()")
            elif isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_PATH_METHODS:
                found.append(f"line {node.lineno}: calls .{f.attr}() (file-system I/O)")
            elif isinstance(f, ast.Name) and f.id == "__import__":
                found.append(f"line {node.lineno}: calls __import__()")
            elif isinstance(f, ast.Attribute) and f.attr == "import_module":
                found.append(f"line {node.lineno}: calls import_module()")
        for name in names:
            parts = name.split(".")
            if parts[0] in FORBIDDEN_MODULES:
                found.append(f"line {node.lineno}: imports {name}")
            elif parts[0] == "sidusd" and len(parts) > 1 and parts[1] in FORBIDDEN_SIDUSD:
                found.append(f"line {node.lineno}: imports the I/O layer {name}")
    return found


def _pure_modules() -> list[Path]:
    return sorted(p for d in PURE_DIRS for p in (PKG / d).rglob("*.py"))


def test_there_is_something_to_check():
    names = {p.name for p in _pure_modules()}
    assert {"inventory.py", "render.py"} <= names


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_pure_module_does_no_io(path):
    package = "sidusd." + ".".join(path.relative_to(PKG).parent.parts)
    found = violations(path.read_text(encoding="utf-8"), package)
    assert not found, f"{path.relative_to(PKG.parent)} must stay pure:\n  " + "\n  ".join(found)


# -- the checker itself catches what it must, and only that -------------------------

@pytest.mark.parametrize("source", [
    "import socket", "import os.path", "import asyncio as aio", "from time import monotonic",
    "import logging.handlers", "from structlog import get_logger", "import subprocess",
    "from ..net import files", "from ..runtime import Runtime", "from sidusd.observability import Observer",
    "from .. import net", "from sidusd import fsutil", "def f():\n    import time\n    return time.time()",
    "data = open('/etc/passwd').read()", "print('hello')", "x = p.read_bytes()",
    "p.write_text('x')", "import io", "__import__('socket')", "importlib.import_module('os')",
    "import datetime", "from datetime import datetime", "import random", "from secrets import token_hex",
    "from sidusd.privsep import ipc", "from ..image import recipe", "from sidusd import privsep",
])
def test_checker_catches(source):
    assert violations(source, "sidusd.boot"), source


@pytest.mark.parametrize("source", [
    "import ipaddress", "from dataclasses import dataclass", "import struct", "from pathlib import PurePosixPath",
    "from sidusd.errors import RemoteProtocolError", "from ..errors import ConfigError",
    "from .inventory import BootTarget", "from sidusd.config import Config", "# import socket",
    "x = 'import os'", "target = inv.resolve(mac, config)", "import enum, re, typing",
])
def test_checker_allows(source):
    assert violations(source, "sidusd.boot") == []


# -- transitively: what importing a pure module really loads ---------------------------

# Not to be loaded by importing a pure module (a name or a package and everything under it).
TRANSITIVE_FORBIDDEN = ("socket", "asyncio", "time", "logging", "structlog", "datetime", "random", "secrets",
                        "sidusd.privsep", "sidusd.image", "sidusd.net")
# The libraries outside the standard library the pure packages may use, and what they load
# themselves: PyYAML parses the inventory's text and imports datetime (for YAML timestamps).
# Pure modules are compared with an interpreter that loaded these (and nothing of sidusd).
THIRD_PARTY = ("yaml",)
THIRD_PARTY_BRINGS = {"datetime", "_datetime"}

_PROBE = ("import sys\nsys.path.insert(0, sys.argv[1])\nfor name in sys.argv[2:]:\n    __import__(name)\n"
          "sys.stdout.write(\"\\n\".join(sorted(sys.modules)))\n")


@functools.cache
def loaded(*names: str) -> frozenset[str]:
    """``sys.modules`` of a fresh interpreter after importing ``names`` (none: the start-up baseline)."""
    r = subprocess.run([sys.executable, "-c", _PROBE, str(PKG.parent), *names],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return frozenset(r.stdout.split())


def forbidden(modules: set[str] | frozenset[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in TRANSITIVE_FORBIDDEN))


def _dotted(path: Path) -> str:
    return ".".join(("sidusd", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")


def test_the_probe_sees_transitive_imports():
    assert set(forbidden(loaded())) <= {"time"}           # the interpreter may load time itself
    assert {"asyncio", "socket"} <= set(forbidden(loaded("sidusd.runtime") - loaded()))
    assert "sidusd.boot.inventory" in loaded("sidusd.boot.render")


def test_third_party_libraries_of_the_pure_packages_bring_only_what_is_declared():
    assert set(forbidden(loaded(*THIRD_PARTY) - loaded())) <= THIRD_PARTY_BRINGS


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_pure_module_loads_nothing_forbidden(path):
    name = _dotted(path)
    found = forbidden(loaded(name) - loaded(*THIRD_PARTY))
    assert not found, f"importing {name} loads {found}"


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_sidusd_modules_a_pure_module_loads_import_nothing_forbidden(path):
    """Also imports inside functions, which importing the module does not run."""
    bad = []
    for mod in sorted(m for m in loaded(_dotted(path)) if m == "sidusd" or m.startswith("sidusd.")):
        file = PKG.parent / (mod.replace(".", "/") + ".py")
        if not file.exists():
            file = PKG.parent / mod.replace(".", "/") / "__init__.py"
        package = mod if file.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = absolute_import(node.module, node.level, package)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            bad += [f"{mod} line {node.lineno}: imports {n}" for n in names if forbidden({n})]
    assert not bad, "\n".join(bad)
