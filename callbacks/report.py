"""Where a run ended: the step and the last value of every metric, as JSON (the pipeline reads it)."""

from __future__ import annotations

import math

from lightning.pytorch import Callback

from r1lightning.callbacks._common import write_json


class StageReport(Callback):
    """Write `{global_step, epoch, metrics}` to `path` when training ends, or after `validate` (rank 0).

    `metrics` are the trainer's `callback_metrics` at that point: the last held-out accuracy
    (`val/accuracy`), the last logged training values and whatever `BenchmarkEval` and
    `RejectionSampling` logged (they run before this callback when listed before it).
    """

    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                metrics[key] = v
        write_json(self.path, {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "metrics": metrics})
