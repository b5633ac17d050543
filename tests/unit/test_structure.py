"""The shape of sidusd as a whole, checked on the syntax tree (``ast``) of every module.

* No module assigns to another module's attributes (``tftp_server.open_confined = ...``,
  ``socket.socket = ...``, ``setattr(mod, ...)``, ``del mod.x``): what a part needs is passed in.
* No import cycle among sidusd's modules: none among module-level imports (what runs
  when a module is imported), and none hidden in an import deferred into a function
  either; imports under ``if TYPE_CHECKING:`` never count.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from conftest import absolute_import

PKG = Path(__file__).resolve().parents[2] / "sidusd"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the sidusd package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]




def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module (of sidusd: by its file; else as the import system finds it)."""
    if dotted == "sidusd" or dotted.startswith("sidusd."):
        return dotted in MODULES
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError, AttributeError):
        return False       # an attribute of a module (from socket import socket), not a submodule


# -- no assignment into another module ----------------------------------------------------

def module_bindings(tree: ast.Module, package: str) -> set[str]:
    """The names (dotted for ``import a.b``) under which ``tree`` refers to a module."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names.add(a.asname)
                else:
                    parts = a.name.split(".")
                    names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            base = absolute_import(node.module, node.level, package)
            for a in node.names:
                if a.name != "*" and _is_module(f"{base}.{a.name}" if base else a.name):
                    names.add(a.asname or a.name)
    return names


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def foreign_assignments(source: str, package: str) -> list[str]:
    """Where ``source`` sets, deletes or ``setattr``\\ s an attribute of a module it imported."""
    tree = ast.parse(source)
    mods = module_bindings(tree, package)
    found = []

    def check(target: ast.expr, lineno: int, how: str) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                check(t, lineno, how)
        elif isinstance(target, ast.Starred):
            check(target.value, lineno, how)
        elif isinstance(target, ast.Attribute) and _dotted(target.value) in mods:
            found.append(f"line {lineno}: {how} {_dotted(target.value)}.{target.attr}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                check(t, node.lineno, "assigns")
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            check(node.target, node.lineno, "assigns")
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                check(t, node.lineno, "deletes")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("setattr", "delattr") and node.args and _dotted(node.args[0]) in mods):
            found.append(f"line {node.lineno}: calls {node.func.id}({_dotted(node.args[0])}, ...)")
    return found


def test_there_is_something_to_check():
    assert {"sidusd.daemon", "sidusd.net.tftp_server", "sidusd.proto.dhcp"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_assigns_into_another_module(name):
    found = foreign_assignments(MODULES[name].read_text(encoding="utf-8"), _package_of(name))
    assert not found, f"{name} changes another module (pass what it needs instead):\n  " + "\n  ".join(found)


@pytest.mark.parametrize("source", [
    "import socket\nsocket.socket = object", "from sidusd.net import tftp_server\ntftp_server.open_confined = f",
    "from . import tftp_server\ndef f():\n    tftp_server.open_confined = g", "import os.path\nos.path.sep = '/'",
    "import sys as s\ns.x, y = 1, 2", "import time\ntime.time += 1", "import sidusd.net.io\nsidusd.net.io.X = 1",
    "import socket\nsetattr(socket, 'socket', object)", "import socket\ndel socket.socket",
    "from sidusd import net\nnet.files = None", "import logging\nlogging.root: object = None",
])
def test_the_scan_catches(source):
    assert foreign_assignments(source, "sidusd.net"), source


@pytest.mark.parametrize("source", [
    "self.socket = socket.socket()", "from socket import socket\nsocket.x = 1",
    "from sidusd.net.files import open_confined\nopen_confined.cache = {}", "import os\nos.environ['X'] = '1'",
    "import socket\ns = socket.socket()\ns.blocking = False", "x.y = 1", "# socket.socket = object",
])
def test_the_scan_allows(source):
    assert foreign_assignments(source, "sidusd.net") == [], source


# -- no import cycle ------------------------------------------------------------------------

def imports_of(tree: ast.Module, deferred: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported (and with ``deferred``, also those inside
    functions and classes, run later); never those under ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if deferred:
                    visit(node.body)
            elif isinstance(node, ast.If) and _dotted(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    visit(getattr(node, field, None) or [])
    visit(tree.body)
    return out


def import_graph(sources: dict[str, str], packages: dict[str, str], deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the sidusd modules it imports (``sources``: name -> text; ``deferred``: see imports_of)."""
    graph: dict[str, set[str]] = {}
    for name, text in sources.items():
        deps: set[str] = set()
        for node in imports_of(ast.parse(text), deferred):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = absolute_import(node.module, node.level, packages[name])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            for t in targets:
                while t and t not in sources:        # an attribute's module, or a package's
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def _graph(deferred: bool) -> dict[str, set[str]]:
    sources = {name: path.read_text(encoding="utf-8") for name, path in MODULES.items()}
    return import_graph(sources, {name: _package_of(name) for name in MODULES}, deferred)


def test_no_import_cycle_among_sidusd_modules():
    """Module-level imports: a cycle here fails (or half-initialises a module) at import time."""
    graph = _graph(deferred=False)
    assert graph["sidusd.net.tftp_server"]            # the graph has edges
    found = cycles(graph)
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_no_dependency_cycle_hidden_in_a_deferred_import():
    """An import inside a function is how a cycle is hidden, not removed: those count here."""
    found = cycles(_graph(deferred=True))
    assert not found, "dependency cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles_and_only_those():
    pk = {"p": "p", "p.a": "p", "p.b": "p", "p.c": "p", "p.d": "p"}
    src = {"p": "", "p.a": "from . import b\n", "p.b": "import p.c\n", "p.c": "from p.a import thing\n",
           "p.d": "from .a import x\ndef f():\n    from . import d2\nif TYPE_CHECKING:\n    from . import a\n"}
    assert cycles(import_graph(src, pk)) == [["p.a", "p.b", "p.c"]]
    src["p.c"] = "def f():\n    from p.a import thing\n"        # a function-level import: deferred
    assert cycles(import_graph(src, pk)) == []
    assert cycles(import_graph(src, pk, deferred=True)) == [["p.a", "p.b", "p.c"]]
    src["p.c"] = "if TYPE_CHECKING:\n    from p.a import thing\n"   # never at run time
    assert cycles(import_graph(src, pk, deferred=True)) == []
    src["p.c"] = "try:\n    from p.a import thing\nexcept ImportError:\n    pass\n"
    assert cycles(import_graph(src, pk)) == [["p.a", "p.b", "p.c"]]


def test_every_source_file_is_under_400_lines():
    """The style rule (docs/architecture.md): a file that grows past it is split by job."""
    pkg = Path(__file__).resolve().parents[2] / "sidusd"
    long = {str(p.relative_to(pkg)): n for p in sorted(pkg.rglob("*"))
            if p.suffix in (".py", ".c", ".h") and (n := len(p.read_text().splitlines())) >= 400}
    assert not long, long
