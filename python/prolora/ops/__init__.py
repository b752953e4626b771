"""Operators with a reference implementation and registered fast backends (see registry)."""
from .projection import METHODS, project_lora
from .registry import Choice, Op, Problem, overrides_from_env, parse_overrides
from .similarity import phi, phi_null, principal_cosines
from .svd import Basis, truncated_svd

ALL_OPS = (truncated_svd, principal_cosines, project_lora)

__all__ = ["ALL_OPS", "Basis", "Choice", "METHODS", "Op", "Problem", "overrides_from_env",
           "parse_overrides", "phi", "phi_null", "principal_cosines", "project_lora", "truncated_svd"]
