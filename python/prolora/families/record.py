"""The Family record: everything the rest of prolora may ask about one model family.

A family package (`prolora.families.<name>`) builds one `Family` and registers it
(`families.register`). Outside `families/`, no code names a family: the plan, the engine, the CLI,
refine, bench and the jobs ask the record (which output formats have a layout for these models,
which member pairs correspond layer by layer, how a LoRA's keys say what it is for, ...).

Every hook is optional except the openers. An opener *claims* an input: it returns a model when
the input is this family's (required keys, shapes and, where there is one, the config class all
match), None when it is not, and raises ModelError when it is this family's but cannot be read.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # type names only: the record module imports nothing of the packages it describes
    from ..checkpoints.memory import InMemory
    from ..checkpoints.model import BaseModel
    from ..lora import LoraFile, LoraModule
    from ..safetensors_io import Header

FileOpener = Callable[[Path, "Header"], "BaseModel | None"]
FolderOpener = Callable[[Path], "BaseModel | None"]
MemoryOpener = Callable[["InMemory"], "BaseModel | None"]
# (source, target, --widths) -> why the pair must not run, or None
PairRefusal = Callable[["BaseModel", "BaseModel", str], "str | None"]
# (modules of an output, output format, target) -> warnings; adds zero-delta modules a loader needs
PadOutput = Callable[["dict[str, LoraModule]", str, "BaseModel"], "list[str]"]
# a LoRA -> (member, how it was told) when its key names or shapes say it is for this family
LoraHint = Callable[["LoraFile"], "tuple[str, str] | None"]
# canonical module id -> (block group, block index, role inside the block), for similarity matching
BlockOf = Callable[[str], "tuple[str, int, str] | None"]

FORMATS = ("kohya", "peft", "comfy", "diffusers-old", "xlabs")


@dataclass(frozen=True)
class BenchPreset:
    """One `prolora bench --family NAME` choice: a synthetic source/target pair of the family."""

    dtype: str = "float16"  # the pair's stored dtype (a torch dtype's name)
    help: str | None = None  # what `prolora bench --help` says of it, where the name alone does not tell
    default: bool = False  # the choice without --family (one preset of all families)


@dataclass(frozen=True)
class Loader:
    """How diffusers' pipeline loader (`load_lora_weights` on a state dict) takes a transferred
    LoRA of this family exactly (prolora.diffusers.load_lora)."""

    format: str = "peft"  # the LoRA format it applies exactly from a state dict
    alpha_keys: bool = False  # it reads `<module>.alpha` entries of a PEFT state dict as the alphas
    # expert label -> pipeline component, for pipelines that hold several experts (Wan 2.2 A14B)
    experts: dict[str, str] = field(default_factory=dict)
    # load_lora_weights keyword arguments per expert component (e.g. load_into_transformer_2)
    expert_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One model family: its members (the `BaseModel.family` values its readers give), how its
    models are opened, and the rules the rest of prolora reads (see the module doc)."""

    name: str  # the package's name, e.g. "flux"
    members: tuple[str, ...]  # e.g. ("flux", "chroma")
    title: str  # for messages and docs, e.g. "FLUX.1 (dev, schnell) and Chroma"
    claim_file: FileOpener
    claim_folder: FolderOpener
    claim_memory: MemoryOpener | None = None
    # member pairs (a, b), a != b, whose layers correspond by name (and by similarity where the
    # block depths differ): transfers between them are allowed
    related: frozenset[tuple[str, str]] = frozenset()
    # output formats that have a layout for these models, in the order the docs list them, and
    # narrower lists for members that lack some (Chroma has no XLabs layout)
    formats: tuple[str, ...] = ("kohya", "peft", "comfy")
    member_formats: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lora_hint: LoraHint | None = None
    metadata_hints: tuple[tuple[str, str], ...] = ()  # (substring of a LoRA's base-model metadata, member)
    pair_refusal: PairRefusal | None = None
    pad_output: PadOutput | None = None
    block_of: BlockOf | None = None
    # what a LoRA extracted from these models says of its base (modelspec / kohya ss_* metadata)
    lora_metadata: Callable[["BaseModel"], dict[str, str]] | None = None
    # (target, target_2) -> expert label -> model path, where a target holds several experts
    experts: Callable[[Any, Any], "dict[str, Path] | None"] | None = None
    # modules imported on first use (they need torch-heavy or optional packages): "synthetic"
    # (the model and LoRA writers, presets), "refine" (the denoiser builder and conditioning)
    parts: dict[str, str] = field(default_factory=dict)
    # how diffusers' pipeline loader takes this family's LoRAs from a state dict
    loader: Loader = field(default_factory=Loader)
    # `prolora bench --family` choices (preset name -> BenchPreset), in the order --help lists them
    bench: dict[str, BenchPreset] = field(default_factory=dict)
    # True for a package that only recognises architectures to refuse them by name
    refuses: bool = False

    def part(self, kind: str) -> ModuleType:
        """The family's `kind` module ("synthetic", "refine", ...), imported now; ModelError-free
        KeyError naming the family when it has none."""
        path = self.parts.get(kind)
        if path is None:
            raise KeyError(f"the {self.title} family has no {kind} part")
        return importlib.import_module(path)

    def has(self, kind: str) -> bool:
        return kind in self.parts

    def supports_format(self, fmt: str, member: str | None = None) -> bool:
        """Whether output format `fmt` has a layout for this family (for `member`, if given)."""
        return fmt in self.member_formats.get(member, self.formats)

    def relates(self, a: str, b: str) -> bool:
        """True when members `a` and `b` correspond layer by layer (a == b always does)."""
        return a == b or (a, b) in self.related
