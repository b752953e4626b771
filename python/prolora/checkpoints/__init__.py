"""Base-model readers: diffusers folders (plain, fp16 variant, sharded) and single-file LDM/SGM
checkpoints, with key maps built from each file's own keys. Tensors are read lazily."""
from .model import SPELLINGS, BaseModel, WeightRef
from .reader import open_model

__all__ = ["BaseModel", "WeightRef", "open_model", "SPELLINGS"]
