"""What SFT and GRPO share: the policy (built in `configure_model`), the optimizer and schedule,
held-out accuracy by generation, throughput logging and the `save_pretrained` export."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from r1lightning.errors import UserError
from r1lightning.policy import Policy
from r1lightning.rollout import HFGenerateSampler, Sampler, SamplingParams
from r1lightning.rollout.base import add_engine_stats

log = logging.getLogger(__name__)



@contextlib.contextmanager
def checkpointing_on(model: torch.nn.Module):
    """Gradient checkpointing for the policy update. transformers checkpoints a decoder layer only while
    that layer is in training mode, and the policy stays in eval mode (no dropout, the engines' caches
    kept), so without this every layer's activations were stored: ~24 GiB more at 8k update tokens on
    the OLMoE shape (H200, 2026-11-30). Only the checkpointed layers' own flag flips, not their children's,
    so dropout and router noise stay off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False

class PolicyModule(L.LightningModule):
    engine_stats: dict | None = None  # the step's `rollout/*` metrics, summed over its `generate` calls

    def __init__(
        self,
        policy: Policy,
        optimizer: OptimizerCallable | None = None,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        lr_schedule_steps: int | None = None,
        router_aux_loss_coef: float | None = None,
        val_sampler: Sampler | None = None,
        val_max_new_tokens: int = 64,
        export_dir: str | None = None,
        max_nonfinite_in_a_row: int | None = 3,
    ):
        """
        Args:
            policy: the model and tokenizer (see `r1lightning.Policy`).
            optimizer: e.g. `class_path: torch.optim.AdamW` with `init_args: {lr: 1e-4}` (the default).
            warmup_steps: linear warmup from 0 to the optimizer's lr.
            lr_schedule: `cosine` (decay to `min_lr_ratio`·lr over the run) or `constant` (after warmup).
            lr_schedule_steps: the optimizer steps the cosine spans; None: the run's (`max_steps`). Set it
                to stop a run early on the schedule of a longer one (e.g. a checkpoint mid-way).
            router_aux_loss_coef: weight of the MoE load-balancing loss; None uses the model config's
                `router_aux_loss_coef`; 0 disables it. Ignored for dense models.
            val_sampler: how validation generates (greedy); defaults to transformers' `generate`.
            val_max_new_tokens: generation budget for held-out accuracy.
            export_dir: where `save_pretrained` writes model + tokenizer at the end of fit.
            max_nonfinite_in_a_row: optimizer steps with a non-finite loss or gradient are skipped
                (and counted in `train/nonfinite_skipped`); this many in a row stop the run (None: never).
        """
        super().__init__()
        if lr_schedule not in ("cosine", "constant"):
            raise UserError(f"model.lr_schedule: {lr_schedule!r} is not one of cosine, constant")
        if lr_schedule_steps is not None and lr_schedule_steps < 1:
            raise UserError(f"model.lr_schedule_steps: must be >= 1 (or null for the run's steps), got {lr_schedule_steps}")
        self.save_hyperparameters(ignore=["policy", "optimizer", "val_sampler"])
        self.policy = policy
        self.optimizer_factory = optimizer
        self.tokenizer = policy.build_tokenizer()  # cheap; the data module reads it in setup
        self.model = None
        self.val_sampler = val_sampler or HFGenerateSampler(return_logprobs=False)
        self.val_accuracy = MeanMetric()
        self._step_started = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, _ = self.policy.build(self.tokenizer)
        config = self.model.config
        self.is_moe = hasattr(config, "router_aux_loss_coef")
        coef = self.hparams.router_aux_loss_coef
        self.aux_coef = (config.router_aux_loss_coef if coef is None else coef) if self.is_moe else 0.0

    def forward_logits(self, input_ids, attention_mask=None, position_ids=None, model=None):
        """One forward; returns (logits [N, T, V], load-balancing loss or None).

        With left padding the positions must follow the mask, as `generate` does; transformers'
        default (0..T-1) would shift every left-padded row.
        """
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        model = model or self.model
        kwargs = {"output_router_logits": True} if self.is_moe and self.aux_coef > 0 else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)
        return out.logits, getattr(out, "aux_loss", None)

    def forward_logprobs(self, layout, model=None, temperature: float = 1.0, with_entropy: bool = False,
                         impl: str = "chunked"):
        """One forward over a `Layout` (packed or padded rows) that computes completion log-probs from
        the final hidden states, never the [n, C, V] logits (see `r1lightning.logprobs`).

        Returns (logp [n, C] fp32, entropy [n, C] fp32 or None, load-balancing loss or None);
        positions without a completion token hold 0.
        """
        from r1lightning.logprobs import head_logprobs

        model = model or self.model
        kwargs = {"output_router_logits": True} if self.is_moe and self.aux_coef > 0 else {}
        with head_logprobs(model, layout.positions, layout.targets, temperature, with_entropy, impl) as out:
            res = model(input_ids=layout.input_ids, attention_mask=layout.attention_mask,
                        position_ids=layout.position_ids, use_cache=False, **kwargs)
        entropy = layout.scatter(out["entropy"]) if out["entropy"] is not None else None
        return layout.scatter(res.logits), entropy, getattr(res, "aux_loss", None)  # logits: the log-probs [M]

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = self.model.parameters()  # not the frozen reference
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        total = self.hparams.lr_schedule_steps or max(1, self.trainer.estimated_stepping_batches if self.trainer else 1)
        warmup, floor, cosine = self.hparams.warmup_steps, self.hparams.min_lr_ratio, self.hparams.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        # Every run needs these; an instance listed in `trainer.callbacks` is kept as configured
        # (Lightning would otherwise replace it with the one returned here).
        listed = self.trainer.callbacks if self._trainer is not None else []
        return [cb for cb in self.default_callbacks() if not any(isinstance(c, type(cb)) for c in listed)]

    def default_callbacks(self) -> list:
        """What every run of this module gets (subclasses add theirs)."""
        from r1lightning.callbacks import ExactResume, InterruptCheckpoint, NonFiniteGuard

        return [ExactResume(), NonFiniteGuard(self.hparams.max_nonfinite_in_a_row), InterruptCheckpoint()]

    def on_save_checkpoint(self, checkpoint):
        from r1lightning.export import META_KEY, checkpoint_metadata

        checkpoint[META_KEY] = checkpoint_metadata(self)  # lets `r1lightning export` rebuild the model

    def on_train_batch_start(self, batch, batch_idx):
        self._step_started = time.perf_counter()
        self.step_tokens = 0  # set by training_step: tokens processed in this step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Measured here so forward, backward and the optimizer step are all inside the interval.
        elapsed = time.perf_counter() - self._step_started
        self.log("train/tokens_per_s", self.step_tokens / max(elapsed, 1e-9), on_step=True)
        self.log("train/step_time", elapsed, on_step=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)

    # -- held-out accuracy -------------------------------------------------------------------
    def sampling_ids(self):
        return self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

    def generate(self, prompt_ids, prompt_mask, params: SamplingParams, sampler: Sampler | None = None):
        from r1lightning.strategies import gathered

        eos, pad = self.sampling_ids()
        gather = getattr(self._trainer.strategy, "gather_for_rollout", False) if self._trainer else False
        sampler = sampler or self.val_sampler
        with gathered(self.model, gather):  # FSDP: one all-gather per rollout, not one per token
            rollout = sampler.generate(self.model, prompt_ids, prompt_mask, params, eos, pad)
        if self.engine_stats is not None:  # a step that logs its engine's counters (GRPO) set it
            add_engine_stats(self.engine_stats, getattr(sampler, "last_stats", None))
        return rollout

    def take_engine_stats(self) -> dict:
        """The step's engine counters, once: a later `generate` (validation, a callback) adds to nothing."""
        stats, self.engine_stats = self.engine_stats or {}, None
        return stats

    def decode(self, completion_ids) -> list[str]:
        return self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

    def score(self, rollout, columns: dict, rewards, **context):
        """Decode a rollout and score it with a `RewardComposer`; `.completions` carries the text.
        `context`: the composer's keyword arguments (`reward_prompts`, `trainer_state`)."""
        prompts = self.tokenizer.batch_decode(rollout.prompt_ids, skip_special_tokens=True)
        completions = self.decode(rollout.completion_ids)
        ids = [row[: int(n)].tolist() for row, n in zip(rollout.completion_ids, rollout.completion_lengths)]
        out = rewards(prompts, completions, columns, completion_ids=ids, **context)
        out.completions = completions
        return out

    def validation_step(self, batch, batch_idx):
        from r1lightning.rewards import get_reward

        if not hasattr(self, "_accuracy_fn"):
            self._accuracy_fn = get_reward("accuracy")
        rollout = self.generate(batch["prompt_ids"], batch["prompt_mask"], SamplingParams(self.hparams.val_max_new_tokens, temperature=0.0))
        completions = self.decode(rollout.completion_ids)
        prompts = self.tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        scores = self._accuracy_fn(prompts, completions, **batch["columns"])
        correct = torch.tensor([float(s or 0.0) for s in scores], device=self.device)
        self.val_accuracy.update(correct)

    def on_validation_epoch_start(self):
        # Under bf16-true the module cast would make the metric's sums bf16 (≈ 3 significant digits).
        self.val_accuracy.set_dtype(torch.float64)

    def on_validation_epoch_end(self):
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        self.val_accuracy.reset()

    # -- SDPA backends (see Policy.cudnn_attention) --------------------------------------------
    def setup(self, stage: str) -> None:
        # Process-wide flag, so it also holds in backward (checkpoint recompute runs on autograd's
        # device thread) and in the samplers; `teardown` puts the previous value back.
        if getattr(self, "_prev_cudnn_sdp", None) is None:
            self._prev_cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(self.policy.cudnn_attention is True)  # auto: per micro-batch (GRPO)

    def teardown(self, stage: str) -> None:
        if getattr(self, "_prev_cudnn_sdp", None) is not None:
            torch.backends.cuda.enable_cudnn_sdp(self._prev_cudnn_sdp)
            self._prev_cudnn_sdp = None

    # -- export ------------------------------------------------------------------------------
    def on_fit_end(self):
        if self.hparams.export_dir:
            from r1lightning.export import export_model

            # Every rank: under FSDP gathering the shards is a collective.
            path = export_model(self.model, self.tokenizer, self.hparams.export_dir, self.trainer.is_global_zero)
            if path is not None:
                log.info("exported save_pretrained checkpoint to %s", Path(path).resolve())
