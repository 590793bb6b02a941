"""Builtin rewards for R1-style reasoning traces: accuracy (math-verify), format, language consistency,
overlong. Registered by name (`fn: accuracy` in YAML) when `r1lightning.rewards` is imported."""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

from math_verify import parse, verify

from r1lightning.rewards import register_reward

logger = logging.getLogger(__name__)

__all__ = [
    "AccuracyReward",
    "format_reward",
    "LanguageConsistencyReward",
    "SoftOverlongReward",
    "extract_answer",
    "last_boxed",
]


# --------------------------------------------------------------------------- accuracy

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LATEX_DELIMS = ("$", "\\(", "\\[", "\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces (None if none is closed)."""
    for m in reversed(list(_BOXED_RE.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
        # Unclosed (e.g. truncated generation): fall back to an earlier box.
    return None


def extract_answer(completion: str) -> str | None:
    """Last non-empty ``<answer>`` content, else last ``\\boxed{}`` content, else None."""
    matches = _ANSWER_RE.findall(completion)
    if matches and matches[-1].strip():
        return matches[-1].strip()
    boxed = last_boxed(completion)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return None


def _as_latex(text: str) -> str:
    # math-verify only finds bare LaTeX (\frac{1}{2}, \pi, x^2+1) inside math delimiters,
    # while text that already has delimiters is best left to its own extraction.
    if any(d in text for d in _LATEX_DELIMS):
        return text
    return f"${text}$"


def _timeout(seconds: int | None) -> int | None:
    # math-verify's timeouts use signal.alarm, which raises outside the main thread;
    # there we run without a timeout rather than fail every sample.
    if threading.current_thread() is threading.main_thread():
        return seconds
    return None


@functools.lru_cache(maxsize=65536)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    # The same gold repeats G times per group (and across epochs): parse once.
    return tuple(parse(_as_latex(gold), parsing_timeout=timeout))


@register_reward("accuracy")
class AccuracyReward:
    """1.0 if the completion's answer is equivalent to the gold answer (math-verify), else 0.0.

    The answer is the last ``<answer>`` block, else the last ``\\boxed{}``; a
    completion with neither scores 0.0. Returns None for samples whose gold
    answer does not parse to a math object. Equivalence is math-verify's
    (``verify(gold, answer)``): ``0843 == 843``, ``1/2 == 0.5 == \\frac{1}{2}``.

    Args:
        answer_column: dataset column holding the gold answer (str or number).
        timeout_seconds: per parse/compare limit, applied only on the main thread
            (signal-based); other threads run without a limit.
    """

    def __init__(self, answer_column: str = "answer", timeout_seconds: int | None = 5) -> None:
        self.answer_column = answer_column
        self.timeout_seconds = timeout_seconds

    @property
    def columns(self) -> tuple[str, ...]:
        """Dataset columns every prompt row must have (checked when the data loads)."""
        return (self.answer_column,)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        if self.answer_column not in kwargs:
            raise KeyError(f"accuracy reward needs dataset column {self.answer_column!r}; got {sorted(kwargs)}")
        golds = kwargs[self.answer_column]
        timeout = _timeout(self.timeout_seconds)
        return [self.score(c, g, timeout) for c, g in zip(completions, golds, strict=True)]

    @staticmethod
    def score(completion: str, gold: Any, timeout: int | None = None) -> float | None:
        if gold is None:
            return None
        gold_parsed = _parse_gold(str(gold).strip(), timeout)
        # A bare string fallback is not a parsed answer: nothing to compare against.
        if not any(not isinstance(g, str) for g in gold_parsed):
            return None
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        answer_parsed = parse(_as_latex(answer), parsing_timeout=timeout)
        if not answer_parsed:
            return 0.0
        return 1.0 if verify(list(gold_parsed), answer_parsed, timeout_seconds=timeout) else 0.0


# --------------------------------------------------------------------------- format

_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*)</answer>", re.DOTALL)


def _format_ok(text: str, require_answer_tag: bool) -> bool:
    s = text.strip()
    if not s.startswith("<think>") or s.count("<think>") != 1 or s.count("</think>") != 1:
        return False
    after = s.split("</think>", 1)[1].strip()
    if not require_answer_tag:
        return bool(after)
    m = _ANSWER_BLOCK_RE.fullmatch(after)
    return (
        m is not None
        and after.count("<answer>") == 1
        and after.count("</answer>") == 1
        and bool(m.group(1).strip())
    )


@register_reward("format")
def format_reward(
    prompts: list[str],
    completions: list[str],
    require_answer_tag: bool = True,
    think_in_prompt: bool = False,
    **kwargs: Any,
) -> list[float]:
    """R1 format: exactly ``<think>...</think><answer>...</answer>``, whitespace-only around.

    With ``require_answer_tag=False`` any non-empty text may follow ``</think>``.
    ``think_in_prompt=True`` is for chat templates that end the prompt with
    ``<think>``: the completion is scored as if prefixed by it. The think block
    may be empty; the answer may not.
    """
    prefix = "<think>" if think_in_prompt else ""
    return [1.0 if _format_ok(prefix + c, require_answer_tag) else 0.0 for c in completions]


# --------------------------------------------------------------------------- language consistency

# Ideographs are counted one per character: Chinese has no spaces between words.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_WORD_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SCRIPTS = {
    "latin": re.compile(r"[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]"),
    "cyrillic": re.compile(r"[\u0400-\u052f]"),
    "cjk": re.compile(f"[{_CJK}]"),
}
_LANG_SCRIPT = {
    "en": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin", "pt": "latin", "nl": "latin",
    "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic",
    "zh": "cjk",
}  # fmt: skip


def _script_of(language: str) -> str | None:
    # "en-US", "zh_CN", "ZH" -> base code
    return _LANG_SCRIPT.get(re.split(r"[-_]", str(language).strip().lower(), maxsplit=1)[0])


def _reasoning(completion: str) -> str:
    end = completion.find("</think>")
    start = completion.find("<think>")
    start = 0 if start < 0 else start + len("<think>")
    if end >= 0:
        # "<think>" may live in the prompt (chat template): then reasoning is everything before "</think>".
        return completion[start:end] if start <= end else completion[:end]
    return completion[start:]


def language_share(text: str, language: str) -> float | None:
    """Share of words in ``text`` written in ``language``'s script; None if no words have letters."""
    script = _script_of(language)
    if script is None:
        raise ValueError(f"unsupported language {language!r}; supported: {sorted(_LANG_SCRIPT)}")
    pattern = _SCRIPTS[script]
    total = hits = 0
    for word in _WORD_RE.findall(text):
        letters = [ch for ch in word if ch.isalpha()]
        if not letters:
            continue  # numbers, symbols, punctuation
        total += 1
        hits += all(pattern.match(ch) for ch in letters)
    return hits / total if total else None


@register_reward("language_consistency")
class LanguageConsistencyReward:
    """DeepSeek-R1's language-consistency reward: share of target-language words in the reasoning.

    The reasoning is the ``<think>`` block (the whole completion if there is
    none). Words are whitespace-separated tokens, except CJK ideographs which
    count one each; tokens without letters are ignored, and a token counts as
    target-language only if all its letters are in the language's script. Note
    LaTeX command names (``\\frac``) count as Latin words.

    Args:
        language: target language for every sample (``en``, ``zh``, ``ru``, ...).
            Takes precedence over the column, because datasets often use a
            ``language`` column for the programming language.
        column: dataset column giving the per-sample target language when
            ``language`` is None. Samples with a missing or unsupported
            language get None.
    """

    def __init__(self, language: str | None = None, column: str = "language") -> None:
        if language is not None and _script_of(language) is None:
            raise ValueError(f"unsupported language {language!r}; supported: {sorted(_LANG_SCRIPT)}")
        self.language = language
        self.column = column
        self._warned: set[str] = set()

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
        if self.language is not None:
            langs = [self.language] * len(completions)
        elif self.column in kwargs:
            langs = kwargs[self.column]
        else:
            raise KeyError(f"language_consistency needs language= or dataset column {self.column!r}")
        out: list[float | None] = []
        for c, lang in zip(completions, langs, strict=True):
            if lang is None or _script_of(lang) is None:
                if lang is not None and lang not in self._warned:
                    self._warned.add(lang)
                    logger.warning("language_consistency: unsupported language %r, scoring None", lang)
                out.append(None)
                continue
            out.append(language_share(_reasoning(c), lang))
        return out


# --------------------------------------------------------------------------- overlong


@register_reward("soft_overlong")
class SoftOverlongReward:
    """DAPO's soft overlong punishment.

    With L the completion length in tokens (from ``completion_ids``, unpadded;
    characters of the completion if ids are not given) and T = max - cache:
    0 if L <= T; (T - L) / cache if T < L <= max; -1 if L > max.
    """

    def __init__(self, max_completion_length: int, cache_length: int) -> None:
        if not 0 < cache_length <= max_completion_length:
            raise ValueError(
                f"need 0 < cache_length <= max_completion_length, got {cache_length} and {max_completion_length}"
            )
        self.max_completion_length = int(max_completion_length)
        self.cache_length = int(cache_length)

    def penalty(self, length: int) -> float:
        threshold = self.max_completion_length - self.cache_length
        if length <= threshold:
            return 0.0
        if length <= self.max_completion_length:
            return (threshold - length) / self.cache_length
        return -1.0

    def __call__(
        self, prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None, **kwargs: Any
    ) -> list[float]:
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c) for c in completions]
        return [self.penalty(n) for n in lengths]
