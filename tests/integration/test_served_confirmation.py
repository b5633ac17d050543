"""``sidus-image`` says "served" only when the real sidusd, asked on its control socket
(``images.status``), serves that generation (image/publish.py ``confirm_served``)."""

from __future__ import annotations

import io

import pytest
from daemon_fixture import SidusDaemon, base_config, free_udp_port

from sidusd.errors import BackendError
from sidusd.image import publish
from sidusd.image.build import Administrator

KVER = "6.1.0-99-amd64"


def fake_build(part, logfile) -> dict:
    """What a build leaves: a root with a kernel and its initrd (no debootstrap here)."""
    (part / "boot").mkdir()
    (part / "boot" / f"vmlinuz-{KVER}").write_bytes(b"kernel\n")
    (part / "boot" / f"initrd.img-{KVER}").write_bytes(b"initrd\n")
    (part / "etc").mkdir()
    return {"kernel": f"vmlinuz-{KVER}", "initrd": f"initrd.img-{KVER}", "kver": KVER}


def daemon_reading(tmp_path, images_file):
    cfg = base_config(tmp_path, free_udp_port())
    cfg["images_file"] = str(images_file)
    d = SidusDaemon(tmp_path, config=cfg)
    d.tftp_port = cfg["tftp"]["port"]
    return d


def test_a_generation_is_served_only_when_sidusd_says_so(tmp_path):
    store = tmp_path / "store"
    images_file = store / "images.yaml"
    with daemon_reading(tmp_path, images_file) as d:
        out = io.StringIO()
        adm = Administrator(store, tmp_path / "tftp", out=out, images_file=images_file,
                            control_socket=d.socket_path)
        n = adm._new_generation("web", None, "build", fake_build)
        line = out.getvalue().strip().splitlines()[-1]
        assert line.startswith(f"web: generation {n} complete") and ", served (nfs.backend is none" in line
        st = d.ctl_json("status")
        assert st["last_reload"]["ok"] and st["broken_images"] == {}

        # the daemon asked directly: the served root is this generation's, the rest is said
        root = adm.store.path("web", n).resolve()
        assert publish.confirm_served(d.socket_path, "web", root).state == publish.SERVED
        other = publish.confirm_served(d.socket_path, "web", tmp_path / "elsewhere")
        assert other.refused and f"sidusd serves web from {root}" in other.text
        nope = publish.confirm_served(d.socket_path, "nosuch", root)
        assert nope.refused and "no image nosuch in the running config" in nope.text
        # its initrd disappears from the TFTP root: not served, and why
        (tmp_path / "tftp" / "images" / "web" / f"gen-{n:04d}" / "initrd.img").unlink()
        gone = publish.confirm_served(d.socket_path, "web", root)
        assert gone.refused and "images.web.initrd" in gone.text and "no such regular file" in gone.text
        # no daemon to ask: never "served"
        away = publish.confirm_served(tmp_path / "no.sock", "web", root)
        assert away.refused and "NOT confirmed served" in away.text


def test_a_generation_sidusd_does_not_load_is_not_served(tmp_path):
    """sidus-image writes an images file that this sidusd does not read (its images_file is
    another): the reload succeeds, and before, the build said "served" all the same."""
    store = tmp_path / "store"
    with daemon_reading(tmp_path, tmp_path / "elsewhere.yaml") as d:
        out = io.StringIO()
        adm = Administrator(store, tmp_path / "tftp", out=out, images_file=store / "images.yaml",
                            control_socket=d.socket_path)
        with pytest.raises(BackendError) as ei:
            adm._new_generation("web", None, "build", fake_build)
        assert "does not serve it" in str(ei.value)
        line = out.getvalue().strip().splitlines()[-1]
        assert "NOT served: sidusd says: no image web in the running config" in line, line
        assert ", served" not in line


def test_judge_served_is_pure(tmp_path):
    ok = {"root": "/r", "problems": [], "exported": True, "render_error": None, "nfs_backend": "ganesha"}
    assert publish.judge_served(ok, "x", publish.Path("/r")).state == publish.SERVED
    unexported = publish.judge_served({**ok, "exported": False}, "x", publish.Path("/r"))
    assert unexported.refused and "not exported by the NFS backend (ganesha" in unexported.text
    assert publish.judge_served({**ok, "render_error": "bad"}, "x", publish.Path("/r")).refused
    assert publish.confirm_served(None, "x", publish.Path("/r")).state == publish.UNCONFIRMED
