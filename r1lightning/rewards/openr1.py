"""Reward functions in open-r1's style, for `configs/openr1_grpo.yaml` and for users bringing theirs.

They are written the way open-r1 and TRL's documentation write reward functions (our own code):
conversational completions (`completion[0]["content"]`), the gold solution in a `solution` column,
everything else swallowed by `**kwargs`. Name them by import path
(`r1lightning.rewards.openr1.accuracy_reward`): import paths get TRL's calling convention.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["accuracy_reward", "format_reward", "tag_count_reward", "reasoning_steps_reward", "len_reward"]


def _text(completion: Any) -> str:
    # Conversational: [{"role": "assistant", "content": ...}]; plain rows give the string itself.
    return completion[0]["content"] if isinstance(completion, list) else completion


def _correct(content: str, solution: Any) -> float | None:
    from r1lightning.rewards.reasoning import AccuracyReward, last_boxed

    # The answer is the last <answer> block or \boxed{}; a bare completion is read whole.
    if "<answer>" not in content and last_boxed(content) is None:
        content = f"<answer>{content}</answer>"
    return AccuracyReward.score(content, solution)


def accuracy_reward(completions: list, solution: list[str], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the solution's (math-verify), else 0.0; None when the
    solution itself does not parse (the sample is skipped, as open-r1 does)."""
    return [_correct(_text(c), sol) for c, sol in zip(completions, solution)]


_FORMAT_RE = re.compile(r"<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>", re.DOTALL)


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """1.0 for exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0.0."""
    return [1.0 if _FORMAT_RE.fullmatch(_text(c)) else 0.0 for c in completions]


_TAGS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")


def tag_count_reward(completions: list, **kwargs: Any) -> list[float]:
    """A quarter point for each of the four tags that appears exactly once: partial credit on the way
    to `format_reward`."""
    return [sum(0.25 for tag in _TAGS if _text(c).count(tag) == 1) for c in completions]


_STEP_RE = re.compile(r"(Step \d+:|^\d+\.|\n- |\n\* |First,|Second,|Next,|Finally,)", re.MULTILINE)


def reasoning_steps_reward(completions: list, **kwargs: Any) -> list[float]:
    """Rewards visible step-by-step reasoning: min(1, markers / 3), markers being `Step k:`, numbered
    lines, bullets and First/Second/Next/Finally."""
    return [min(1.0, len(_STEP_RE.findall(_text(c))) / 3) for c in completions]


def len_reward(completions: list, solution: list[str], **kwargs: Any) -> list[float | None]:
    """Kimi k1.5's length reward over the batch: with lengths scaled to [0, 1] between the shortest and the
    longest completion, `lam = 0.5 - scaled`; correct answers get `lam`, wrong ones `min(0, lam)`. All equal
    lengths give 0."""
    texts = [_text(c) for c in completions]
    correct = [_correct(t, sol) for t, sol in zip(texts, solution)]
    lengths = [len(t) for t in texts]
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(texts)
    out: list[float | None] = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(None if ok is None else lam if ok else min(0.0, lam))
    return out
