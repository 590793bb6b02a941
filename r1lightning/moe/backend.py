"""Choosing how a model's expert FFNs run, and the one place that decides whether MegaBlocks can.

Two moments matter:

* `apply_moe_backend` (model construction, often on CPU) decides the backend *name* and sets it as
  transformers' `experts_implementation`. `auto` picks `megablocks` when `megablocks_status()`
  says the kernels import and a CUDA device of compute capability >= 8.0 is visible, else
  transformers' default `grouped_mm`.
* The registered `megablocks` experts function decides the *path* at every call: tensors on CUDA
  run the MegaBlocks kernels, tensors on CPU (a model built on CPU that Lightning has not moved
  yet, or a CPU-only test) run transformers' `grouped_mm`. So building on CPU and moving to CUDA
  later is fine, and nothing is checked twice per step.
"""

from __future__ import annotations

import functools
import logging

import torch

from r1lightning.moe.megablocks_experts import KERNELS  # imports no MegaBlocks module itself

log = logging.getLogger(__name__)

BACKENDS = ("auto", "megablocks", "grouped_mm", "eager")
MEGABLOCKS = "megablocks"


@functools.lru_cache(maxsize=None)
def megablocks_status() -> tuple[bool, str]:
    """(available, reason). Cached: imports are attempted once per process."""
    try:
        import grouped_gemm.backend  # noqa: F401  # the bf16 grouped GEMM
        import megablocks.ops  # noqa: F401  # sort/histogram/cumsum/gather/scatter kernels
    except Exception as err:  # ImportError, or a compiled extension built for another torch
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return False, f"not installed ({first}; see scripts/install_megablocks.sh)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability(0)
    if major < 8:  # grouped_gemm's bf16 cuBLAS path and MegaBlocks' Triton kernels need sm80+
        return False, f"unsupported architecture sm_{major}{minor} (needs sm_80 or newer)"
    return True, "ok"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton importable (CUDA wheels ship it; CPU wheels do not): the one check before any of the
    project's Triton kernels (decode attention, decode experts, the fused SwiGLU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def experts_modules(model: torch.nn.Module):
    """Modules built with transformers' `@use_experts_implementation` (fused 3-D expert weights)."""
    for name, module in model.named_modules():
        if hasattr(module, "is_transposed") and hasattr(module, "has_bias") and hasattr(module, "down_proj"):
            yield name, module


def apply_moe_backend(model, backend: str = "auto", recompute_activation: bool = False, kernels: str = "megablocks") -> str:
    """Select how expert FFNs run; returns the backend in effect (logged by the caller).

    `recompute_activation` (MegaBlocks only): keep the gate/up projection and recompute the gated
    activation in backward instead of storing it (MegaBlocks' memory-optimised MLP idea).
    `kernels` (MegaBlocks only): `megablocks`, or `torch` for the same layout with no host wait
    (`megablocks_experts.SyncFreeKernels`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"policy.moe_backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if kernels not in KERNELS:
        raise ValueError(f"policy.megablocks_kernels: {kernels!r} is not one of {', '.join(KERNELS)}")
    if not hasattr(model, "set_experts_implementation") or not model._can_set_experts_implementation():
        if backend == MEGABLOCKS:
            log.warning("moe_backend=megablocks unavailable: %s has no transformers experts interface; "
                        "using dense", type(model).__name__)
        return "dense"

    chosen = backend
    if backend in ("auto", MEGABLOCKS):
        ok, reason = megablocks_status()
        if ok:
            from r1lightning.moe.megablocks_experts import register, unsupported_reason

            register()
            modules = list(experts_modules(model))
            reasons = {type(m).__name__: unsupported_reason(m) for _, m in modules}
            bad = {cls: why for cls, why in reasons.items() if why}
            if modules and len(bad) == len(reasons):
                reason = "; ".join(f"{cls}: {why}" for cls, why in bad.items())
                ok = False
            else:
                for cls, why in bad.items():  # mixed models: only those modules fall back
                    log.warning("moe_backend=megablocks: %s falls back to grouped_mm (%s)", cls, why)
        if ok:
            chosen = MEGABLOCKS
        else:
            chosen = "grouped_mm"
            if backend == MEGABLOCKS:
                log.warning("moe_backend=megablocks unavailable: %s; using grouped_mm", reason)
            else:
                log.info("moe_backend=auto: megablocks unavailable (%s); using grouped_mm", reason)

    model.set_experts_implementation(chosen)
    for _, module in experts_modules(model):
        module._r1l_recompute_activation = bool(recompute_activation)
        module._r1l_kernels = kernels
    return chosen
