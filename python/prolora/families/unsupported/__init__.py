"""Architectures prolora recognises but does not transfer, refused by name. (Placeholder.)"""
from __future__ import annotations

from ..record import Family

FAMILY = Family(name="unsupported", members=(), title="recognised, not supported",
                claim_file=lambda path, header: None, claim_folder=lambda path: None, refuses=True,
                metadata_hints=(("sd3", "sd3"), ("stable-diffusion-v3", "sd3"), ("stable-diffusion-3", "sd3")))
