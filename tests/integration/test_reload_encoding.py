"""A file that is not UTF-8 is a refusal naming the file and the byte offset (issue 14 item 13).

The real daemon (``python3 -m sidusd``) with its real control socket: a
reload with a non-UTF-8 inventory is refused (no "internal error", no
traceback in the log), the old inventory keeps serving over TFTP (tftpy),
and the same holds for the config file and for recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from daemon_fixture import SidusDaemon

from sidusd import config
from sidusd.errors import ConfigError
from sidusd.image.recipe import read_recipe

MAC1 = "52:54:00:00:14:01"
MAC2 = "52:54:00:00:14:02"


def test_reload_with_non_utf8_inventory_keeps_the_old_one_and_names_file_and_offset(tmp_path: Path) -> None:
    host1 = {"mac": MAC1, "hostname": "h1", "profile": "default", "append": "sidus.test=old"}
    with SidusDaemon(tmp_path, hosts=[host1]) as d:
        inv = tmp_path / "inventory.yaml"
        doc = yaml.safe_dump({"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}},
                              "hosts": [host1, {"mac": MAC2, "hostname": "h2", "profile": "default"}]})
        data = doc.encode() + b"# edited by Ren\xe9\n"       # Latin-1, as an old editor might save it
        offset = data.index(b"\xe9")
        line = data.count(b"\n", 0, offset) + 1
        inv.write_bytes(data)
        r = d.ctl("reload", check=False)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "internal error" not in r.stderr and "UnicodeDecodeError" not in r.stderr, r.stderr
        assert str(inv) in r.stderr and f"offset {offset}" in r.stderr and f"line {line}," in r.stderr, r.stderr
        assert "reload refused, the previous configuration keeps serving" in r.stderr
        assert [h["mac"] for h in d.ctl_json("hosts", "list")] == [MAC1]
        served = d.tftp_get("pxelinux.cfg/01-" + MAC1.replace(":", "-"))
        assert b"sidus.test=old" in served
        refused = [e for e in d.events() if e.get("event") == "reload.refused"]
        assert refused and f"offset {offset}" in refused[-1]["error"], refused
        assert "Traceback" not in d.log_tail(200)


@pytest.mark.parametrize("name", ["sidus.yaml", "recipe.yaml"])
def test_config_and_recipe_not_utf8_name_file_and_offset(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"name: demo\n# caf\xe9\n")
    reader = config.read if name == "sidus.yaml" else read_recipe
    with pytest.raises(ConfigError) as exc:
        reader(p)
    assert exc.value.path == str(p)
    assert exc.value.reason.startswith("not UTF-8 text: byte 0xe9 at offset 16 (line 2, column 6)"), exc.value
