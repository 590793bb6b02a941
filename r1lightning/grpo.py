"""GRPO: group-relative policy optimisation with verifiable rewards (DeepSeekMath, DeepSeek-R1).

One training step, top to bottom:
  1. repeat each prompt G times and sample completions from the live policy (the `Sampler`);
  2. score them with the reward functions; advantage = reward - group mean (optionally / std);
  3. optionally drop groups whose rewards do not vary (dynamic sampling, DAPO);
  4. log-probs of the sampling policy ("old") and of the frozen reference (for the KL penalty);
  5. mu optimizer steps over the same rollouts, each accumulated over micro-batches.
Optimisation is manual: the number of optimizer steps per batch of prompts is mu, not one.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from r1lightning.errors import UserError
from r1lightning.logprobs import LOGPROB_IMPLS, liger_available
from r1lightning.losses import (
    global_count,
    global_nanmean,
    global_nanstd,
    grpo_loss,
    group_advantages,
    mask_truncated,
    nanstd,
    zero_variance_groups,
)
from r1lightning.micro_batching import MicroBatching
from r1lightning.module import PolicyModule, checkpointing_on
from r1lightning.offload import HostOffload, StepOffloads
from r1lightning.offload import parse_setting as parse_offload
from r1lightning.options import GRPOLossOptions, SamplingOptions, coerce, moved_into, reject_moved
from r1lightning.policy import Policy
from r1lightning.rewards import Reward, RewardComposer, TrainerState
from r1lightning.rollout import Rollout, Sampler
from r1lightning.rollout.base import replace_rows
from lightning.pytorch.cli import OptimizerCallable

log = logging.getLogger(__name__)

# The reference pass's token budget over the update's when `reference_micro_batch_tokens` is unset: a
# forward without autograd holds about a quarter of the update's bytes per token (see its docstring).
REFERENCE_BUDGET_FACTOR = 4

# Two Lightning warnings that do not apply to GRPO, silenced once here:
# - the frozen reference (`ref_model`, beta > 0) is in eval mode on purpose; Lightning counts its modules;
# - with manual optimisation, ModelCheckpoint(every_n_train_steps) saves the state after the optimizer
#   step, which is what exact resume needs (it matches global_step and the loop's progress); its
#   12-line advice to save a pre-step copy is for a different use.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")


class GRPOModule(StepOffloads, MicroBatching, PolicyModule):
    # The flat arguments of earlier versions and where they went (a config naming one fails with
    # "`model.init_args.temperature` moved: use `model.init_args.sampling.temperature`").
    moved_arguments = {**moved_into(SamplingOptions, "sampling", renamed={"num_generations": "num_samples"}),
                       **moved_into(GRPOLossOptions, "loss")}  # fmt: skip

    def __init__(
        self,
        policy: Policy,
        rewards: list[Reward | str],
        optimizer: OptimizerCallable | None = None,
        sampler: Sampler | None = None,
        sampling: SamplingOptions = SamplingOptions(num_samples=8),
        loss: GRPOLossOptions = GRPOLossOptions(),
        num_iterations: int = 1,
        micro_batch_tokens: int = 32768,
        micro_batch_size: int | None = None,
        reference_micro_batch_tokens: int | None = None,
        packing: bool = True,
        logprob_impl: str = "chunked",
        dynamic_sampling: bool = False,
        dynamic_sampling_rounds: int = 0,
        use_sampler_logprobs: bool = False,
        max_grad_norm: float | None = 1.0,
        log_completions_every: int = 25,
        max_reward_failures: int = 2,
        max_flat_steps: int | None = 50,
        offload_reference: bool | str = "auto",
        offload_optimizer: bool | str = "auto",
        grow_micro_batches: bool = False,
        **kwargs,
    ):
        """
        Args:
            rewards: reward functions with weights, e.g. `[{fn: accuracy, weight: 1.0}, {fn: format}]`
                or an import path to a TRL-style function `(prompts, completions, **columns)`.
            sampler: rollout engine; defaults to transformers' `generate`.
            sampling: the rollouts (`r1lightning.options.SamplingOptions`): `num_samples` is G, the
                completions per prompt (the group), plus `max_new_tokens`, `temperature`, `top_p`, `top_k`.
            loss: the objective (`r1lightning.options.GRPOLossOptions`): `beta` (KL to the reference),
                `epsilon_low`/`epsilon_high`/`delta` (clipping), `aggregation`, `advantage_scale`,
                `importance_sampling_level`, `mask_truncated_completions`.
            num_iterations: mu, optimizer steps on each batch of rollouts (old log-probs kept fixed).
            micro_batch_tokens: tokens per forward/backward (prompt + completion, padding included);
                the rest is gradient accumulation. Sequences are bucketed by length, longest first,
                and a sequence longer than this gets a forward of its own. From bytes, for the
                OLMoE-1B-7B shape (6.9 B parameters) on one H200 (~139 GiB): the update holds 4 x 12.9
                GiB (bf16 weights, gradients, AdamW's two moments; the reference waits on the host,
                `offload_reference`) = 51.6 GiB; a token in a forward/backward holds ~0.2 MiB of
                activations with gradient checkpointing at 384-token sequences (measured: +4.6 GiB of peak
                from 8,192 to 32,768 tokens) and ~0.55 MiB at 4,224 (~2.5 MiB without checkpointing).
                32,768 tokens therefore peak near 60 GiB at 256-token completions (TRL 1.16 + MegaBlocks
                experts: 69.1) and under the rollout's peak at 4k+; larger micro-batches give each
                expert's GEMM more rows (256 tokens, one H200: update 2.43 s at 8,192, 1.58 s at 32,768).
            micro_batch_size: optional cap on sequences per forward/backward (None: tokens only).
            reference_micro_batch_tokens: tokens per forward of the reference pass (no gradients), default
                4 x the update's budget. A forward without autograd keeps no activations across layers: one
                layer's transients at a time (~130 KiB a token at the OLMoE shape, 8 expert copies of the
                input, gate, up and output), so 32,768 tokens hold ~4 GiB, what the update's 8,192 hold
                with their saved layer inputs and one recomputed layer. Larger forwards give each expert
                more rows per GEMM. The old-policy pass (mu > 1) keeps the update's micro-batches, so
                its log-probs equal the first iteration's bit for bit and the ratio starts at exactly 1.
            packing: lay the sequences of a micro-batch end to end in rows (position ids restart per
                sequence, no padding inside a row, attention never crosses sequences); False runs the
                rows as sampled (left-padded prompt, right-padded completion), `micro_batch_size` rows
                at a time (default: as many as `micro_batch_tokens` allows).
            logprob_impl: `chunked` (the LM head chunk by chunk over tokens, recomputed in backward;
                pure PyTorch), `liger` (liger-kernel's fused linear kernels, CUDA), or `full`
                (the [tokens, V] fp32 logits at once: the reference, memory-hungry).
            dynamic_sampling: drop groups whose rewards are all equal (zero advantage).
            dynamic_sampling_rounds: re-sample those groups' prompts up to this many times to
                keep the batch full before dropping them.
            use_sampler_logprobs: with mu = 1 take "old" log-probs from the sampler instead of
                the training forward; only right if the engine's numerics match training. A sampler
                that returns no log-probs is an error, not a silent fallback.
            max_grad_norm: gradient clipping (manual optimisation ignores `trainer.gradient_clip_val`).
            log_completions_every: write a sample of completions every N steps (0 = never).
            max_flat_steps: stop the run (one line, exit 2) when over this many batches >= 99 % of the groups
                had all-equal rewards on average: no advantage, nothing to learn (None: never stop).
            max_reward_failures: a reward function that fails on every sample (raises, or returns NaN or a
                non-number) this many steps in a row stops the run with an error naming it.
            offload_reference: keep the frozen reference's weights in pinned host memory outside the
                reference pass (`r1lightning.offload`): the update and the rollout get their room. `auto`
                (on CUDA with an unsharded reference; otherwise never): parked on the host after each
                reference pass (no copy while the reference is unchanged), copied back in the background
                while the policy samples, or after sampling in steps whose KV at full length would not
                fit the sampler's memory budget with it there (`PagedSampler`; other samplers: KV at
                least the reference's size); a host that cannot pin it keeps it on the GPU, with a
                warning. true: as auto, and also after sampling in every step, and a failure is an
                error; false: never.
            offload_optimizer: the same for the optimizer's state (moments, master weights), copied to the
                host and back each step it moves. `auto`: when the KV still would not fit the paged
                engine's budget with the reference moved; never with other samplers.
            grow_micro_batches: on CUDA, from the second step, raise the reference and update passes' token
                budget above `micro_batch_tokens` to fill memory the step's rollout already peaked at (0.8 of
                it, at the activation bytes per token measured in the previous update), so long sequences
                share micro-batches without raising the step's peak. Not yet timed.
            kwargs: shared options of `PolicyModule` (warmup_steps, lr_schedule, export_dir, ...).
        """
        reject_moved(type(self), kwargs)
        sampling = coerce(SamplingOptions, sampling, "model.sampling")
        loss = coerce(GRPOLossOptions, loss, "model.loss")
        super().__init__(policy, optimizer, **kwargs)
        if micro_batch_tokens < 1:
            raise UserError(f"model.micro_batch_tokens: must be >= 1, got {micro_batch_tokens}")
        if reference_micro_batch_tokens is not None and reference_micro_batch_tokens < 1:
            raise UserError(f"model.reference_micro_batch_tokens: must be >= 1 or null, got {reference_micro_batch_tokens}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise UserError(f"model.micro_batch_size: must be >= 1 or null, got {micro_batch_size}")
        if logprob_impl not in LOGPROB_IMPLS:
            raise UserError(f"model.logprob_impl: {logprob_impl!r} is not one of {', '.join(LOGPROB_IMPLS)}")
        if logprob_impl == "liger" and not liger_available():
            raise UserError("model.logprob_impl: liger needs liger-kernel and a CUDA GPU (pip install 'r1lightning[liger]')")
        if loss.importance_sampling_level == "sequence" and loss.aggregation != "grpo":
            log.warning("importance_sampling_level=sequence with aggregation=%s weights each sequence's ratio by its "
                        "token count; GSPO normalises per sequence (aggregation: grpo)", loss.aggregation)
        offload_reference = parse_offload(offload_reference, "offload_reference")
        offload_optimizer = parse_offload(offload_optimizer, "offload_optimizer")
        if sampling.num_samples < 2:
            raise UserError("model.sampling.num_samples: GRPO needs at least 2 completions per prompt (the group)")
        if loss.sampler_correction is not None and use_sampler_logprobs:
            raise UserError("model.loss.sampler_correction with use_sampler_logprobs: true weighs the sampler against "
                            "itself (always 1); set one of them off")
        self.save_hyperparameters(ignore=["policy", "optimizer", "val_sampler", "sampler", "rewards"])
        # hparams.yaml and checkpoints keep the groups as plain mappings (yaml.safe_load reads them).
        self.hparams.update(sampling=sampling.as_dict(), loss=loss.as_dict(), offload_reference=offload_reference,
                            offload_optimizer=offload_optimizer)
        self.sampling = sampling
        self.loss = loss
        self.automatic_optimization = False
        # TRL's form too: a bare name, import path or reward-model id is that function with weight 1
        rewards = [Reward(fn=r) if isinstance(r, str) else r for r in rewards]
        self.rewards = RewardComposer(rewards, max_failed_steps=max_reward_failures)
        self.sampler = sampler or self.val_sampler
        self.ref_model = None
        self._offloads: dict[str, HostOffload] = {}  # "reference", "optimizer": host copies kept across steps

    def default_callbacks(self) -> list:
        from r1lightning.callbacks import NoLearningSignal

        flat = [NoLearningSignal(self.hparams.max_flat_steps)] if self.hparams.max_flat_steps is not None else []
        return super().default_callbacks() + flat

    def configure_model(self) -> None:
        super().configure_model()
        if self.loss.beta > 0 and self.ref_model is None:
            # The reference is the policy as training starts (R1: refreshed by a callback).
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    # -- 1-3: rollouts, rewards, advantages ------------------------------------------------------
    def trainer_state(self) -> TrainerState:
        """Progress as TRL's reward functions read it (`trainer_state.global_step`, ...)."""
        trainer = self._trainer
        if trainer is None:
            return TrainerState()
        return TrainerState(global_step=trainer.global_step, max_steps=trainer.max_steps, epoch=float(trainer.current_epoch))

    def rollout(self, batch) -> tuple[Rollout, dict, torch.Tensor, dict]:
        """Sample G completions per prompt and score them. Returns the rollout, the repeated
        columns, the total reward per completion [B*G] (NaN where every reward function returned
        None: TRL's unscorable rows) and the reward metrics."""
        G = self.sampling.num_samples
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, dim=0)  # [B*G, P]
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, dim=0)
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in batch["columns"].items()}
        # The prompts as TRL passes them to reward functions (strings or message lists).
        reward_prompts = [p for p in batch["prompts"] for _ in range(G)] if batch.get("prompts") is not None else None
        rollout = self.generate(prompt_ids, prompt_mask, self.sampling.params(), sampler=self.sampler)
        scores = self.score(rollout, columns, self.rewards, reward_prompts=reward_prompts, trainer_state=self.trainer_state())
        total = scores.total.masked_fill(scores.unscorable, float("nan"))
        return rollout, columns, total.to(rollout.completion_ids.device), scores

    def resample_flat_groups(self, batch, rollout, total, scores):
        """Dynamic sampling: give groups with zero reward variance more tries, then drop them.

        Returns new (rollout, total [B*G], scores, keep [B*G]): the retried groups' rows replaced by
        their new samples where those vary, and the rows to keep. The arguments are left as they were."""
        G = self.sampling.num_samples
        flat = zero_variance_groups(total, G)  # [B]
        offsets = torch.arange(G, device=total.device)
        total = total.clone()
        scores = copy.copy(scores)
        scores.per_fn = {name: values.clone() for name, values in scores.per_fn.items()}
        scores.unscorable = scores.unscorable.clone() if scores.unscorable is not None else None
        scores.completions = list(scores.completions)
        for _ in range(self.hparams.dynamic_sampling_rounds):
            if not flat.any():
                break
            idx = flat.nonzero().squeeze(1)
            sub = {"prompt_ids": batch["prompt_ids"][idx], "prompt_mask": batch["prompt_mask"][idx],
                   "columns": {k: [v[i] for i in idx.tolist()] for k, v in batch["columns"].items()}}
            if batch.get("prompts") is not None:
                sub["prompts"] = [batch["prompts"][i] for i in idx.tolist()]
            new_rollout, _, new_total, new_scores = self.rollout(sub)
            varied = ~zero_variance_groups(new_total, G)  # [len(idx)]
            dst = (idx[varied][:, None] * G + offsets).flatten()  # rows in the batch
            src = (varied.nonzero().squeeze(1)[:, None] * G + offsets).flatten()  # rows in the retry
            rollout = replace_rows(rollout, dst, new_rollout, src, self.tokenizer.pad_token_id)
            total[dst] = new_total[src]
            for name in scores.per_fn:
                scores.per_fn[name][dst] = new_scores.per_fn[name][src]
            if scores.unscorable is not None:
                scores.unscorable[dst.cpu()] = new_scores.unscorable[src.cpu()]
            for d, s_ in zip(dst.tolist(), src.tolist()):
                scores.completions[d] = new_scores.completions[s_]
            flat[idx[varied]] = False
        return rollout, total, scores, (~flat).repeat_interleave(G)

    # -- the step --------------------------------------------------------------------------------
    def _memory_peak(self, name: str, peaks: dict) -> None:
        """Peak GPU memory since the previous phase, in GiB (CUDA only)."""
        if self.device.type == "cuda":
            peaks[f"memory/{name}_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)

    def training_step(self, batch, batch_idx):
        h = self.hparams
        peaks: dict[str, float] = {}
        self.next_step_shapes()
        self.engine_stats = {}  # rollout/*: filled by `generate`
        self._memory_peak("before", peaks)
        t0 = time.perf_counter()
        offloads = self.rollout_offloads(batch)
        parked = self.parked_reference()
        for moved in offloads.values():
            moved.to_host()
        if offloads and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the freed blocks go to the KV pool allocated next
        if parked is not None and "reference" not in offloads:
            parked.to_device(background=True)  # beside the rollout; the reference pass waits for it
        try:
            rollout, columns, total, scores = self.rollout(batch)
            keep = torch.ones_like(total, dtype=torch.bool)
            if h.dynamic_sampling:
                rollout, total, scores, keep = self.resample_flat_groups(batch, rollout, total, scores)
            getattr(self.sampler, "release_for_update", lambda: None)()  # a sampler may free its KV cache for the update
        finally:
            for moved in offloads.values():
                moved.to_device()
        t_rollout = time.perf_counter() - t0
        self._memory_peak("rollout", peaks)

        # Unscorable rows (NaN) are left out of the group mean / std and get advantage 0 (as in TRL);
        # the `batch` std is over every process's rewards (TRL gathers them).
        batch_std = global_nanstd(total) if self.loss.advantage_scale == "batch" else None
        advantages = group_advantages(total, self.sampling.num_samples, self.loss.advantage_scale, batch_std=batch_std)  # [B*G]
        mask = rollout.completion_mask.float()  # [B*G, C]
        if self.loss.mask_truncated_completions:
            mask = mask_truncated(mask, rollout.truncated)
        mask = mask * keep.unsqueeze(1)

        t1 = time.perf_counter()
        rollout_peak = peaks.get("memory/rollout_GiB")
        budget = self.token_budget(None if rollout_peak is None else rollout_peak * 2**30)
        micro = self.micro_batches(rollout, mask, budget)
        ref_micro = None
        if self.ref_model is not None:
            ref_micro = self.micro_batches(rollout, mask, h.reference_micro_batch_tokens or REFERENCE_BUDGET_FACTOR * budget)
        self.prepare_layouts(rollout, micro + (ref_micro or []))
        old_logp = None
        if h.use_sampler_logprobs and rollout.logprobs is None:
            # Falling back to the current log-probs would make the ratio 1: clipping would never act.
            raise UserError(f"model.use_sampler_logprobs: the sampler ({type(self.sampler).__name__}) returned no "
                            "log-probs; enable them on the sampler (return_logprobs: true) or set use_sampler_logprobs: false")
        if self.loss.sampler_correction is not None and rollout.logprobs is None:
            raise UserError(f"model.loss.sampler_correction: the sampler ({type(self.sampler).__name__}) returned no "
                            "log-probs; enable them on the sampler (return_logprobs: true) or set sampler_correction: null")
        if h.num_iterations > 1 or h.use_sampler_logprobs:
            old_logp = rollout.logprobs if h.use_sampler_logprobs else self.frozen_logprobs(rollout, self.model, micro)
        if parked is not None:
            parked.wait()
        ref_logp = self.frozen_logprobs(rollout, self.ref_model, ref_micro) if self.ref_model is not None else None
        if parked is not None:
            self.park_reference(parked)  # its room goes to the update; no copy while the reference is unchanged
        t_ref = time.perf_counter() - t1
        self._memory_peak("reference", peaks)
        kinds = self.kind_metrics(rollout, columns, scores, old_logp if old_logp is not None else rollout.logprobs, ref_logp)

        t2 = time.perf_counter()
        base = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        stats = self.optimise(rollout, advantages, mask, old_logp, ref_logp, micro)
        t_train = time.perf_counter() - t2
        stats["update/padding"] = self.padding_fraction(rollout, micro)
        stats.update(kinds)  # logged with the rest after the update: Lightning dropped keys first logged before it
        stats["update/micro_batches"] = float(len(micro))
        if ref_micro is not None:
            stats["reference/micro_batches"] = float(len(ref_micro))
        # sampled with the reference / the optimizer state on the host
        stats["offload/reference"] = float("reference" in offloads)
        stats["offload/optimizer"] = float("optimizer" in offloads)
        stats["offload/reference_update"] = float(parked is not None and parked.on_host)  # the update ran without it
        stats["update/token_budget"] = float(budget)
        self._memory_peak("update", peaks)
        if h.grow_micro_batches and "memory/update_GiB" in peaks:
            self.learn_token_cost(base, peaks["memory/update_GiB"] * 2**30, self.input_tokens(rollout, micro))
        peaks.pop("memory/before_GiB", None)
        stats.update(peaks)

        self._layouts = None
        self.log_step(rollout, total, scores, keep, stats, t_rollout, t_ref, t_train)

    def optimise(self, rollout, advantages, mask, old_logp, ref_logp, micro: list[list[int]] | None = None) -> dict:
        n = rollout.completion_ids.shape[0]
        micro = self.micro_batches(rollout, mask) if micro is None else micro
        # Normalisers over the whole generation batch, so the micro-batch losses add up to it.
        # `dapo` divides by the tokens of every process (/ world size: DDP averages the gradients), as TRL does.
        local_tokens = int(mask.sum().clamp(min=1))
        norm = dict(num_sequences=n, num_tokens=global_count(mask) if self.loss.aggregation == "dapo" else local_tokens,
                    num_micro_batches=max(1, sum(map(bool, micro))), max_completion_length=self.sampling.max_new_tokens)
        # Every metric is logged even when no row has a loss (all groups dropped): then they are 0.
        names = ["loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        if self.loss.sampler_correction is not None:
            names += ["sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean",
                      "sampling/importance_sampling_outside"]
        sums: dict[str, float] = dict.fromkeys(names + (["kl"] if ref_logp is not None else []), 0.0)
        with checkpointing_on(self.model):
            self._iterate(rollout, advantages, mask, old_logp, ref_logp, micro, norm, local_tokens, sums)
        return {k: float(v) for k, v in sums.items()}

    def _iterate(self, rollout, advantages, mask, old_logp, ref_logp, micro, norm, local_tokens, sums) -> None:
        """mu optimizer steps over the rollouts, each accumulated over the micro-batches."""
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        for _ in range(h.num_iterations):
            for rows in micro:
                with self.attention_for(rollout, rows):  # its forward and backward get the same SDPA kernels
                    self._accumulate(rollout, rows, advantages, mask, old_logp, ref_logp, norm, local_tokens, sums, len(micro))
            if h.max_grad_norm:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

    def _accumulate(self, rollout, rows, advantages, mask, old_logp, ref_logp, norm, local_tokens, sums, n_micro) -> None:
        """One micro-batch's forward and backward (gradients accumulate) and its metric sums."""
        h = self.hparams
        dummy = not rows  # this rank has fewer micro-batches than another: same collectives, no loss
        rows = rows or [0]
        idx = self.rows_index(rollout, rows)
        logp, entropy, aux = self.completion_logprobs(rollout, rows, with_entropy=True)
        old = logp.detach() if old_logp is None else old_logp[idx]
        ref = ref_logp[idx] if ref_logp is not None else None
        o = self.loss
        correction = {}
        if o.sampler_correction is not None:  # at mu = 1, `old` is this forward's own, detached: no extra pass
            correction = dict(sampler_logp=rollout.logprobs[idx], sampler_correction=o.sampler_correction,
                              sampler_correction_min=o.sampler_correction_min, sampler_correction_max=o.sampler_correction_max)
        loss, metrics = grpo_loss(
            logp, old, advantages[idx], mask[idx], ref, beta=o.beta, epsilon_low=o.epsilon_low,
            epsilon_high=o.epsilon_high, delta=o.delta, aggregation=o.aggregation,
            importance_sampling_level=o.importance_sampling_level, **correction, **norm,
        )
        if aux is not None:
            loss = loss + self.aux_coef * aux / n_micro
        if dummy:
            self.manual_backward(loss * 0.0)
            return
        self.manual_backward(loss)
        # Summed on the device and read once after the step: a float() here would make the
        # host wait for this micro-batch's backward before queueing the next forward.
        m = mask[idx]
        weight = m.sum() / local_tokens  # token-weighted average of micro-batch means
        metrics["entropy"] = (entropy * m).sum() / m.sum().clamp(min=1)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach() * weight / h.num_iterations
        sums["loss"] = sums.get("loss", 0.0) + loss.detach() / h.num_iterations

    # -- metrics (names as in TRL) ---------------------------------------------------------------
    def log_step(self, rollout, total, scores, keep, stats, t_rollout, t_ref, t_train):
        G = self.sampling.num_samples
        groups = total.view(-1, G)
        lengths = rollout.completion_lengths.float()
        # train/tokens_per_s (sampled completion tokens over the whole step) is logged by PolicyModule.
        self.step_tokens = int(rollout.completion_mask.sum())
        scored = ~torch.isnan(groups)
        # TRL's names: `reward` the mean and `reward_std` the std of all the step's rewards (every process);
        # the mean of the within-group stds is `reward_std_within_group`.
        metrics = {
            "reward": global_nanmean(total),
            "reward_std": global_nanstd(total),
            "reward_std_within_group": torch.nanmean(nanstd(groups, dim=1)),
            "frac_unscorable": (~scored).float().mean(),
            "frac_reward_zero_std": zero_variance_groups(total, G).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": rollout.truncated.float().mean(),
            "kept_ratio": keep.float().mean(),
            "time/rollout": t_rollout,
            "time/reference": t_ref,
            "time/train": t_train,
            **stats,
            **self.take_engine_stats(),
        }
        for name, values in scores.per_fn.items():
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values)
            metrics[f"rewards/{name}/std"] = nanstd(values)
        for name, count in scores.errors.items():
            metrics[f"rewards/{name}/errors"] = count
        for name, values in scores.metrics.items():  # from reward functions' log_metric
            metrics[name] = sum(values) / len(values)
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, on_step=True, prog_bar=False)
        self.log("reward", float(metrics["reward"]), prog_bar=True, logger=False)
        every = self.hparams.log_completions_every
        if every and self.global_step % every < self.hparams.num_iterations:
            self.log_completions(rollout, total, scores)

    def kind_metrics(self, rollout, columns, scores, logp, ref_logp) -> dict[str, float]:
        """Per prompt kind and per reward model (see `r1lightning.rewards.monitor`); empty unless the
        data has a `kind` column or a reward is a reward model. KL needs the sampling log-probs."""
        from r1lightning.rewards.monitor import kind_metrics, row_kl

        models = {r.name for r in self.rewards.rewards if getattr(r._callable, "is_reward_model", False)}
        if "kind" not in columns and not models:
            return {}
        kl = row_kl(logp, ref_logp, rollout.completion_mask) if logp is not None and ref_logp is not None else None
        return kind_metrics(columns.get("kind"), scores.per_fn, rollout.completion_lengths.cpu(), kl, models)

    def log_completions(self, rollout, total, scores, n: int = 8):
        if not self.trainer.is_global_zero or self.logger is None:
            return
        prompts = self.tokenizer.batch_decode(rollout.prompt_ids[:n], skip_special_tokens=True)
        rows = [(self.global_step, p, c, float(r)) for p, c, r in zip(prompts, scores.completions[:n], total[:n])]
        path = Path(self.logger.log_dir or ".") / "completions.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "prompt", "completion", "reward"])
            w.writerows(rows)
        if scores.extra:  # columns reward functions gave through log_extra(column, values)
            with open(path.with_name("completions_extra.jsonl"), "a") as f:
                for i in range(len(rows)):
                    extra = {k: v[i] for k, v in scores.extra.items() if i < len(v)}
                    f.write(json.dumps({"step": self.global_step, "row": i, **extra}, default=str) + "\n")
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                table = "\n".join(f"| {p} | {c!r} | {r:.2f} |" for _, p, c, r in rows)
                logger.experiment.add_text("completions", "| prompt | completion | reward |\n|---|---|---|\n" + table, self.global_step)
