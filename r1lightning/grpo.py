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
import logging
import time
import warnings
from pathlib import Path

import torch

from r1lightning.errors import UserError
from r1lightning.losses import AGGREGATIONS, grpo_loss, group_advantages, mask_truncated, zero_variance_groups
from r1lightning.module import PolicyModule
from r1lightning.policy import Policy
from r1lightning.rewards import Reward, RewardComposer
from r1lightning.rollout import Rollout, Sampler, SamplingParams
from r1lightning.rollout.base import replace_rows
from lightning.pytorch.cli import OptimizerCallable

log = logging.getLogger(__name__)

# Two Lightning warnings that do not apply to GRPO, silenced once here:
# - the frozen reference (`ref_model`, beta > 0) is in eval mode on purpose; Lightning counts its modules;
# - with manual optimisation, ModelCheckpoint(every_n_train_steps) saves the state after the optimizer
#   step, which is what exact resume needs (it matches global_step and the loop's progress); its
#   12-line advice to save a pre-step copy is for a different use.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")


class GRPOModule(PolicyModule):
    def __init__(
        self,
        policy: Policy,
        rewards: list[Reward],
        optimizer: OptimizerCallable | None = None,
        sampler: Sampler | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_iterations: int = 1,
        micro_batch_size: int = 64,
        beta: float = 0.04,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        delta: float | None = None,
        aggregation: str = "grpo",
        advantage_scale: str = "group",
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        dynamic_sampling_rounds: int = 0,
        use_sampler_logprobs: bool = False,
        max_grad_norm: float | None = 1.0,
        log_completions_every: int = 25,
        **kwargs,
    ):
        """
        Args:
            rewards: reward functions with weights, e.g. `[{fn: accuracy, weight: 1.0}, {fn: format}]`
                or an import path to a TRL-style function `(prompts, completions, **columns)`.
            sampler: rollout engine; defaults to transformers' `generate`.
            num_generations: G, completions per prompt (the group).
            max_new_tokens, temperature, top_p, top_k: sampling of the rollouts.
            num_iterations: mu, optimizer steps on each batch of rollouts (old log-probs kept fixed).
            micro_batch_size: sequences per forward/backward; the rest is gradient accumulation.
            beta: KL coefficient (k3 estimator) to the frozen reference; 0 loads no reference.
            epsilon_low, epsilon_high: ratio clip range [1 - low, 1 + high] (DAPO's clip-higher).
            delta: optional upper bound on the unclipped ratio (two-sided clipping).
            aggregation: `grpo` | `bnpo` | `dr_grpo` | `dapo` (how token losses are averaged).
            advantage_scale: `group` (GRPO), `batch`, or `none` (Dr. GRPO).
            mask_truncated_completions: completions without EOS contribute no loss (DAPO).
            dynamic_sampling: drop groups whose rewards are all equal (zero advantage).
            dynamic_sampling_rounds: re-sample those groups' prompts up to this many times to
                keep the batch full before dropping them.
            use_sampler_logprobs: with mu = 1 take "old" log-probs from the sampler instead of
                the training forward; only right if the engine's numerics match training.
            max_grad_norm: gradient clipping (manual optimisation ignores `trainer.gradient_clip_val`).
            log_completions_every: write a sample of completions every N steps (0 = never).
            kwargs: shared options of `PolicyModule` (warmup_steps, lr_schedule, export_dir, ...).
        """
        super().__init__(policy, optimizer, **kwargs)
        if aggregation not in AGGREGATIONS:
            raise UserError(f"model.aggregation: {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        if advantage_scale not in ("group", "batch", "none"):
            raise UserError(f"model.advantage_scale: {advantage_scale!r} is not one of group, batch, none")
        if num_generations < 2:
            raise UserError("model.num_generations: GRPO needs at least 2 completions per prompt")
        self.save_hyperparameters(ignore=["policy", "optimizer", "val_sampler", "sampler", "rewards"])
        self.automatic_optimization = False
        self.rewards = RewardComposer(rewards)
        self.sampler = sampler or self.val_sampler
        self.ref_model = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.beta > 0 and self.ref_model is None:
            # The reference is the policy as training starts (R1: refreshed by a callback).
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    @property
    def sampling(self) -> SamplingParams:
        h = self.hparams
        return SamplingParams(h.max_new_tokens, h.temperature, h.top_p, h.top_k)

    # -- 1-3: rollouts, rewards, advantages ------------------------------------------------------
    def rollout(self, batch) -> tuple[Rollout, dict, torch.Tensor, dict]:
        """Sample G completions per prompt and score them. Returns the rollout, the repeated
        columns, the total reward per completion [B*G] and the reward metrics."""
        G = self.hparams.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(G, dim=0)  # [B*G, P]
        prompt_mask = batch["prompt_mask"].repeat_interleave(G, dim=0)
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in batch["columns"].items()}
        rollout = self.generate(prompt_ids, prompt_mask, self.sampling, sampler=self.sampler)
        scores = self.score(rollout, columns, self.rewards)
        return rollout, columns, scores.total.to(rollout.completion_ids.device), scores

    def resample_flat_groups(self, batch, rollout, total, scores):
        """Dynamic sampling: give groups with zero reward variance more tries, then drop them.
        Returns the (possibly updated) rollout and the rows to keep [B*G]."""
        G = self.hparams.num_generations
        flat = zero_variance_groups(total, G)  # [B]
        offsets = torch.arange(G, device=total.device)
        for _ in range(self.hparams.dynamic_sampling_rounds):
            if not flat.any():
                break
            idx = flat.nonzero().squeeze(1)
            sub = {"prompt_ids": batch["prompt_ids"][idx], "prompt_mask": batch["prompt_mask"][idx],
                   "columns": {k: [v[i] for i in idx.tolist()] for k, v in batch["columns"].items()}}
            new_rollout, _, new_total, new_scores = self.rollout(sub)
            varied = ~zero_variance_groups(new_total, G)  # [len(idx)]
            dst = (idx[varied][:, None] * G + offsets).flatten()  # rows in the batch
            src = (varied.nonzero().squeeze(1)[:, None] * G + offsets).flatten()  # rows in the retry
            rollout = replace_rows(rollout, dst, new_rollout, src, self.tokenizer.pad_token_id)
            total[dst] = new_total[src]
            for name in scores.per_fn:
                scores.per_fn[name][dst] = new_scores.per_fn[name][src]
            for d, s_ in zip(dst.tolist(), src.tolist()):
                scores.completions[d] = new_scores.completions[s_]
            flat[idx[varied]] = False
        return rollout, (~flat).repeat_interleave(G)

    # -- 4: log-probs ----------------------------------------------------------------------------
    def completion_logprobs(self, rollout: Rollout, rows: slice, model=None, with_entropy=False):
        """Per-token log-probs [n, C] of the completion tokens (temperature-scaled, as sampled)."""
        input_ids = rollout.input_ids()[rows]
        mask = rollout.attention_mask()[rows]
        logits, aux = self.forward_logits(input_ids, mask, model=model)
        P = rollout.prompt_ids.shape[1]
        logits = logits[:, P - 1 : -1].float()  # [n, C, V] the logits that predicted each completion token
        if self.hparams.temperature > 0:
            logits = logits / self.hparams.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, rollout.completion_ids[rows].unsqueeze(-1)).squeeze(-1)  # [n, C]
        entropy = None
        if with_entropy:
            with torch.no_grad():  # a metric: no graph for it
                entropy = -(logp_all.exp() * logp_all).sum(-1)  # [n, C]
        return logp, entropy, aux

    @torch.no_grad()
    def frozen_logprobs(self, rollout: Rollout, model) -> torch.Tensor:
        n, mb = rollout.completion_ids.shape[0], self.hparams.micro_batch_size
        return torch.cat([self.completion_logprobs(rollout, slice(i, i + mb), model)[0] for i in range(0, n, mb)])

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        h = self.hparams
        t0 = time.perf_counter()
        rollout, columns, total, scores = self.rollout(batch)
        keep = torch.ones_like(total, dtype=torch.bool)
        if h.dynamic_sampling:
            rollout, keep = self.resample_flat_groups(batch, rollout, total, scores)
        t_rollout = time.perf_counter() - t0

        advantages = group_advantages(total, h.num_generations, h.advantage_scale)  # [B*G]
        mask = rollout.completion_mask.float()  # [B*G, C]
        if h.mask_truncated_completions:
            mask = mask_truncated(mask, rollout.truncated)
        mask = mask * keep.unsqueeze(1)

        t1 = time.perf_counter()
        old_logp = None
        if h.num_iterations > 1 or h.use_sampler_logprobs:
            old_logp = rollout.logprobs if h.use_sampler_logprobs else self.frozen_logprobs(rollout, self.model)
        ref_logp = self.frozen_logprobs(rollout, self.ref_model) if self.ref_model is not None else None
        t_ref = time.perf_counter() - t1

        t2 = time.perf_counter()
        stats = self.optimise(rollout, advantages, mask, old_logp, ref_logp)
        t_train = time.perf_counter() - t2

        self.log_step(rollout, total, scores, keep, stats, t_rollout, t_ref, t_train)

    def optimise(self, rollout, advantages, mask, old_logp, ref_logp) -> dict:
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        n = rollout.completion_ids.shape[0]
        micro = [slice(i, min(i + h.micro_batch_size, n)) for i in range(0, n, h.micro_batch_size)]
        # Normalisers over the whole generation batch, so the micro-batch losses add up to it.
        norm = dict(num_sequences=n, num_tokens=int(mask.sum().clamp(min=1)), num_micro_batches=len(micro),
                    max_completion_length=h.max_new_tokens)
        sums: dict[str, float] = {}
        for _ in range(h.num_iterations):
            for rows in micro:
                logp, entropy, aux = self.completion_logprobs(rollout, rows, with_entropy=True)
                old = logp.detach() if old_logp is None else old_logp[rows]
                ref = ref_logp[rows] if ref_logp is not None else None
                loss, metrics = grpo_loss(
                    logp, old, advantages[rows], mask[rows], ref, beta=h.beta, epsilon_low=h.epsilon_low,
                    epsilon_high=h.epsilon_high, delta=h.delta, aggregation=h.aggregation, **norm,
                )
                if aux is not None:
                    loss = loss + self.aux_coef * aux / len(micro)
                self.manual_backward(loss)
                m = mask[rows]
                weight = float(m.sum()) / norm["num_tokens"]  # token-weighted average of micro-batch means
                metrics["entropy"] = (entropy * m).sum() / m.sum().clamp(min=1)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight / h.num_iterations
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / h.num_iterations
            if h.max_grad_norm:
                sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), h.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return sums

    # -- metrics (names as in TRL) ---------------------------------------------------------------
    def log_step(self, rollout, total, scores, keep, stats, t_rollout, t_ref, t_train):
        G = self.hparams.num_generations
        groups = total.view(-1, G)
        lengths = rollout.completion_lengths.float()
        # train/tokens_per_s (sampled completion tokens over the whole step) is logged by PolicyModule.
        self.step_tokens = int(rollout.completion_mask.sum())
        metrics = {
            "reward": total.mean(),
            "reward_std": groups.std(dim=1).mean(),
            "frac_reward_zero_std": zero_variance_groups(total, G).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": rollout.truncated.float().mean(),
            "kept_ratio": keep.float().mean(),
            "time/rollout": t_rollout,
            "time/reference": t_ref,
            "time/train": t_train,
            **stats,
        }
        for name, values in scores.per_fn.items():
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values)
        for name, count in scores.errors.items():
            metrics[f"rewards/{name}/errors"] = count
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, on_step=True, prog_bar=False)
        self.log("reward", float(metrics["reward"]), prog_bar=True, logger=False)
        every = self.hparams.log_completions_every
        if every and self.global_step % every < self.hparams.num_iterations:
            self.log_completions(rollout, total, scores)

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
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                table = "\n".join(f"| {p} | {c!r} | {r:.2f} |" for _, p, c, r in rows)
                logger.experiment.add_text("completions", "| prompt | completion | reward |\n|---|---|---|\n" + table, self.global_step)
