"""Family-agnostic parts of base-model reading: BaseModel and WeightRef (model.py), diffusers
component folders (folders.py), text encoders (encoders.py) and weights held in memory
(memory.py). The families (prolora.families) build models from them; open one with
`prolora.families.open_model`."""
from .model import BaseModel, WeightRef

__all__ = ["BaseModel", "WeightRef"]
