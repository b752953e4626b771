"""How the jobs name an output module: the base model spells each canonical module for the chosen
LoRA format (kohya, peft, comfy, xlabs, diffusers-old); a slice of a fused Flux weight that the
format fuses with others gets a part key (formats.parts), which the writer assembles."""
from __future__ import annotations

from ..checkpoints import BaseModel
from ..errors import ModelError
from ..formats.parts import part_key


def spelling_for(fmt: str, model: BaseModel) -> str:
    """The module-name spelling a LoRA file of format `fmt` uses for `model`."""
    if fmt == "xlabs" and model.family != "flux":
        raise ModelError(f"the XLabs LoRA format exists for Flux only; {model.name} is {model.family}")
    if fmt == "diffusers-old" and model.family == "flux":
        raise ModelError("the old diffusers LoRA format has no Flux layout; write peft, kohya, comfy or xlabs")
    return {"kohya": model.kohya_spelling, "peft": "peft", "diffusers-old": "peft", "comfy": "comfy",
            "xlabs": "xlabs"}[fmt]


def output_key(model: BaseModel, module: str, spelling: str) -> tuple[str | None, str | None]:
    """(LoRA module key, None), or (None, why the format has no name for `module`)."""
    why = model.unspellable(module, spelling)
    if why is not None:
        return None, why
    fused = model.spell_fused(module, spelling)
    if fused is not None:
        key, total, rows = fused
        return part_key(key, rows, total), None
    try:
        return model.spell(module, spelling), None
    except ModelError as e:
        return None, str(e)
