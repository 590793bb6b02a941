"""Every training loss as a pure tensor function: SFT's completion-only cross-entropy and the
GRPO family (advantages, KL, clipped surrogate, aggregation modes, sampler-mismatch weights).

Shapes: N sequences in a (micro-)batch, C completion tokens, G completions per
prompt. Sequences are ordered group by group: rows ``i*G .. i*G+G-1`` belong to
prompt ``i``. SFT: T tokens per row, V the vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "completion_cross_entropy",
    "IGNORE_INDEX",
    "group_advantages",
    "k3_kl",
    "zero_variance_groups",
    "mask_truncated",
    "grpo_loss",
    "sampler_weights",
    "AGGREGATIONS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "SAMPLER_CORRECTIONS",
    "ADVANTAGE_SCALES",
    "nanstd",
    "global_nanstd",
    "global_nanmean",
    "global_count",
]

AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
# Sampler/trainer mismatch correction (TRL's `vllm_importance_sampling_mode`): how the ratio of the
# training forward's probability to the sampler's weights each token's surrogate.
SAMPLER_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
IGNORE_INDEX = -100  # label of the tokens SFT puts no loss on (prompt, padding)


# -- SFT --------------------------------------------------------------------------------------------
def completion_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy over labelled (assistant) tokens.

    logits [N, T, V], labels [N, T] with IGNORE_INDEX on prompt/pad tokens. Returns (loss, #tokens).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [N*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [N*(T-1)]
    count = (shift_labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / count.clamp(min=1), count


# -- GRPO -------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # [B, G]


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std ignoring NaN entries; NaN where fewer than two values are present."""
    if dim is None:
        return nanstd(x.reshape(-1), dim=0, keepdim=False)
    valid = ~torch.isnan(x)
    n = valid.sum(dim=dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    sq = torch.where(valid, (x - mean) ** 2, 0.0).sum(dim=dim, keepdim=True)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), float("nan"))
    return std if keepdim else std.squeeze(dim)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_nanstd(x: Tensor) -> Tensor:
    """`nanstd` of the values of every process together (TRL's `batch` scale: the std of all the step's
    rewards). Without an initialised process group it is the local `nanstd`. Two all-reduces: count and
    sum for the mean, then the squared deviations from it (as exact as one process over all the data)."""
    if _world() == 1:
        return nanstd(x)
    dist = torch.distributed
    valid = ~torch.isnan(x)
    stats = torch.stack([valid.sum().double(), torch.where(valid, x, 0.0).double().sum()])  # [2]
    dist.all_reduce(stats)
    mean = stats[1] / stats[0].clamp(min=1)
    sq = torch.where(valid, (x.double() - mean) ** 2, 0.0).sum()
    dist.all_reduce(sq)
    n = stats[0]
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.nan)
    return std.to(x.dtype)


def global_nanmean(x: Tensor) -> Tensor:
    """Mean of the non-NaN values of every process together (TRL logs `reward` this way)."""
    valid = ~torch.isnan(x)
    stats = torch.stack([valid.sum().double(), torch.where(valid, x, 0.0).double().sum()])  # [2]
    if _world() > 1:
        torch.distributed.all_reduce(stats)
    return (stats[1] / stats[0]).to(x.dtype)  # NaN when nothing was scored


def global_count(mask: Tensor) -> Tensor:
    """Sum of ``mask`` over every process, divided by the number of processes.

    The `dapo` normaliser under data parallelism (TRL: the completion tokens of the whole step over all
    processes, / world size): DDP averages gradients over processes, so each process divides its token sum
    by this and the averaged gradient is the token mean over all processes' tokens."""
    total = mask.detach().float().sum()
    world = _world()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total.clamp(min=1) / world


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std: Tensor | None = None
) -> Tensor:
    """Group-relative advantages ``(r - group mean) / (std + eps)``.

    ``scale``: ``"group"`` divides by the group's std (GRPO), ``"batch"`` by the
    std of all rewards (more robust when groups are small), ``"none"`` does not
    scale (Dr. GRPO). The std is the unbiased one (``torch.std`` default, as in
    TRL), so values match TRL's for the same rewards; a single-element group or
    batch has std 0 rather than NaN.

    A group whose rewards are all equal (`zero_variance_groups`: equal up to float
    rounding) gets advantage exactly 0. Its float mean need not equal its members
    (eight 0.1 average to 0.1 + 1 ulp on the CPU), and ``1 ulp / (0 + eps)`` gave
    every completion of the group the same advantage (-7.45e-5 for a format-only
    group): a gradient with no signal in it, which Adam scales to full
    learning-rate steps on a batch where every group is flat.

    NaN rewards (rows every reward function returned ``None`` for) are left out of
    the group mean and std and get advantage 0, as in TRL. ``batch_std``: the
    ``batch``-scale std computed elsewhere (`global_nanstd` over all processes);
    default: this call's rewards.
    """
    grouped = _grouped(rewards, group_size)  # [B, G]
    nan_rows = torch.isnan(grouped)  # [B, G]
    centered = grouped - torch.nanmean(grouped, dim=1, keepdim=True)  # [B, G]; NaN where the reward is NaN
    centered = torch.where(_flat(grouped)[:, None], 0.0, centered)  # [B, G]; no spread, no signal
    if scale == "none":
        return torch.nan_to_num(centered, nan=0.0).reshape(-1)
    if scale == "group":
        std = nanstd(grouped, dim=1, keepdim=True)  # [B, 1]
    elif scale == "batch":
        std = nanstd(rewards) if batch_std is None else batch_std.to(rewards.dtype)  # []
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; expected 'group', 'batch' or 'none'")
    std = torch.nan_to_num(std, nan=0.0)  # one valid value: std 0, as torch.std of one element is not used
    adv = torch.where(nan_rows, 0.0, centered / (std + eps))  # [B, G]
    return adv.reshape(-1)  # [B*G]


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref), per token: ``exp(d) - d - 1``, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# Rewards closer than this, relative to their size (at least 1), are equal: a weighted sum of rewards
# rounds differently for different values or orders, and a rounding difference is not a signal.
REWARD_RTOL = 1e-6


def _flat(grouped: Tensor) -> Tensor:
    """[B, G] -> [B] bool: every scored reward of the group equal up to `REWARD_RTOL`; fewer than two
    scored rewards is flat too."""
    valid = ~torch.isnan(grouped)  # [B, G]
    hi = torch.where(valid, grouped, float("-inf")).amax(dim=1)  # [B]
    lo = torch.where(valid, grouped, float("inf")).amin(dim=1)  # [B]
    size = torch.maximum(hi.abs(), lo.abs()).clamp(min=1.0)  # [B]; inf where nothing was scored
    return ~(hi - lo > REWARD_RTOL * size)  # [B]; -inf > inf is False: an empty group is flat


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B] bool, True where every reward in the group is equal (no learning signal; DAPO drops these),
    up to float rounding (`REWARD_RTOL`). NaN rewards (unscorable rows) are ignored; a group with
    fewer than two scored rows is flat."""
    return _flat(_grouped(rewards, group_size))  # [B]


def mask_truncated(completion_mask: Tensor, truncated: Tensor) -> Tensor:
    """Zero the mask rows of truncated completions (DAPO overlong filtering). [N, C] -> [N, C]."""
    keep = (~truncated.bool()).to(completion_mask.dtype)  # [N]
    return completion_mask * keep[:, None]  # [N, C]


def _count(x) -> float | Tensor:
    # Global counts may arrive as all-reduced tensors; an empty batch must give 0, not NaN.
    return x.float().clamp(min=1) if isinstance(x, Tensor) else max(float(x), 1.0)


def sampler_weights(train_logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str,
                    low: float | None = None, high: float | None = 3.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights for samples drawn by a sampler whose numerics differ from the training forward
    (a fast engine's kernels, an fp8 KV cache, another library): ratio = exp(train - sampler log-probs),
    per token ([N, C]) or per sequence (exp of the summed difference, [N, 1]); `*_truncate` clips it to
    [low, high], `*_mask` sets it to 0 outside [low, high] (None: unbounded on that side). A NaN sampler
    log-prob gives ratio 1. Returns (weights, metrics over the unmasked tokens, TRL's names where TRL
    logs the same: the weights' mean, the mean |train - sampler| log-prob difference, and the share of
    tokens whose ratio fell outside the bounds)."""
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}; expected one of {SAMPLER_CORRECTIONS}")
    on = mask.bool()
    token_diff = torch.nan_to_num(torch.where(on, train_logp.float() - sampler_logp.float(), 0.0), nan=0.0)  # [N, C]
    diff = token_diff.sum(dim=1, keepdim=True) if mode.startswith("sequence") else token_diff  # [N, 1] or [N, C]
    ratio = torch.exp(diff)
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    outside = (ratio < lo) | (ratio > hi)
    weights = ratio.clamp(min=low, max=high) if mode.endswith("truncate") else ratio.masked_fill(outside, 0.0)
    m = on.float()
    n = m.sum().clamp(min=1)
    metrics = {"sampling/importance_sampling_ratio/mean": (weights.detach() * m).sum() / n,
               "sampling/sampling_logp_difference/mean": (token_diff.abs() * m).sum() / n,
               "sampling/importance_sampling_outside": (outside.float() * m).sum() / n}
    return weights.detach(), metrics


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    num_sequences: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    num_micro_batches: int = 1,
    importance_sampling_level: str = "token",
    sampler_logp: Tensor | None = None,
    sampler_correction: str | None = None,
    sampler_correction_min: float | None = None,
    sampler_correction_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate GRPO loss with optional k3 KL penalty.

    Args:
        logp: [N, C] token log-probs under the current policy (carries grad).
        old_logp: [N, C] log-probs under the sampling policy (``logp.detach()``
            when there is a single update per generation batch).
        advantages: [N] per-sequence advantages.
        mask: [N, C] 1 for completion tokens, 0 for padding / filtered rows.
            Values of the log-prob tensors at masked positions are ignored
            (they may even be -inf).
        ref_logp: [N, C] reference-model log-probs; required when ``beta > 0``.
        delta: caps the unclipped ratio at ``delta`` (two-sided clipping, which
            bounds the loss for negative advantages with large ratios).
        aggregation: how token losses are reduced. Each mode is normalised so
            that summing the returned loss over the micro-batches of one
            generation batch equals the loss over the whole batch:
            ``grpo``: mean over tokens per sequence, summed, / ``num_sequences``;
            ``bnpo``: token sum / this micro-batch's tokens / ``num_micro_batches``;
            ``dr_grpo``: token sum / (``num_sequences`` * ``max_completion_length``);
            ``dapo``: token sum / ``num_tokens``.
        num_sequences: sequences in the whole generation batch (default N).
        num_tokens: completion tokens in the whole generation batch (default: this mask's sum).
        importance_sampling_level: ``token`` (GRPO: one ratio per token) or
            ``sequence`` (GSPO, Zheng et al. 2025, arXiv:2507.18071): one ratio per
            completion, ``exp`` of the mean token log-ratio over its tokens, clipped
            per sequence and applied to every token of it. Sequence ratios stay much
            closer to 1, so GSPO's clip range is tiny: the paper uses
            ``epsilon_low=3e-4``, ``epsilon_high=4e-4``. The KL term stays per token.
            Meant with ``aggregation="grpo"``: the other modes weight a sequence's
            single ratio by its token count.
        sampler_logp: [N, C] the sampler's own log-probs of the tokens it drew; with
            ``sampler_correction`` (one of ``SAMPLER_CORRECTIONS``) each token's surrogate
            (not the KL term) is weighted by `sampler_weights` of ``old_logp`` (the training
            forward's, at sampling time) against them, bounded by ``sampler_correction_min`` /
            ``_max`` (TRL's ``vllm_importance_sampling_*``, the same arithmetic).

    Returns:
        ``(loss, metrics)``: scalar loss and detached masked token means over this
        micro-batch: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` and ``kl`` (if ``beta > 0`` or ``ref_logp`` given).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share shape [N, C]; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N]={logp.shape[0]}, got {tuple(advantages.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {importance_sampling_level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")

    on = mask.bool()  # [N, C]
    m = on.float()  # [N, C]
    # Loss math in fp32 (bf16 ratios near 1 lose the signal). Masked positions are set to 0
    # before any arithmetic so padding values (even -inf) give ratio 1, KL 0 and zero grad.
    logp = torch.where(on, logp.float(), 0.0)  # [N, C]
    log_ratio = logp - torch.where(on, old_logp.float(), 0.0)  # [N, C]; 0 where masked
    if importance_sampling_level == "sequence":
        # GSPO: one length-normalised ratio per completion; [N, 1] broadcasts over its tokens.
        log_ratio = log_ratio.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]
    ratio = torch.exp(log_ratio)  # [N, C] or [N, 1]
    adv = advantages.float()[:, None]  # [N, 1]

    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, C]
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)  # [N, C]
    per_token = -torch.min(unclipped * adv, clipped * adv)  # [N, C]
    is_metrics = {}
    if sampler_correction is not None:
        if sampler_logp is None or sampler_logp.shape != logp.shape:
            raise ValueError(f"sampler_correction needs sampler_logp of shape {tuple(logp.shape)}")
        weights, is_metrics = sampler_weights(old_logp, sampler_logp, mask, sampler_correction,
                                              sampler_correction_min, sampler_correction_max)
        per_token = per_token * weights  # [N, C]

    kl = None
    if ref_logp is not None:
        kl = k3_kl(logp, torch.where(on, ref_logp.float(), 0.0))  # [N, C]; 0 where masked
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = per_token * m  # [N, C]

    n_tok = m.sum()  # []
    if aggregation == "grpo":
        per_seq = per_token.sum(dim=1) / m.sum(dim=1).clamp(min=1)  # [N]; empty rows give 0
        denom = max(logp.shape[0], 1) if num_sequences is None else _count(num_sequences)
        loss = per_seq.sum() / denom
    elif aggregation == "bnpo":
        loss = per_token.sum() / n_tok.clamp(min=1) / num_micro_batches
    elif aggregation == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("aggregation='dr_grpo' needs max_completion_length")
        seqs = max(logp.shape[0], 1) if num_sequences is None else _count(num_sequences)
        loss = per_token.sum() / (seqs * max_completion_length)
    else:  # dapo
        denom = n_tok.clamp(min=1) if num_tokens is None else _count(num_tokens)
        loss = per_token.sum() / denom

    with torch.no_grad():
        denom_tok = n_tok.clamp(min=1)

        def masked_mean(x: Tensor) -> Tensor:
            return (x.float() * m).sum() / denom_tok

        low = (ratio < 1 - epsilon_low) & (adv < 0)  # [N, C]
        high = (ratio > 1 + epsilon_high) & (adv > 0)  # [N, C]
        metrics = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(low | high),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl)
        metrics.update(is_metrics)
    return loss, metrics
