"""`NonFiniteGuard`: a step whose loss or gradient is not finite is skipped, not applied;
`PolicyModule.configure_callbacks` adds it to every run."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor shards: look at this rank's part


def grads_finite(parameters) -> bool:
    """Whether this rank's gradients are all finite (sharded ones: this rank's shard)."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return True
    # max |g| is NaN/inf exactly when some entry is; one reduction per tensor, one sync in all.
    return bool(torch.stack([torch.linalg.vector_norm(g, float("inf")).float() for g in grads]).isfinite().all())



class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard(L.Callback):
    """Before every optimizer step (automatic or manual optimisation alike: Lightning calls
    `on_before_optimizer_step` inside `optimizer.step()`), check the gradients. If any rank has a
    non-finite one, drop all gradients so the optimizer leaves the parameters and its state alone
    (torch optimizers skip parameters without a gradient), count the step and log the total as
    `train/nonfinite_skipped`. Stop after `max_in_a_row` consecutive skips.
    """

    def __init__(self, max_in_a_row: int | None = 3):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = trainer.strategy.reduce_boolean_decision(grads_finite(params), all=True)
        if finite:
            self.in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.in_a_row += 1
            if trainer.is_global_zero:
                log.warning("non-finite gradient at step %d: step skipped (%d in a row, %d in all)",
                            trainer.global_step, self.in_a_row, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False)
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"stopping at step {trainer.global_step}: {self.in_a_row} optimizer steps in a row had a non-finite "
                f"loss or gradient (max_nonfinite_in_a_row={self.max_in_a_row}). Lower the learning rate, check the "
                "data of these steps, or resume from the last checkpoint."
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]

