"""Supervised fine-tuning on reasoning traces (R1's cold start, rejection-sampling SFT, distillation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1lightning.data.chat import IGNORE_INDEX
from r1lightning.module import PolicyModule


def completion_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over labelled (assistant) tokens.

    logits [N, T, V], labels [N, T] with IGNORE_INDEX on prompt/pad tokens. Returns (loss, #tokens).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [N*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [N*(T-1)]
    count = (shift_labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / count.clamp(min=1), count


class SFTModule(PolicyModule):
    """Completion-only cross-entropy + the MoE load-balancing loss."""

    def training_step(self, batch, batch_idx):
        logits, aux = self.forward_logits(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        ce, count = completion_cross_entropy(logits, batch["labels"])
        loss = ce
        if aux is not None:
            loss = loss + self.aux_coef * aux
            self.log("train/aux_loss", aux.detach(), on_step=True)
        self.log("train/loss", ce.detach(), on_step=True, prog_bar=True)
        self.step_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return loss
