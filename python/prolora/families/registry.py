"""The registry of model families: one line per family package, one record each.

Adding a family is one package under `families/` that defines `FAMILY` (a `record.Family`) and one
entry in `PACKAGES`. Everything that needs to know a family (opening models, the plan's rules,
inspect's guesses, the synthetic writers, refine, bench) loops over `families()` or asks `get`.
"""
from __future__ import annotations

import importlib
import threading

from .record import Family

# the registry: each name is a package of prolora.families that defines FAMILY. Order is the
# order in which families are asked to claim an input and to guess what a LoRA is for; strict
# detection makes the claims exclusive, so it matters only for the guesses.
PACKAGES = (
    "flux2",  # before flux: its LoRA metadata hints ("flux2", "flux-2") must be asked before FLUX.1's "flux"
    "flux",
    "wan",
    "qwen_image",
    "sd",
    "z_image",
    "unsupported",
)

_lock = threading.Lock()
_by_name: dict[str, Family] = {}
_by_member: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family (its name and members must be new); returns it."""
    with _lock:
        if family.name in _by_name:
            raise ValueError(f"family {family.name!r} is registered already")
        taken = [m for m in family.members if m in _by_member]
        if taken:
            raise ValueError(f"family {family.name!r}: member {taken[0]!r} belongs to {_by_member[taken[0]].name!r}")
        _by_name[family.name] = family
        for m in family.members:
            _by_member[m] = family
    return family


def _load() -> None:
    if len(_by_name) >= len(PACKAGES):
        return
    for pkg in PACKAGES:
        mod = importlib.import_module(f"{__package__}.{pkg}")
        if mod.FAMILY.name not in _by_name:
            register(mod.FAMILY)


def families() -> list[Family]:
    """Every registered family, in registry order (the refusing ones last)."""
    _load()
    return list(_by_name.values())


def get(name: str | None) -> Family | None:
    """The family whose name or member is `name` ("sd", "sdxl", "flux", "chroma", ...), or None."""
    if name is None:
        return None
    _load()
    return _by_member.get(name) or _by_name.get(name)


def of(model) -> Family | None:
    """The family of a BaseModel (by its `family` member), or None for an unknown one."""
    return get(getattr(model, "family", None))


def members() -> list[str]:
    """Every member name, in registry order."""
    return [m for f in families() for m in f.members]
