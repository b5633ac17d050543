"""sidusctl and sidus-image read the daemon's config (sidusd/cliconfig.py): which file (--config >
$SIDUS_CONFIG > /etc/sidus/sidus.yaml), each value (its flag > its environment variable > the
file), and a clear refusal when the file they need is missing or invalid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sidusd import cliconfig, ctl
from sidusd.cliconfig import ToolConfigError, config_source, image_paths
from sidusd.control import messages as m
from sidusd.image import __main__ as image_main
from sidusd.image.build import Administrator

BASE = 'dhcp: {mode: "off"}\nnfs: {backend: none}\n'


def write_config(path: Path, tftp: str, images_file: str | None, sock: str) -> Path:
    text = BASE + f"tftp: {{root: {tftp}}}\ncontrol: {{socket_path: {sock}}}\n"
    if images_file is not None:
        text += f"images_file: {images_file}\n"
    path.write_text(text)
    return path


@pytest.fixture
def env(monkeypatch):
    for name in ("SIDUS_CONFIG", "SIDUS_SOCKET", "SIDUS_IMAGES_DIR", "SIDUS_TFTP_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_which_config_file():
    assert config_source(None, {}).path == Path("/etc/sidus/sidus.yaml") == cliconfig.DEFAULT_CONFIG
    assert config_source(None, {"SIDUS_CONFIG": "/e.yaml"}).path == Path("/e.yaml")
    assert config_source("/f.yaml", {"SIDUS_CONFIG": "/e.yaml"}).path == Path("/f.yaml")
    assert config_source(None, {"SIDUS_CONFIG": ""}).origin == "default"


def test_sidusctl_refuses_a_missing_config_naming_it_and_the_way_out(env, tmp_path, capsys):
    calls = []
    env.setattr(ctl, "call", lambda *a: calls.append(a))
    missing = tmp_path / "absent.yaml"
    assert ctl.main(["--config", str(missing), "status"]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{missing} (--config): no such file" in err and "control.socket_path" in err and "--socket" in err
    env.setenv("SIDUS_CONFIG", str(missing))
    assert ctl.main(["status"]) == ctl.EXIT_USAGE
    assert f"{missing} ($SIDUS_CONFIG): no such file" in capsys.readouterr().err
    assert calls == []                      # nothing was sent anywhere


def test_sidusctl_refuses_an_invalid_config_with_the_key(env, tmp_path, capsys):
    bad = tmp_path / "sidus.yaml"
    bad.write_text(BASE + "tftp: {root: /t}\ncontrol: {socket_pat: /x.sock}\n")
    assert ctl.main(["--config", str(bad), "reload"]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid" in err and "control.socket_pat" in err and "sidusd --check" in err


def test_sidusctl_needs_no_config_with_an_explicit_socket(env, tmp_path, capsys):
    seen = []
    env.setattr(ctl, "call", lambda path, op, args, t: seen.append(path) or m.Response(True, {}))
    env.setenv("SIDUS_CONFIG", str(tmp_path / "absent.yaml"))
    assert ctl.main(["--socket", "/s.sock", "reload"]) == 0 and seen == ["/s.sock"]


def test_image_paths_come_from_the_config(env, tmp_path):
    cfg = write_config(tmp_path / "sidus.yaml", "/srv/x/tftp", "/var/x/images/images.yaml", "/run/x.sock")
    p = image_paths(images_dir=None, tftp_root=None, images_file=None, control_socket=None, config_flag=cfg)
    assert (p.images_dir, p.tftp_root, p.images_file, p.control_socket, p.config) == (
        Path("/var/x/images"), Path("/srv/x/tftp"), Path("/var/x/images/images.yaml"), Path("/run/x.sock"), cfg)


def test_image_paths_precedence_flag_env_config(env, tmp_path):
    cfg = write_config(tmp_path / "sidus.yaml", "/cfg/tftp", "/cfg/images/images.yaml", "/cfg.sock")
    env.setenv("SIDUS_CONFIG", str(cfg))
    env.setenv("SIDUS_TFTP_ROOT", "/env/tftp")
    env.setenv("SIDUS_SOCKET", "/env.sock")
    p = image_paths(images_dir=None, tftp_root=None, images_file=None, control_socket=None, config_flag=None)
    assert (p.images_dir, p.tftp_root, p.control_socket) == (Path("/cfg/images"), Path("/env/tftp"), Path("/env.sock"))
    p = image_paths(images_dir=None, tftp_root=Path("/flag/tftp"), images_file=None,
                    control_socket=Path("/flag.sock"), config_flag=None)
    assert (p.tftp_root, p.control_socket) == (Path("/flag/tftp"), Path("/flag.sock"))
    env.setenv("SIDUS_IMAGES_DIR", "/env/images")       # not the config's directory: not its images file
    p = image_paths(images_dir=None, tftp_root=None, images_file=None, control_socket=None, config_flag=None)
    assert (p.images_dir, p.images_file) == (Path("/env/images"), Path("/env/images/images.yaml"))


def test_image_paths_need_no_config_when_both_directories_are_given(env, tmp_path):
    p = image_paths(images_dir=tmp_path / "i", tftp_root=tmp_path / "t", images_file=None, control_socket=None,
                    config_flag=None)
    assert p.config is None and p.images_file == tmp_path / "i" / "images.yaml" and p.control_socket is None
    env.setenv("SIDUS_CONFIG", str(tmp_path / "absent.yaml"))   # named: it is read (list and gc use it)
    with pytest.raises(ToolConfigError, match=r"absent.yaml \(\$SIDUS_CONFIG\): no such file"):
        image_paths(images_dir=tmp_path / "i", tftp_root=tmp_path / "t", images_file=None, control_socket=None,
                    config_flag=None)


def test_image_paths_refuse_a_config_without_images_file(env, tmp_path):
    cfg = write_config(tmp_path / "sidus.yaml", "/t", None, "/s.sock")
    with pytest.raises(ToolConfigError, match="images_file is not set.*--images-dir"):
        image_paths(images_dir=None, tftp_root=None, images_file=None, control_socket=None, config_flag=cfg)


def test_sidus_image_works_from_the_config_alone(env, tmp_path, capsys):
    images = tmp_path / "images"
    cfg = write_config(tmp_path / "sidus.yaml", str(tmp_path / "tftp"), str(images / "images.yaml"),
                       str(tmp_path / "no-daemon.sock"))
    env.setenv("SIDUS_CONFIG", str(cfg))
    adm = Administrator(images, tmp_path / "tftp", out=io.StringIO())
    adm._new_generation("demo", None, "build", lambda part, log: {})     # a generation, no kernel
    capsys.readouterr()
    assert image_main.main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["generation"], r["served"]) for r in rows] == [("demo", 1, True)]
    assert (images / "images.yaml").exists()
    cfg.write_text("tftp: {root: /t}\n")   # dhcp.interfaces missing
    assert image_main.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sidus-image: {cfg} ($SIDUS_CONFIG): invalid: dhcp.interfaces")


def test_sidusd_reads_the_same_file(env, tmp_path, capsys):
    from sidusd import __main__ as sidusd_main
    bad = tmp_path / "env.yaml"
    bad.write_text("tftp: {root: /t}\n")
    env.setenv("SIDUS_CONFIG", str(bad))
    assert sidusd_main.main(["--check"]) == 2
    assert capsys.readouterr().err.startswith(f"sidusd: {bad}: dhcp.interfaces")
    assert cliconfig.DEFAULT_CONFIG == Path(sidusd_main.DEFAULT_CONFIG)


def test_sidus_image_reloads_through_the_configs_socket_only_while_it_exists(env, tmp_path, capsys):
    """The config's control socket absent (sidusd not running): the switch is done and no reload is
    tried (sidusd reads the images file when it starts).  A socket given by flag is used as given."""
    images = tmp_path / "images"
    cfg = write_config(tmp_path / "sidus.yaml", str(tmp_path / "tftp"), str(images / "images.yaml"),
                       str(tmp_path / "no-daemon.sock"))
    adm = Administrator(images, tmp_path / "tftp", out=io.StringIO())
    for _ in range(2):
        adm._new_generation("demo", None, "build", lambda part, log: {})
    capsys.readouterr()                   # the builds' own log lines (structlog's default config)
    assert image_main.main(["--config", str(cfg), "rollback", "demo"]) == 0
    out = capsys.readouterr().out.strip()            # no sidusd to ask: switched, never called "served"
    assert out.startswith("demo: generation 1: switched; not confirmed served: no control socket"), out
    code = image_main.main(["--config", str(cfg), "--control-socket", str(tmp_path / "no-daemon.sock"),
                            "rollback", "demo", "--to", "2"])
    assert code == 1 and "sidusctl reload failed" in capsys.readouterr().err
