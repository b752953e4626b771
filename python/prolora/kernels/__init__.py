"""Triton kernels of prolora (`prolora.kernels`, an ordinary subpackage: a source-tree run with
PYTHONPATH=python imports the same files an install does).

Each kernel module wraps its launches in plain functions over torch tensors; the operator
backends (prolora.ops.backends_triton) register them. Importing this package does not import
Triton: `triton_missing()` says why Triton cannot be used, and the kernel modules import it.
Set TRITON_INTERPRET=1 before the first Triton import to run the kernels on the CPU (tests).
"""
from __future__ import annotations

from ._config import interpreting, triton_missing

__all__ = ["interpreting", "triton_missing"]
