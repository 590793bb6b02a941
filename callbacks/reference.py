"""Periodically move the KL reference to the current policy (DeepSeek-R1 replaces it every 400 steps)."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from r1lightning.callbacks._common import crossed_multiple, log_metrics

log = logging.getLogger(__name__)


class ReferenceModelRefresh(Callback):
    """Replace (alpha = 1) or blend the frozen reference `pl_module.ref_model` with the policy
    `pl_module.model` every `every_n_steps` optimizer steps:

        ref <- alpha * policy + (1 - alpha) * ref

    Steps are `trainer.global_step` (optimizer steps; GRPO with mu > 1 takes several per batch),
    and a refresh happens whenever the counter passes a multiple of `every_n_steps`. A module
    without a reference (`beta: 0`) gets a warning and nothing else. Logs `ref/refreshes`.

    Distributed: under DDP every rank holds the whole policy and the same weights after each
    step, so each rank copying locally keeps the references identical, with no communication.
    Under FSDP the policy's parameters are shards (DTensors): when the reference is sharded the
    same way, the local shard copy is right; a full (unsharded) reference needs the full tensors,
    which `DTensor.full_tensor()` gathers (a collective: this hook runs on every rank, so that is
    fine, but memory holds one full parameter at a time). Not tested here (CPU only).
    """

    def __init__(self, every_n_steps: int = 400, alpha: float = 1.0):
        """
        Args:
            every_n_steps: optimizer steps between refreshes (R1: 400).
            alpha: weight of the policy in the new reference; 1.0 replaces it.
        """
        if every_n_steps < 1:
            raise ValueError(f"ReferenceModelRefresh: every_n_steps must be >= 1, got {every_n_steps}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ReferenceModelRefresh: alpha must be in (0, 1], got {alpha}")
        self.every_n_steps = every_n_steps
        self.alpha = alpha
        self.refreshes = 0
        self.refreshed_at: list[int] = []
        self._last_step = 0
        self._warned = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Resuming from a checkpoint at step s: refreshes up to s already happened.
        self._last_step = max(self._last_step, trainer.global_step)
        if getattr(pl_module, "ref_model", None) is None and not self._warned:
            self._warned = True
            rank_zero_warn("ReferenceModelRefresh: the module has no reference model (beta = 0?); nothing to refresh")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = crossed_multiple(self._last_step, step, self.every_n_steps)
        self._last_step = step
        if not due or getattr(pl_module, "ref_model", None) is None:
            return
        refresh_reference(pl_module.model, pl_module.ref_model, self.alpha)
        self.refreshes += 1
        self.refreshed_at.append(step)
        log.info("reference model refreshed at step %d (alpha=%g)", step, self.alpha)
        log_metrics(trainer, {"ref/refreshes": self.refreshes})

    def state_dict(self) -> dict:
        return {"refreshes": self.refreshes, "refreshed_at": list(self.refreshed_at), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.refreshes = state_dict.get("refreshes", 0)
        self.refreshed_at = list(state_dict.get("refreshed_at", []))
        self._last_step = state_dict.get("last_step", 0)


@torch.no_grad()
def refresh_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float = 1.0) -> None:
    """In place: every reference parameter and floating buffer <- alpha*policy + (1-alpha)*ref."""
    # Tied weights (embeddings = lm_head) are one tensor under two names: visit it once, or a
    # blend would be applied twice.
    ref_tensors = dict(reference.named_parameters()) | dict(reference.named_buffers())
    policy_tensors = dict(policy.named_parameters(remove_duplicate=False)) | dict(policy.named_buffers(remove_duplicate=False))
    missing = sorted(set(ref_tensors) - set(policy_tensors))
    if missing:
        raise ValueError(f"ReferenceModelRefresh: the policy has no tensors named {missing[:5]}")
    for name, ref in ref_tensors.items():
        src = policy_tensors[name].detach()
        if _is_dtensor(src) and not _is_dtensor(ref):
            src = src.full_tensor()
        src = src.to(device=ref.device, dtype=ref.dtype)
        if alpha == 1.0 or not ref.is_floating_point():
            ref.copy_(src)
        else:
            ref.lerp_(src, alpha)  # ref + alpha * (policy - ref)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")
