"""Long sums with every column and carry written out: reasoning traces of 1,000+ tokens.

Why this task: R1's behaviour is long chains of thought, and a long chain fails if any one step
fails. Here the chain is a sum of many numbers, one line per number added, every column of every
line written with its carry; with the embedded character tokenizer one character is one token, so
the trace length is exactly what the knobs say. The answer is still one integer, checked by exact
match (the `accuracy` reward), so a run measures how reliably the policy carries out ~1,000 small
steps in a row. Each step only needs what sits a few characters back (the carry, the running sum
on the line above) or the operand named by its label in the prompt, which a small transformer
learns from a few thousand traces.

The prompt for 457 + 386 (digits=3, terms=2):

    Add: a=457 b=386

and its trace (width 4 = digits + digits of the term count):

    <think>a:0000+0457 0+7+0=07 0+5+0=05 0+4+0=04 0+0+0=00 =0457
    b:0457+0386 7+6+0=13 5+8+1=14 4+3+1=08 0+0+0=00 =0843
    </think><answer>843</answer>

Each line starts from the running sum of the line above (zero on the first line), adds the next
labelled number (zero-padded to the same width), one column per `s+x+c=tt` group from the least
significant digit (`c` is the carry into the column, `tt` the column total on two digits, so the
next carry is always the character 9 places back), and ends with the new running sum. Every line of
a problem has the same length, 12·width + 6 characters. The difficulty knobs are `digits` and the
term range `min_terms..max_terms` (each problem draws its count), `max_completion_tokens` gives
the longest completion (1,103 tokens at the GPU recipe's digits=4, terms 13..14; the shortest is 1,024).
"""

from __future__ import annotations

import random
import string

from r1lightning.tasks.arithmetic import SyntheticTask
from r1lightning.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

LABELS = string.ascii_lowercase + string.ascii_uppercase  # one label per term: at most 52 terms


class LongSumTask(SyntheticTask):
    name = "longsum"

    def __init__(
        self,
        digits: int = 4,
        min_terms: int = 13,
        max_terms: int = 16,
        seed: int = 0,
        num_train: int = 16000,
        num_test: int = 500,
    ):
        """
        Args:
            digits: digits per term (leading digit non-zero).
            min_terms, max_terms: each problem adds between these many terms (inclusive, uniform).
            seed: the generator seed; the same seed gives byte-identical files.
            num_train: training problems (each with a trace).
            num_test: held-out problems, disjoint from training.
        """
        super().__init__(seed, num_train, num_test)
        if digits < 1 or min_terms < 2 or max_terms < min_terms or max_terms > len(LABELS):
            raise ValueError(f"LongSumTask: need digits >= 1 and 2 <= min_terms <= max_terms <= {len(LABELS)}")
        self.digits = digits
        self.min_terms = min_terms
        self.max_terms = max_terms
        # Wide enough for the largest possible sum, the same for every problem of the task.
        self.width = len(str(max_terms * (10**digits - 1)))
        self.name = f"longsum{digits}x{min_terms}-{max_terms}"

    def problems(self, rng: random.Random, n: int) -> list[tuple[int, ...]]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        seen: set[tuple[int, ...]] = set()
        out = []
        while len(out) < n:
            p = tuple(rng.randint(lo, hi) for _ in range(rng.randint(self.min_terms, self.max_terms)))
            if p not in seen:  # duplicates would leak between splits
                seen.add(p)
                out.append(p)
        return out

    def row(self, problem: tuple[int, ...]) -> dict:
        prompt = "Add: " + " ".join(f"{LABELS[i]}={x}" for i, x in enumerate(problem))
        return {"prompt": prompt, "answer": str(sum(problem)), "completion": self.trace(problem)}

    def line(self, label: str, total: int, term: int) -> str:
        """One line: `label:SSSS+XXXX` then a `s+x+c=tt` group per column, then `=NEW`."""
        w = self.width
        groups, carry = [], 0
        for col in range(w):
            s, x = (total // 10**col) % 10, (term // 10**col) % 10
            t = s + x + carry
            groups.append(f"{s}+{x}+{carry}={t:02d}")
            carry = t // 10
        return f"{label}:{total:0{w}d}+{term:0{w}d} " + " ".join(groups) + f" ={total + term:0{w}d}\n"

    def trace(self, problem: tuple[int, ...]) -> str:
        lines, total = [], 0
        for i, term in enumerate(problem):
            lines.append(self.line(LABELS[i], total, term))
            total += term
        return f"{THINK}" + "".join(lines) + f"{END_THINK}{ANSWER}{total}{END_ANSWER}"

    def max_completion_tokens(self) -> int:
        """The longest completion of this task in tokens of the embedded character tokenizer
        (`max_terms` lines, the four tags, the widest answer and the end-of-turn token): a floor
        for `max_new_tokens`."""
        return self.max_terms * (12 * self.width + 6) + 4 + self.width + 1
