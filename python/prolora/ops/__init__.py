"""Operators with a reference implementation and registered fast backends (see registry)."""
from .eigh_topk import Eig, topk_eigh
from .projection import METHODS, project_group, project_lora
from .registry import Choice, Op, Problem, overrides_from_env, parse_overrides
from .similarity import phi, phi_null, principal_cosines
from .small_svd import small_svd
from .subspace_phi import subspace_phi
from .svd import Basis, truncated_svd

# backends that register themselves on the ops above: native (prolora._C) and Triton (kernels/)
from . import backends_native, backends_triton, eigh_subspace  # noqa: E402,F401  isort: skip
from . import svd_randomized  # noqa: E402,F401  isort: skip  (extract's small-rank truncated SVD)

ALL_OPS = (truncated_svd, topk_eigh, project_lora, subspace_phi, small_svd)

__all__ = ["ALL_OPS", "Basis", "Choice", "Eig", "METHODS", "Op", "Problem", "overrides_from_env",
           "parse_overrides", "phi", "phi_null", "principal_cosines", "project_lora", "small_svd",
           "subspace_phi", "topk_eigh", "truncated_svd"]
