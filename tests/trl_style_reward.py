"""Reward functions written the way TRL users write them, used by tests/test_rewards.py."""

CALLS: list[dict] = []  # what my_reward received, so tests can check the columns arrived


def my_reward(prompts, completions, answer, **kwargs):
    CALLS.append({"prompts": list(prompts), "answer": list(answer), "kwargs": dict(kwargs)})
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]


def column_reward(prompts, completions, column="score", **kwargs):
    """Echoes a dataset column (None entries included) so tests control the values."""
    return list(kwargs[column])


def flaky_reward(prompts, completions, **kwargs):
    """len(completion), but raises on any batch that contains 'boom'."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom in completion")
    return [float(len(c)) for c in completions]


def short_reward(prompts, completions, **kwargs):
    """Programming error: one value too few."""
    return [1.0] * (len(completions) - 1)


class ScaledLength:
    """A class-style reward; constructor kwargs come from Reward(kwargs=...)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, prompts, completions, **kwargs):
        return [self.scale * len(c) for c in completions]


def text_hash_reward(prompts, completions, **kwargs):
    """A value that differs between most random completions, so groups have variance to learn from."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]
