"""Model configurations by name: the presets of the families' synthetic parts, looked up through
the registry (no family is named here).

A family's synthetic part (`prolora.families.<f>.synthetic`, `Family.parts["synthetic"]`) offers
`PRESETS` (preset name -> config) and `preset(name, scale)`; `preset("sdxl", "tiny")` or
`resolve("flux-dev:small")` gives the configuration every other synthetic module builds from.

A family config writes itself; what write_model, write_pair and the conformance suite ask of it:

    family        the member (or label) its metadata names
    layouts       the layouts write_model writes ("diffusers", "single-file", ...)
    derived_from  members a TARGET of this config may be written from (weights both have are
                  perturbed from that base, the others drawn fresh; e.g. Chroma from FLUX.1)
    params()      {component: [(name, shape), ...]} in state_dict order
    write(path, params, layout, values, dtype, meta, shard_bytes)
    optional:     dtype (default torch dtype, float16 when absent), shard_bytes, threads (torch
                  threads while generating), facts() (more fields for the file metadata)
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any, Union

# a family config, or a preset name with an optional ":scale" ("sdxl:tiny")
ConfigLike = Union[Any, str]


def synthetic_parts() -> list[ModuleType]:
    """The "synthetic" parts of the registered families (prolora.families.<f>.synthetic) that
    exist, in registry order."""
    from .. import families

    return [fam.part("synthetic") for fam in families.families()
            if fam.has("synthetic") and importlib.util.find_spec(fam.parts["synthetic"]) is not None]


def synthetic_part(member: str | None) -> ModuleType | None:
    """The synthetic part of the family of `member` (a family name or member), where it has one."""
    from .. import families

    fam = families.get(member)
    if fam is None or not fam.has("synthetic") or importlib.util.find_spec(fam.parts["synthetic"]) is None:
        return None
    return fam.part("synthetic")


def preset(name: str, scale: str = "full") -> Any:
    """A named configuration (any preset of a family's synthetic part: "sd15", "sdxl", "flux-dev",
    "chroma", "qwen-image", "wan2.1-t2v-14b", ...) at a scale its part offers ("full", "small",
    "tiny", ...)."""
    parts = synthetic_parts()
    for part in parts:
        if name in getattr(part, "PRESETS", {}):
            return part.preset(name, scale)
    names = [n for part in parts for n in sorted(getattr(part, "PRESETS", {}))]
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(names)}")


def default_preset() -> str:
    """The preset write_model, write_pair and make_demo use when given none: the first a family's
    synthetic part names as its `DEFAULT_PRESET` ("name:scale")."""
    for part in synthetic_parts():
        name = getattr(part, "DEFAULT_PRESET", None)
        if name:
            return name
    raise ValueError("no family's synthetic part names a default preset: pass a config or a preset name")


def resolve(cfg: ConfigLike | None) -> Any:
    """A config as given, or the preset a name such as "sdxl", "sd15:tiny" or "flux-dev:small"
    names (None: the default preset)."""
    if cfg is None:
        cfg = default_preset()
    if not isinstance(cfg, str):
        return cfg
    name, _, scale = cfg.partition(":")
    return preset(name, scale or "full")
