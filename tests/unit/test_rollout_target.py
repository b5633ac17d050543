"""``push --to``: a local rack directory or ``[user@]host:/path`` over ssh (rollout_plan.parse_target)."""

from __future__ import annotations

import shlex

import pytest

from sidusd.image import rollout_plan as rp
from sidusd.image.rollout_remote import remote_argv


@pytest.mark.parametrize("text, want", [
    ("/srv/rack1", rp.Target("/srv/rack1")),
    ("racks/r1", rp.Target("racks/r1")),
    ("./odd:name", rp.Target("./odd:name")),            # a colon after a slash: a local path, as for rsync
    ("rack1:/srv/rack", rp.Target("/srv/rack", "rack1")),
    ("root@10.0.0.5:/srv/rack", rp.Target("/srv/rack", "root@10.0.0.5")),
])
def test_a_target_is_local_unless_a_colon_comes_before_any_slash(text, want):
    assert rp.parse_target(text) == want


@pytest.mark.parametrize("text", ["rack1:relative/path", ":/srv/rack", "-oProxyCommand=x:/srv", "host:/a b",
                                  "rsync://host/module/rack"])
def test_a_remote_target_needs_a_host_and_an_absolute_path(text):
    with pytest.raises(ValueError):
        rp.parse_target(text)


def test_the_rack_side_command_is_quoted_for_the_remote_shell():
    argv = remote_argv("ssh -p 2222", rp.Target("/srv/my rack", "r1"), "sidus-image", "demo", 7, 6,
                       "a" * 64, 12, "/build/images/demo/gen-0007; rm -rf /", serve=False)
    assert argv[:4] == ["ssh", "-p", "2222", "r1"] and len(argv) == 5
    words = shlex.split(argv[4])                # what the rack's shell makes of it
    assert words == ["sidus-image", "--images-dir", "/srv/my rack/images", "--tftp-root", "/srv/my rack/tftp",
                     "rack-receive", "/srv/my rack", "demo", "7", "--manifest", "a" * 64, "--entries", "12",
                     "--source", "/build/images/demo/gen-0007; rm -rf /", "--parent", "6", "--no-serve"]
