"""Reward functions written the way open-r1 and TRL's documentation write them (conversational
`completion[0]["content"]`, a `solution` column, `**kwargs`), used by tests/test_trl_compat.py."""

import asyncio
import math

CALLS: list[dict] = []
ASYNC_RUNNING: list[int] = []
_running = 0


def recording_reward(prompts, completions, **kwargs):
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "kwargs": dict(kwargs)})
    contents = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    if "log_metric" in kwargs:
        kwargs["log_metric"]("recording/calls", 1.0)
        kwargs["log_extra"]("seen", [c[:7] for c in contents])
    return [2.0 if "<answer>" in c else 1.0 for c in contents]


def content_length_reward(completions, **kwargs):
    """open-r1 style: reads the assistant message, rewards length (varies inside every group)."""
    return [len(completion[0]["content"]) / 10 for completion in completions]


def solution_seen_reward(completions, solution, **kwargs):
    """Needs the `solution` column: 1.0 when the gold answer text appears in the completion."""
    return [1.0 if str(sol) in completion[0]["content"] else 0.0 for completion, sol in zip(completions, solution)]


def always_raises(completions, **kwargs):
    return [len(kwargs["missing_column"]) for _ in completions]


def returns_nan(completions, **kwargs):
    return [math.nan for _ in completions]


def returns_text(completions, **kwargs):
    return ["yes" for _ in completions]


async def async_length(prompts, completions, **kwargs):
    global _running
    _running += 1
    ASYNC_RUNNING.append(_running)
    await asyncio.sleep(0.05)
    _running -= 1
    return [float(len(c)) for c in completions]
