"""Held-out general prompts scored by the GRPO module's own rewards (its reward model among them).

R1's stage 4 has no verifiable answer for general prompts: progress there is the reward model's
score on prompts the policy never trained on (and, for the synthetic instructions, the rule check
beside it). Greedy completions by default, or R1's evaluation protocol: `num_samples` per prompt at
`temperature` 0.6 / `top_p` 0.95 (seeded, so two evaluations differ only by the policy), averaged per
prompt first. Every reward that applies; logged as `val/general/<reward>` (mean over prompts) with
`.../sem` (its standard error over prompts), at fit start and at every validation, and written with the
step to `<default_root_dir>/general_eval.json` so a run's rise is readable later.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch import Callback

from r1lightning.files import atomic_write_text

__all__ = ["HeldoutRewardEval"]


class HeldoutRewardEval(Callback):
    def __init__(self, task=None, prompt_files: str | list[str] | None = None, split: str = "test", max_new_tokens: int = 48,
                 batch_size: int = 64, at_fit_start: bool = True, prefix: str = "val/general", num_samples: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):  # fmt: skip
        """
        Args:
            task: a task with `prompt_rows(split)` (e.g. `r1lightning.tasks.InstructionTask`).
            prompt_files: or files of prompt rows (`prompt` plus the columns the rewards read).
            split: which of the task's splits (`test`: instructions never trained on).
            max_new_tokens: generation budget.
            at_fit_start: evaluate before the first step too (the curve's starting point).
            num_samples, temperature, top_p: completions per prompt and how they are drawn (default one
                greedy); R1 reports k samples at temperature 0.6, top-p 0.95.
            seed: the sampling seed, the same at every evaluation.
        """
        if (task is None) == (prompt_files is None):
            raise ValueError("HeldoutRewardEval: give exactly one of `task` or `prompt_files`")
        if num_samples < 1 or (num_samples > 1 and temperature <= 0):
            raise ValueError("HeldoutRewardEval: num_samples must be >= 1, and > 1 only with temperature > 0")
        self.num_samples, self.temperature, self.top_p, self.seed = num_samples, temperature, top_p, seed
        self.task, self.prompt_files, self.split = task, prompt_files, split
        self.max_new_tokens, self.batch_size, self.at_fit_start, self.prefix = max_new_tokens, batch_size, at_fit_start, prefix
        self.history: list[dict] = []
        self._rows = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            if self.task is not None:
                self._rows = self.task.prompt_rows(self.split)
            else:
                from r1lightning.data.io import load_rows

                self._rows = [dict(r) for r in load_rows(self.prompt_files, any_of=(("prompt", "messages"),))]
        return self._rows

    @torch.no_grad()
    def evaluate(self, pl_module) -> dict[str, float]:
        from r1lightning.data.chat import encode_prompt, left_pad, row_messages
        from r1lightning.rollout import SamplingParams

        tok = pl_module.tokenizer
        rows = self.rows()
        k = self.num_samples
        params = SamplingParams(self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed if self.temperature > 0 else None)
        per_fn: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, mask = left_pad([encode_prompt(tok, row_messages(r)) for r in chunk for _ in range(k)], tok.pad_token_id)
            rollout = pl_module.generate(ids.to(pl_module.device), mask.to(pl_module.device), params)
            columns = {c: [r.get(c) for r in chunk for _ in range(k)] for c in chunk[0] if c not in ("prompt", "messages", "prompt_ids")}
            scores = pl_module.score(rollout, columns, pl_module.rewards)
            for name, values in scores.per_fn.items():  # per prompt: the mean of its samples that apply
                per_fn.setdefault(name, []).append(values.view(len(chunk), k).float().nanmean(-1))
        out = {}
        for name, parts in per_fn.items():
            v = torch.cat(parts)
            v = v[~torch.isnan(v)]
            if v.numel():
                out[f"{self.prefix}/{name}"] = float(v.mean())
                out[f"{self.prefix}/{name}/sem"] = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
        return out

    def _record(self, trainer, metrics: dict) -> None:
        self.history.append({"step": trainer.global_step, **metrics})
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "general_eval.json"
            atomic_write_text(path, json.dumps(self.history, indent=1))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_fit_start:
            metrics = self.evaluate(pl_module)
            self._record(trainer, metrics)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = self.evaluate(pl_module)
        self._record(trainer, metrics)
        pl_module.log_dict(metrics, sync_dist=False)
