"""Routing rewards by prompt kind: a column (default `kind`) says which reward functions apply to a row.

DeepSeek-R1's stage 4 mixes reasoning prompts (rule-based rewards) with general prompts (reward
models) in one GRPO stage. A `Reward` with `kinds: [general]` is called only on the rows whose
`kind` is one of those and gives None (does not apply) to every other row:

    rewards:
      - {fn: accuracy, kinds: [reasoning]}
      - {fn: reward_model, kinds: [general], kwargs: {model: my/reward-model}}

A row without the column's value (None) matches `null` in `kinds`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

__all__ = ["route"]


def _listed(result, name: str) -> list:
    if inspect.isawaitable(result):
        result.close()
        raise TypeError(f"reward {name!r}: routing by kind takes synchronous reward functions, not async ones")
    return list(result)


def route(fn: Callable[..., list], kinds: Sequence[Any], column: str, name: str, prompts: list, completions: list, **columns) -> list:
    """Call `fn` on the rows whose `columns[column]` is in `kinds`; None for the others."""
    n = len(completions)
    if column not in columns:
        raise ValueError(f"reward {name!r} applies to kinds {list(kinds)} but the data has no {column!r} column")
    values = columns[column]
    rows = [i for i, k in enumerate(values) if k in kinds]
    out: list = [None] * n
    if not rows:
        return out
    if len(rows) == n:
        return _listed(fn(prompts=prompts, completions=completions, **columns), name)

    def take(v):
        return [v[i] for i in rows] if isinstance(v, (list, tuple)) and len(v) == n else v

    sub = fn(prompts=take(prompts), completions=take(completions), **{k: take(v) for k, v in columns.items()})
    sub = _listed(sub, name)
    if len(sub) != len(rows):
        raise ValueError(f"reward {name!r} returned {len(sub)} values for {len(rows)} completions")
    for i, v in zip(rows, sub):
        out[i] = v
    return out
