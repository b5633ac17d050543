"""The files sidusd ships inside its package (package data, in the wheel and the Debian package).

* ``initramfs/``: the overlay hook that ``sidus-image`` installs into every image and the
  demo lab builds into its initrd (``hooks/sidus-overlay``, ``scripts/init-bottom/sidus-overlay``,
  ``modules``);
* ``sidus.yaml``, ``inventory.yaml``: the example configuration and inventory, every key
  documented (the Debian package installs them as /etc/sidus/sidus.yaml and the first
  /var/lib/sidus/inventory.yaml);
* ``recipes/``: image recipes (``example.yaml``, ``minimal.yaml``, the e2e test's).

Every reader finds them here, through :mod:`importlib.resources`, never through a checkout:
the same code runs from a checkout, a venv, pipx or /usr/lib/python3/dist-packages.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """The file or directory ``parts`` of the package data, as a real path.

    sidusd is installed as files (a wheel unpacked by pip, the Debian package), never
    imported from a zip: the hook is copied and ``mkinitramfs`` reads a directory, so a
    path is what the callers need, and a zip import is refused here by name."""
    base = files(__name__)
    if not isinstance(base, Path):
        raise RuntimeError(f"sidusd's package data is not on a file system ({base!r}): "
                           "install sidusd as files (pip, pipx, the Debian package), not as a zip")
    return base.joinpath(*parts)


INITRAMFS = path("initramfs")
EXAMPLE_CONFIG = path("sidus.yaml")
EXAMPLE_INVENTORY = path("inventory.yaml")
RECIPES = path("recipes")
