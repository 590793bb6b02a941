"""Watching for reward hacking when a learned reward model is in the mix (R1's stage 4).

Per prompt kind (the `kind` column): the share of rows, completion length, KL to the reference
(k3, per row averaged over its tokens, then over the kind's rows) and every reward's mean; for
reward-model rewards also the spread of their scores (std, min, max). Over all rows: the Pearson
correlation of each reward model's score with each other reward where both apply. A policy that
games the reward model shows up as a rising score with a falling correlation to the rule checks,
a drifting length, or a KL that grows on one kind only.
"""

from __future__ import annotations

import torch

__all__ = ["kind_metrics", "row_kl"]


def row_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] mean over each row's completion tokens of k3 = exp(ref - logp) - (ref - logp) - 1.
    logp, ref_logp, mask: [N, C]."""
    d = (ref_logp - logp).float()
    k3 = torch.exp(d) - d - 1
    m = mask.float()
    return (k3 * m).sum(1) / m.sum(1).clamp(min=1)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return None if denom <= 1e-12 else float((a * b).sum() / denom)


def kind_metrics(
    kinds: list | None,
    per_fn: dict[str, torch.Tensor],
    lengths: torch.Tensor,
    kl: torch.Tensor | None = None,
    model_rewards: set[str] | frozenset = frozenset(),
) -> dict[str, float]:
    """Metrics keyed `kinds/<kind>/...` and `corr/<reward model>/<other reward>`. kinds: one entry
    per row (None: no kind column, every row counts as `all`); per_fn: [N] with NaN where a reward
    does not apply; lengths, kl: [N]."""
    n = lengths.shape[0]
    labels = ["all"] * n if kinds is None else ["none" if k is None else str(k) for k in kinds]
    out: dict[str, float] = {}
    for kind in sorted(set(labels)):
        rows = torch.tensor([lab == kind for lab in labels])
        prefix = f"kinds/{kind}"
        out[f"{prefix}/fraction"] = float(rows.float().mean())
        out[f"{prefix}/completion_length"] = float(lengths[rows].float().mean())
        if kl is not None:
            out[f"{prefix}/kl"] = float(kl.cpu()[rows].mean())
        for name, values in per_fn.items():
            v = values[rows]
            v = v[~torch.isnan(v)]
            if v.numel() == 0:
                continue
            out[f"{prefix}/{name}/mean"] = float(v.mean())
            if name in model_rewards:
                out[f"{prefix}/{name}/std"] = float(v.std()) if v.numel() > 1 else 0.0
                out[f"{prefix}/{name}/min"] = float(v.min())
                out[f"{prefix}/{name}/max"] = float(v.max())
    for rm in model_rewards:
        for other, values in per_fn.items():
            if other == rm or rm not in per_fn:
                continue
            both = ~torch.isnan(per_fn[rm]) & ~torch.isnan(values)
            if int(both.sum()) >= 3:
                r = _pearson(per_fn[rm][both], values[both])
                if r is not None:
                    out[f"corr/{rm}/{other}"] = r
    return out
