"""MoE expert backends. Placeholder until the MegaBlocks issue lands: only transformers' own."""

from __future__ import annotations

BACKENDS = ("auto", "megablocks", "grouped_mm", "eager")


def apply_moe_backend(model, backend: str = "auto") -> str:
    """Select how expert FFNs run; returns the backend in effect (logged by the caller)."""
    if backend not in BACKENDS:
        raise ValueError(f"policy.moe_backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not hasattr(model, "set_experts_implementation") or not model._can_set_experts_implementation():
        return "dense"
    chosen = "grouped_mm" if backend in ("auto", "megablocks") else backend
    model.set_experts_implementation(chosen)
    return chosen
