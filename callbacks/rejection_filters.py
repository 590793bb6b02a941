"""`RejectionFilters`: which of rejection sampling's samples become training traces."""

from __future__ import annotations

from dataclasses import dataclass, field

_EPS = 1e-6


@dataclass(frozen=True)
class RejectionFilters:
    """Which samples rejection sampling keeps (applied when the chunks are merged: changing a
    threshold re-filters without re-sampling).

    A sample is kept if it ended (EOS within `max_new_tokens`, unless `drop_truncated: false`),
    and: its `correct_reward` score is 1 (`require_correct`), its `format_reward` score is 1
    (`require_format`), its `language_reward` score >= `min_language_consistency`, it has at
    most `max_length` tokens, and it meets every `min_scores` entry. A score of None (reward not
    applicable) fails a requirement. Then per prompt: exact duplicate completions are dropped
    (`dedup`) and at most `max_per_prompt` are kept, in sample order. Rewards named by a filter
    but absent from the scoring rewards are added by name (`accuracy`, `format`, `language_consistency`).

    Args:
        require_correct: keep only samples whose `correct_reward` score is 1.
        require_format: keep only samples whose `format_reward` score is 1.
        min_language_consistency: the least `language_reward` score (None: no check).
        language: the target language of the `language_consistency` reward added for that check.
        max_length: the most completion tokens (None: any).
        drop_truncated: drop samples without EOS.
        min_scores: {reward name: the least score}.
        dedup: drop exact duplicate completions of a prompt.
        max_per_prompt: keep at most this many per prompt (None: all).
        correct_reward: the reward name `require_correct` reads.
        format_reward: the reward name `require_format` reads.
        language_reward: the reward name `min_language_consistency` reads.
    """

    require_correct: bool = True
    require_format: bool = True
    min_language_consistency: float | None = None
    language: str | None = "en"
    max_length: int | None = None
    drop_truncated: bool = True
    min_scores: dict[str, float] = field(default_factory=dict)
    dedup: bool = True
    max_per_prompt: int | None = None
    correct_reward: str = "accuracy"
    format_reward: str = "format"
    language_reward: str = "language_consistency"

    def required_rewards(self) -> list[tuple[str, dict]]:
        """(name, kwargs) of the rewards the filters read."""
        wanted = []
        if self.require_correct:
            wanted.append((self.correct_reward, {}))
        if self.require_format:
            wanted.append((self.format_reward, {}))
        if self.min_language_consistency is not None:
            wanted.append((self.language_reward, {"language": self.language} if self.language else {}))
        return wanted

    def passes(self, sample: dict) -> bool:
        scores = sample["scores"]

        def at_least(name: str, threshold: float) -> bool:
            v = scores.get(name)
            return v is not None and v >= threshold - _EPS

        if self.drop_truncated and sample["truncated"]:
            return False
        if self.require_correct and not at_least(self.correct_reward, 1.0):
            return False
        if self.require_format and not at_least(self.format_reward, 1.0):
            return False
        if self.min_language_consistency is not None and not at_least(self.language_reward, self.min_language_consistency):
            return False
        if self.max_length is not None and sample["num_tokens"] > self.max_length:
            return False
        return all(at_least(name, v) for name, v in self.min_scores.items())

    def select(self, samples: list[dict]) -> tuple[list[dict], int, int]:
        """One prompt's samples, in sample order -> (kept, how many passed, duplicates dropped)."""
        good = [s for s in samples if self.passes(s)]
        passed, duplicates = len(good), 0
        if self.dedup:
            seen, unique = set(), []
            for s in good:
                key = s["completion"].strip()
                if key not in seen:
                    seen.add(key)
                    unique.append(s)
            duplicates = len(good) - len(unique)
            good = unique
        if self.max_per_prompt is not None:
            good = good[: self.max_per_prompt]
        return good, passed, duplicates
