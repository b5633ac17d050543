"""console_text: a VM's serial log with the terminal control sequences taken out."""

from __future__ import annotations

from conftest import console_text


def test_a_cursor_move_inside_a_marker_is_removed(tmp_path) -> None:
    # the tail of the serial log of stop 26's CI run (test_ipxe_then_pxelinux_boot_through_sidus_tftp)
    raw = ("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\n"
           "PXELINUX 6.04 PXE 20200816 Copyright (C) 1994-2015 H. Peter Anvin et al\n"
           "sidus-pxelinux-d18c06\x1b[25;21H\x1b[25;22Hb3\n")
    log = tmp_path / "serial.log"
    log.write_text(raw)
    assert "sidus-pxelinux-d18c06b3" not in log.read_text()
    text = console_text(log)
    assert "sidus-pxelinux-d18c06b3" in text
    assert text.startswith("SeaBIOS (version 1.16.2-debian-1.16.2-1)\n")
    assert "\x1b" not in text


def test_colours_and_plain_text_survive(tmp_path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"\x1b[0;1miPXE 1.0.0\x1b[0m -- \x1b[0;36mhttp://ipxe.org\x1b[0m\n[  1.0] ok \xff\n")
    assert console_text(log) == "iPXE 1.0.0 -- http://ipxe.org\n[  1.0] ok \ufffd\n"


def test_a_missing_log_reads_empty(tmp_path) -> None:
    assert console_text(tmp_path / "absent.log") == ""
