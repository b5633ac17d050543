"""The pure layers stay pure: nothing under sidusd/proto or sidusd/boot does I/O or reads a clock.

Checked on the syntax tree (``ast``), so a comment or a string that mentions
``socket`` is fine and ``import os.path as p`` or ``from .. import net`` is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "sidusd"
PURE_DIRS = ("proto", "boot")

# Modules that do I/O, read a clock, or talk to the outside world.
FORBIDDEN_MODULES = {
    "socket", "asyncio", "time", "logging", "structlog", "subprocess", "os", "io", "shutil",
    "tempfile", "select", "selectors", "signal", "threading", "multiprocessing", "concurrent",
    "fcntl", "mmap", "ssl", "socketserver", "http", "pyroute2", "scapy", "glob", "fileinput",
}
# Parts of sidusd itself that are edges (I/O) rather than pure code.
FORBIDDEN_SIDUSD = {"net", "control", "storage", "lab", "daemon", "runtime", "observability", "fsutil",
                    "ctl", "__main__"}
# Calls that read or write files whatever the import.
FORBIDDEN_CALLS = {"open", "print", "input", "breakpoint"}
FORBIDDEN_PATH_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "iterdir", "mkdir",
                          "unlink", "rmdir", "touch", "rglob", "symlink_to", "hardlink_to", "readlink",
                          "is_file", "is_dir", "is_symlink", "exists", "lstat", "samefile", "expanduser", "cwd",
                          "home"}


def _absolute(module: str | None, level: int, package: str) -> str:
    """Absolute dotted name of an import made from ``package`` (``sidusd.boot``)."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def violations(source: str, package: str) -> list[str]:
    """What in ``source`` (a module of ``package``) breaks the layering rule, one line per finding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
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
