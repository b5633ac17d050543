"""``sidus-image rollback`` and ``publish`` say "served" only when the real sidusd, asked on its
control socket (``images.status``), serves that generation, like build/update/run do
(image/publish.py ``confirm_served``; issue 15: before, rollback printed "served" unasked)."""

from __future__ import annotations

import io

from daemon_fixture import SidusDaemon, base_config, free_udp_port
from test_served_confirmation import fake_build  # what a build leaves (no debootstrap)

from sidusd.image import __main__ as image_main
from sidusd.image.build import Administrator


def kept_shell(part, logfile) -> dict:
    return {**fake_build(part, logfile), "command": ["shell"], "kept": True}


def daemon_reading(tmp_path, images_file):
    cfg = base_config(tmp_path, free_udp_port())
    cfg["images_file"] = str(images_file)
    return SidusDaemon(tmp_path, config=cfg)


def cli(tmp_path, store, images_file, sock, *args: str) -> int:
    return image_main.main(["--images-dir", str(store), "--tftp-root", str(tmp_path / "tftp"),
                            "--images-file", str(images_file), "--control-socket", str(sock), *args])


def test_rollback_and_publish_are_served_when_sidusd_says_so(tmp_path, capsys):
    store = tmp_path / "store"
    images_file = store / "images.yaml"
    with daemon_reading(tmp_path, images_file) as d:
        adm = Administrator(store, tmp_path / "tftp", out=io.StringIO(), images_file=images_file,
                            control_socket=d.socket_path)
        for _ in range(2):
            adm._new_generation("web", None, "build", fake_build)
        capsys.readouterr()
        assert cli(tmp_path, store, images_file, d.socket_path, "rollback", "web") == 0
        out = capsys.readouterr().out.strip()
        assert out == "web: generation 1: served (nfs.backend is none: the NFS export is yours to make)", out
        assert d.ctl_json("status")["last_reload"]["ok"]

        adm._new_generation("web", None, "shell", kept_shell)            # generation 3, kept, not served
        capsys.readouterr()
        assert cli(tmp_path, store, images_file, d.socket_path, "publish", "web") == 0
        assert capsys.readouterr().out.strip().startswith("web: generation 3: served (")
        assert adm.store.current("web") == 3


def test_rollback_to_a_generation_sidusd_does_not_serve_says_so_and_fails(tmp_path, capsys):
    """sidusd reads another images file: the reload succeeds, the rollback's switch is done, and
    sidusd serves no image "web".  Before, ``rollback`` printed "web: generation 1 served", exit 0."""
    store = tmp_path / "store"
    images_file = store / "images.yaml"
    with daemon_reading(tmp_path, tmp_path / "elsewhere.yaml") as d:
        adm = Administrator(store, tmp_path / "tftp", out=io.StringIO(), images_file=images_file)
        for _ in range(2):
            adm._new_generation("web", None, "build", fake_build)
        capsys.readouterr()
        assert cli(tmp_path, store, images_file, d.socket_path, "rollback", "web") == 1
        cap = capsys.readouterr()
        assert adm.store.current("web") == 1                            # switched all the same
        assert cap.out.strip() == ("web: generation 1: NOT served: sidusd says: no image web in the running "
                                   "config (images: demo)")
        assert "generation 1 is switched, but sidusd does not serve it" in cap.err
        assert " served" not in cap.out.replace("NOT served", "")

        adm._new_generation("web", None, "shell", kept_shell)             # generation 3, kept
        capsys.readouterr()
        assert cli(tmp_path, store, images_file, d.socket_path, "publish", "web", "3") == 1
        assert capsys.readouterr().out.strip().startswith("web: generation 3: NOT served: ")


def test_rollback_without_a_daemon_to_ask_is_not_called_served(tmp_path, capsys):
    """No control socket at all (both directories given, no config): switched, not confirmed."""
    store = tmp_path / "store"
    adm = Administrator(store, tmp_path / "tftp", out=io.StringIO())
    for _ in range(2):
        adm._new_generation("web", None, "build", fake_build)
    capsys.readouterr()
    assert image_main.main(["--images-dir", str(store), "--tftp-root", str(tmp_path / "tftp"),
                            "rollback", "web"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("web: generation 1: switched; not confirmed served: no control socket"), out
