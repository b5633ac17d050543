"""boot.content.resolve (pure) and net.files.open_confined (real files, no network)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.boot.content import Generated, Refused, StaticPath, resolve
from sidusd.net.files import FileSource, NotServable, open_confined


@pytest.mark.parametrize("name, want", [
    ("pxelinux.cfg/01-52-54-00-12-34-56", Generated("pxelinux", "52:54:00:12:34:56")),
    ("pxelinux.cfg/01-AA-bB-cc-DD-ee-FF", Generated("pxelinux", "aa:bb:cc:dd:ee:ff")),
    ("/pxelinux.cfg/01-52-54-00-12-34-56", Generated("pxelinux", "52:54:00:12:34:56")),
    ("pxelinux.cfg/default", Generated("pxelinux-default", None)),
    ("52:54:00:12:34:56.ipxe", Generated("ipxe", "52:54:00:12:34:56")),
    ("boot/52-54-00-12-34-AB.ipxe", Generated("ipxe", "52:54:00:12:34:ab")),
    ("/boot/525400123456.ipxe", Generated("ipxe", "52:54:00:12:34:56")),
    ("pxelinux.cfg/C0A80A05", StaticPath(("pxelinux.cfg", "C0A80A05"))),
    ("pxelinux.cfg/C", StaticPath(("pxelinux.cfg", "C"))),
    ("pxelinux.cfg/06-52-54-00-12-34-56", StaticPath(("pxelinux.cfg", "06-52-54-00-12-34-56"))),
    ("pxelinux.0", StaticPath(("pxelinux.0",))),
    ("/ldlinux.c32", StaticPath(("ldlinux.c32",))),
    ("//images/demo/vmlinuz", StaticPath(("images", "demo", "vmlinuz"))),
    ("boot\\x64\\wdsnbp.com", StaticPath(("boot", "x64", "wdsnbp.com"))),
    ("boot.ipxe", StaticPath(("boot.ipxe",))),
    ("other/52:54:00:12:34:56.ipxe", StaticPath(("other", "52:54:00:12:34:56.ipxe"))),
    ("%2e%2e/x", StaticPath(("%2e%2e", "x"))),
    ("..foo", StaticPath(("..foo",))),
])
def test_resolve(name: str, want) -> None:
    assert resolve(name) == want


@pytest.mark.parametrize("name", [
    "", "/", "//", "../etc/passwd", "/../../etc/passwd", "a/../../x", "a/..", "./x", "a/./b",
    "a//b", "a/", "..\\..\\etc\\passwd", "a\x00b", "a\nb", "x\x7f", "a" * 256,
    "pxelinux.cfg/01-zz-54-00-12-34-56", "pxelinux.cfg/01-52-54-00-12-34", "pxelinux.cfg/01-5254.0012.3456",
    "pxelinux.cfg/01-52-54-00-12-34-56-78", "pxelinux.cfg/01-",
])
def test_refused(name: str) -> None:
    assert isinstance(resolve(name), Refused)


def test_length_limit_is_in_bytes() -> None:
    assert isinstance(resolve("a" * 255), StaticPath)
    assert isinstance(resolve("é" * 128), Refused)         # 256 bytes in UTF-8


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_static_parts_are_always_safe(name: str) -> None:
    r = resolve(name)
    if isinstance(r, StaticPath):
        assert r.parts and len("/".join(r.parts).encode()) <= 255
        for p in r.parts:
            assert p not in ("", ".", "..") and "/" not in p and "\\" not in p
            assert not any(ord(c) < 32 or ord(c) == 127 for c in p)
    elif isinstance(r, Generated):
        assert r.kind in ("pxelinux", "pxelinux-default", "ipxe")
        assert r.mac is None or len(r.mac) == 17


# -- open_confined ----------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "images" / "demo").mkdir(parents=True)
    (root / "images" / "demo" / "vmlinuz").write_bytes(b"kernel" * 100)
    (root / "pxelinux.0").write_bytes(b"nbp")
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "link-out").symlink_to(tmp_path / "secret")
    (root / "link-in").symlink_to(root / "pxelinux.0")
    (root / "dirlink").symlink_to(root / "images")
    (root / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "sock"))
    s.close()
    return root


def test_open_regular(tree: Path) -> None:
    fd, size = open_confined(tree, ("images", "demo", "vmlinuz"))
    src = FileSource(fd, size)
    try:
        assert size == 600 and src.read_block(594, 100) == b"kernel" and src.read_block(600, 10) == b""
    finally:
        src.close()
    assert src.fd == -1


@pytest.mark.parametrize("parts, missing", [
    (("nope",), True), (("images", "nope", "x"), True),
    (("link-out",), False), (("link-in",), False), (("dirlink", "demo", "vmlinuz"), False),
    (("images",), False), (("fifo",), False), (("sock",), False),
    (("pxelinux.0", "x"), False), (("..", "secret"), False), (("",), False), ((), False),
])
def test_open_refused(tree: Path, parts: tuple, missing: bool) -> None:
    with pytest.raises(NotServable) as exc:
        open_confined(tree, parts)
    assert exc.value.missing is missing


def test_device_node_refused(tree: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("missing privilege: root (mknod)")
    os.mknod(tree / "null", 0o020666, os.makedev(1, 3))
    with pytest.raises(NotServable):
        open_confined(tree, ("null",))


def test_fd_count_is_stable(tree: Path) -> None:
    """Every path out of open_confined closes the directory descriptors it opened."""
    before = len(os.listdir("/proc/self/fd"))
    for parts in [("nope",), ("link-out",), ("images", "demo", "vmlinuz"), ("dirlink", "x"), ("fifo",)]:
        try:
            fd, _ = open_confined(tree, parts)
            os.close(fd)
        except NotServable:
            pass
    assert len(os.listdir("/proc/self/fd")) == before


def test_shrinking_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 1000)
    fd, size = open_confined(tmp_path, ("f",))
    src = FileSource(fd, size)
    os.truncate(tmp_path / "f", 10)
    with pytest.raises(OSError):
        src.read_block(512, 512)
    src.close()
