"""Option groups: related options travel together, declared once, with the same YAML shape in every
component that takes them (litgpt's `TrainArgs`/`EvalArgs`, TRL's `GRPOConfig` sections).

    model:                                   # r1lightning.grpo.GRPOModule
      init_args:
        sampling: {num_samples: 8, temperature: 1.0, max_new_tokens: 48}
        loss: {beta: 0.04, epsilon_high: 0.28}
    trainer:
      callbacks:
        - class_path: r1lightning.callbacks.RejectionSampling
          init_args: {output: traces.jsonl, sampling: {num_samples: 4, max_new_tokens: 48}}
        - class_path: r1lightning.callbacks.BenchmarkEval
          init_args: {benchmarks: [{name: heldout}], sampling: {num_samples: 16, temperature: 0.6, top_p: 0.95}}

A group given in part keeps the component's defaults for the rest (jsonargparse merges the YAML
into the default). The groups are frozen: a default instance is never shared mutable state.
Rejection sampling's filters are `r1lightning.callbacks.RejectionFilters`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from r1lightning.errors import UserError
from r1lightning.losses import ADVANTAGE_SCALES, AGGREGATIONS, IMPORTANCE_SAMPLING_LEVELS, SAMPLER_CORRECTIONS


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are sampled: GRPO's rollouts, rejection sampling, benchmark evaluation.

    Args:
        num_samples: completions per prompt: GRPO's group size G, rejection sampling's k, the k of
            a benchmark's pass@k / cons@k (0 there: greedy only).
        max_new_tokens: the longest completion; one that has not ended by then is truncated.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches top_p (1: all).
        top_k: only the k most likely tokens (0: all).
    """

    num_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.num_samples < 0 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError(f"sampling: need num_samples >= 0, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 "
                            f"and top_k >= 0, got {self}")  # fmt: skip

    def params(self, seed: int | None = None, max_new_tokens: int | None = None):
        """The per-call parameters a `Sampler` takes (one call samples every row it is given once)."""
        from r1lightning.rollout.base import SamplingParams

        return SamplingParams(max_new_tokens or self.max_new_tokens, self.temperature, self.top_p, self.top_k, seed)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GRPOLossOptions:
    """GRPO's objective (`r1lightning.losses.grpo_loss` and the advantages fed to it).

    Args:
        beta: KL coefficient (k3 estimator) to the frozen reference; 0 loads no reference.
        epsilon_low: the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high].
        epsilon_high: the upper clip (DAPO's clip-higher: larger than epsilon_low).
        delta: optional upper bound on the unclipped ratio (two-sided clipping).
        aggregation: how token losses are averaged: `grpo` (per sequence, then over sequences),
            `bnpo` (over the micro-batch's tokens), `dr_grpo` (over sequences x max_new_tokens),
            `dapo` (over every token of the batch, on every process).
        advantage_scale: divide (reward - group mean) by the `group` std (GRPO), the `batch` std,
            or `none` (Dr. GRPO).
        importance_sampling_level: `token` (GRPO) or `sequence` (GSPO, arXiv:2507.18071: one ratio per
            completion, exp of its mean token log-ratio, clipped per sequence; the paper clips at
            epsilon_low 3e-4, epsilon_high 4e-4).
        mask_truncated_completions: completions without EOS contribute no loss (DAPO).
        sampler_correction: weight each token's surrogate by the ratio of the training forward's
            probability (at sampling time) to the sampler's own, for samplers whose numerics differ
            from training (the fast engines' kernels, `kv_dtype: fp8`): `token_truncate` / `token_mask`
            (per token, clipped to / zeroed outside [min, max]), `sequence_truncate` / `sequence_mask`
            (one ratio per completion, exp of the summed log-ratio). TRL's `vllm_importance_sampling_mode`,
            same arithmetic. null: off. Needs a sampler that returns log-probs.
        sampler_correction_min: the lower bound above (null: none).
        sampler_correction_max: the upper bound above (TRL's default 3; null: none).
    """

    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    aggregation: str = "grpo"
    advantage_scale: str = "group"
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    sampler_correction: str | None = None
    sampler_correction_min: float | None = None
    sampler_correction_max: float | None = 3.0

    def __post_init__(self):
        if self.sampler_correction is not None:
            if self.sampler_correction not in SAMPLER_CORRECTIONS:
                raise UserError(f"loss.sampler_correction: {self.sampler_correction!r} is not one of "
                                f"{', '.join(SAMPLER_CORRECTIONS)} (or null)")
            lo, hi = self.sampler_correction_min, self.sampler_correction_max
            if lo is None and hi is None:
                raise UserError("loss.sampler_correction: set sampler_correction_min or sampler_correction_max "
                                "(unbounded weights would let one token dominate)")
            if (lo is not None and lo < 0) or (hi is not None and hi <= 0) or (lo is not None and hi is not None and lo >= hi):
                raise UserError(f"loss.sampler_correction_min / _max: need 0 <= min < max, got {lo} / {hi}")
        for name, allowed in (("aggregation", AGGREGATIONS), ("advantage_scale", ADVANTAGE_SCALES),
                              ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise UserError(f"loss.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise UserError(f"loss: beta, epsilon_low and epsilon_high must be >= 0, got {self}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def coerce(group, value, name: str):
    """`value` as an instance of the option group class `group` (a mapping, e.g. from a checkpoint's
    hyperparameters, is accepted)."""
    if isinstance(value, group):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(group)}
        if unknown:
            raise UserError(f"{name}: unknown option(s) {sorted(unknown)}; {name} takes "
                            f"{', '.join(f.name for f in dataclasses.fields(group))}")  # fmt: skip
        return group(**value)
    raise UserError(f"{name}: expected a mapping of {group.__name__} options, got {type(value).__name__}")


def moved_into(group, prefix: str, renamed: dict[str, str] | None = None) -> dict[str, str]:
    """{old flat argument: its place in the group}: every field of `group` under `prefix`, plus
    `renamed` ({old name: field})."""
    moved = {f.name: f"{prefix}.{f.name}" for f in dataclasses.fields(group)}
    moved.update({old: f"{prefix}.{new}" for old, new in (renamed or {}).items()})
    return moved


def moved_arguments(cls) -> dict[str, str]:
    """The arguments `cls` (or a base class) no longer takes, with their new places (a class
    declares them as `moved_arguments = {...}`)."""
    out: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", ())):
        out.update(klass.__dict__.get("moved_arguments", {}) or {})
    return out


def moved_error(key: str, new: str, prefix: str = "") -> str:
    """The one line for an argument that moved, e.g. "`model.init_args.temperature` moved: use
    `model.init_args.sampling.temperature`"."""
    return f"`{prefix}{key}` moved: use `{prefix}{new}`"


def reject_moved(cls, given, where: str = "") -> None:
    """Raise a UserError naming the first of `given` (argument names) that moved."""
    moved = moved_arguments(cls)
    for key in given:
        if key in moved:
            raise UserError(moved_error(key, moved[key], where))
