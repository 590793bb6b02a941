"""Multi-digit addition with column-by-column reasoning traces in R1's format.

Why this task: the answer is verifiable by exact match, the length of the problem is a dial, and
the written-out carries genuinely help a small model (it cannot add 3-digit numbers in one step).

A trace for 457 + 386:

    <think>7+6=13
    5+8+1=14
    4+3+1=8
    </think><answer>843</answer>

Each line adds one column (least significant first) plus the incoming carry; the answer reads the
last digit of every line from the bottom up. Every file is a JSONL with `prompt`, `answer` and, for
the trace split, `completion`; held-out problems never appear in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from r1lightning.files import atomic_write_text
from r1lightning.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK


class SyntheticTask:
    """Base class: a deterministic generator of (prompt, answer, completion) rows and their files."""

    name = "task"

    def __init__(self, seed: int = 0, num_train: int = 2000, num_test: int = 500):
        self.seed = seed
        self.num_train = num_train
        self.num_test = num_test

    def problems(self, rng: random.Random, n: int) -> list[tuple]:
        raise NotImplementedError

    def row(self, problem: tuple) -> dict:
        raise NotImplementedError

    def splits(self) -> dict[str, list[dict]]:
        rng = random.Random(self.seed)
        problems = self.problems(rng, self.num_train + self.num_test)
        # Test first, so growing num_train never changes the held-out set.
        test, train = problems[: self.num_test], problems[self.num_test :]
        return {"train": [self.row(p) for p in train], "test": [self.row(p) for p in test]}

    def directory(self, root: str | Path) -> Path:
        return Path(root) / f"{self.name}-seed{self.seed}-train{self.num_train}-test{self.num_test}"

    def write(self, root: str | Path) -> dict[str, Path]:
        """Write `train.jsonl` and `test.jsonl` under `directory(root)`; skipped when already there."""
        out = self.directory(root)
        paths = {split: out / f"{split}.jsonl" for split in ("train", "test")}
        if all(p.exists() for p in paths.values()):
            return paths
        for split, rows in self.splits().items():  # atomic: a reader never sees half a file
            atomic_write_text(paths[split], "".join(json.dumps(row) + "\n" for row in rows))
        return paths


class AdditionTask(SyntheticTask):
    name = "addition"

    def __init__(self, digits: int = 3, operands: int = 2, seed: int = 0, num_train: int = 2000, num_test: int = 500):
        """
        Args:
            digits: digits per operand (leading digit non-zero).
            operands: how many numbers are added.
            seed: the generator seed; the same seed gives byte-identical files.
            num_train: training problems (each with a trace).
            num_test: held-out problems, disjoint from training.
        """
        super().__init__(seed, num_train, num_test)
        if digits < 1 or operands < 2:
            raise ValueError("AdditionTask: need digits >= 1 and operands >= 2")
        space = (9 * 10 ** (digits - 1)) ** operands
        if num_train + num_test > space // 2:
            raise ValueError(f"AdditionTask: {num_train + num_test} problems requested, only {space} exist")
        self.digits = digits
        self.operands = operands
        self.name = f"addition{digits}x{operands}"

    def problems(self, rng: random.Random, n: int) -> list[tuple[int, ...]]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        seen: set[tuple[int, ...]] = set()
        out = []
        while len(out) < n:
            p = tuple(rng.randint(lo, hi) for _ in range(self.operands))
            if p not in seen:  # duplicates would leak between splits
                seen.add(p)
                out.append(p)
        return out

    def row(self, problem: tuple[int, ...]) -> dict:
        prompt = "What is " + "+".join(map(str, problem)) + "?"
        answer = str(sum(problem))
        return {"prompt": prompt, "answer": answer, "completion": self.trace(problem)}

    def trace(self, problem: tuple[int, ...]) -> str:
        lines, carry = [], 0
        for col in range(self.digits):
            terms = [(x // 10**col) % 10 for x in problem] + ([carry] if carry else [])
            total = sum(terms)
            lines.append("+".join(map(str, terms)) + f"={total}")
            carry = total // 10
        answer = str(sum(problem))
        return f"{THINK}" + "\n".join(lines) + f"\n{END_THINK}{ANSWER}{answer}{END_ANSWER}"
