"""Supervised fine-tuning on reasoning traces (R1's cold start, rejection-sampling SFT, distillation)."""

from __future__ import annotations

from r1lightning.losses import completion_cross_entropy
from r1lightning.module import PolicyModule, checkpointing_on


class SFTModule(PolicyModule):
    """Completion-only cross-entropy (`r1lightning.losses.completion_cross_entropy`) + the MoE
    load-balancing loss."""

    def training_step(self, batch, batch_idx):
        # A policy loaded with from_pretrained is in eval mode, and Lightning keeps modes as they are:
        # without this, gradient checkpointing would silently store every layer's activations.
        with checkpointing_on(self.model):
            logits, aux = self.forward_logits(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        ce, count = completion_cross_entropy(logits, batch["labels"])
        loss = ce
        if aux is not None:
            loss = loss + self.aux_coef * aux
            self.log("train/aux_loss", aux.detach(), on_step=True)
        self.log("train/loss", ce.detach(), on_step=True, prog_bar=True)
        self.step_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return loss
