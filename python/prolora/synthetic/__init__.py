"""Deterministic synthetic base models and LoRAs in real layouts (being split into modules)."""
from .models import *  # noqa: F401,F403
from .models import _generator  # noqa: F401
