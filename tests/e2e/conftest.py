"""End-to-end boots: real qemu + iPXE firmware, real sidusd, real nfs-ganesha, real kernel.

The tests use the demo lab's own building blocks (sidusd.lab.demo.Lab), so
the demo and the tests cannot drift apart.  Each lab is closed in the
fixture's finalizer (every process stopped by PID, namespaces removed) even
when the test fails; a failed test prints each VM's console tail and the
sidusd log tail.  A boot takes ~45 s under TCG: keep the number of boots small.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest

# A conftest.py in a directory without __init__.py replaces sys.modules["conftest"]
# (pytest's prepend import mode), so `from conftest import ...` cannot reach
# tests/conftest.py from here.  Load it under its own name, and re-export its
# helpers so that test modules importing `conftest` later still find them.
_spec = importlib.util.spec_from_file_location(
    "sidus_tests_conftest", Path(__file__).resolve().parent.parent / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
ROOT = _root.ROOT
require_root = _root.require_root
require_tool = _root.require_tool
poll_until = _root.poll_until
console_text = _root.console_text
absolute_import = _root.absolute_import

TOOLS = ("ip", "qemu-system-x86_64", "dnsmasq", "ganesha.nfsd", "rpcbind", "showmount",
         "unshare", "busybox", "mkinitramfs")


def require_lab() -> None:
    """Skip (naming what is missing) unless the lab can run here."""
    require_root()
    for tool in TOOLS:
        require_tool(tool)
    from sidusd.lab.demo import missing_requirements
    missing = missing_requirements()
    if missing:
        pytest.skip("missing: " + ", ".join(f"{what} (package {pkg})" for what, pkg in missing))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def demo_image(tmp_path_factory):
    """The demo image (busybox root, Debian kernel, initramfs), built once per session."""
    require_lab()
    from sidusd.lab.image import build_demo_image
    # <demo>/image, so that `python3 -m sidusd.lab demo --workdir <demo>` reuses it
    workdir = tmp_path_factory.mktemp("demo") / "image"
    return build_demo_image(workdir, progress=lambda msg: None)


@contextlib.contextmanager
def _lab_factory(workdir, failed):
    """``make(mode, hosts, image, **lab_fields) -> Lab`` already up (``lab_fields``: Lab's own fields,
    e.g. ``extra_config={"metrics": {...}}``); every lab is closed at the end, with the diagnostics
    printed if ``failed()``."""
    require_lab()
    from sidusd.lab.demo import Lab
    labs = []

    def make(mode, hosts, image, **lab_fields):
        lab = Lab(workdir / f"lab{len(labs)}", mode=mode, progress=lambda msg: None, **lab_fields)
        labs.append(lab)
        lab.up(image, hosts)
        return lab

    try:
        yield make
    finally:
        from sidusd.lab.topology import netns_list
        names = []
        bad = failed()
        for lab in labs:
            if lab.topology is not None:
                names += [lab.topology.lab_ns, lab.topology.site_ns]
            if bad:
                for vm in list(lab.vms) or [None]:
                    print(lab.diagnostics(vm))
            lab.close()
        left = set(names) & set(netns_list())
        assert not left, f"lab namespaces left behind: {sorted(left)}"


@pytest.fixture
def make_lab(request, tmp_path):
    """``make_lab(mode, hosts, image, **lab_fields) -> Lab`` already up; every lab is closed at the end."""
    def failed():
        return any(getattr(request.node, f"rep_{w}", None) is not None
                   and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    with _lab_factory(tmp_path, failed) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_lab(request, tmp_path_factory):
    """``make_lab`` for a lab shared by a module's tests (one boot, several observers)."""
    failures = request.session.testsfailed
    with _lab_factory(tmp_path_factory.mktemp("modlab"),
                      lambda: request.session.testsfailed > failures) as make:
        yield make

@pytest.fixture(scope="session")
def bookworm_tree():
    """The suite's one debootstrap'd bookworm tree (tests/debian_tree.py: the documentation's
    include/exclude command line, cached by it; test_debian_image.py's build shares it).
    Read-only: copy it (debian_tree.copy_tree) before changing anything."""
    require_lab()
    require_tool("debootstrap")
    from debian_tree import cached_tree, debootstrap_argv

    from sidusd.image.build import host_mirror
    return cached_tree(debootstrap_argv("TARGET", host_mirror("bookworm")), log=lambda msg: None)
