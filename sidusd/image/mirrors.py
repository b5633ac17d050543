"""The Debian mirrors of an image's apt sources: the recipe's, else this host's (never a host
name written in code).  Imported by sidusd.image.build; sidusd.image.recipe (msgspec, yaml)
only when a build asks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sidusd.errors import BackendError
from sidusd.image.stages import has_security_archive

if TYPE_CHECKING:
    from sidusd.image.recipe import Recipe


def _host_sources(etc_apt: Path) -> list[str]:
    texts = []
    for p in [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") and p.is_file():
            texts.append(p.read_text(errors="replace"))
    return texts


def host_mirror(suite: str | None, etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror of this host's apt sources (never a host name written in code)."""
    from sidusd.image.recipe import mirror_from_sources
    texts = _host_sources(etc_apt)
    for t in texts:
        m = mirror_from_sources(t, suite)
        if m:
            return m
    raise BackendError("no Debian mirror found in the host's apt sources",
                       detail=f"set mirror: in the recipe (looked in {etc_apt})")


def security_mirror(recipe: Recipe, etc_apt: Path = Path("/etc/apt")) -> str | None:
    """The security archive for the image's apt sources: the recipe's ``security_mirror``, none when
    it is ``false`` or the suite has none (sid), else the host's entry for ``<suite>-security``."""
    if recipe.security_mirror is False or not has_security_archive(recipe.suite):
        return None
    if isinstance(recipe.security_mirror, str):
        return recipe.security_mirror
    from sidusd.image.recipe import security_from_sources
    for t in _host_sources(etc_apt):
        m = security_from_sources(t, recipe.suite)
        if m:
            return m
    raise BackendError(f"no {recipe.suite}-security archive in the host's apt sources",
                       detail=f"set security_mirror: URL in the recipe, or security_mirror: false for an image "
                              f"without security updates (looked in {etc_apt})")
