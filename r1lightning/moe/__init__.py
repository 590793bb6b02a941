"""MoE expert backends: MegaBlocks kernels on CUDA, transformers' `grouped_mm` / `eager` elsewhere.

`apply_moe_backend(model, backend)` is the only entry point the rest of the project needs; see
`backend.py` for when availability is decided, `megablocks_experts.py` for the MegaBlocks path, and
`decode_experts.py` for the graph-safe experts the rollout engines switch to while decoding.
"""

from __future__ import annotations

from r1lightning.moe.backend import BACKENDS, MEGABLOCKS, apply_moe_backend, experts_modules, megablocks_status

__all__ = ["BACKENDS", "MEGABLOCKS", "apply_moe_backend", "experts_modules", "megablocks_status"]
