"""General (non-verifiable-by-the-policy) prompts for R1's stage 4, in miniature.

`InstructionTask`: instructions with a length and / or a formatting constraint, and preference
pairs whose chosen answer follows the instruction and whose rejected answer does not:

    prompt:   "Give me an odd 3-digit number."
    chosen:   "<answer>517</answer>"
    rejected: "<answer>5170</answer>"      (wrong length; or wrong parity; or both; or no answer)

A reward model trained on the pairs (`RewardModelModule`) stands in for R1's helpfulness model; the
policy is never told the rule. `instruction_following` checks the rule itself: logged next to the
reward model's score (weight 0) it shows whether the policy pleases the model by following the
instruction or by gaming the model. Held-out prompts (wording and constraints) never appear in
training.

`MixedTask`: the prompts of R1's stage 4, reasoning (the addition task, rule rewards) mixed with
general ones, every row tagged with a `kind` column (`reasoning` / `general`) that routes rewards
(`Reward(kinds=[...])`). Its test split is the reasoning task's, so `val/accuracy` stays comparable
with the stages before. With `general_completions: format` its general rows also carry an SFT
completion, for R1's stage 3 (which mixes non-reasoning data into the SFT): the reasoning closed at
once and a number of random length and parity, `<think>\n</think><answer>4071</answer>`. That teaches
the response format on general prompts, not the instruction: following it is left to the reward
model in stage 4. Without it a policy trained on arithmetic alone may never close `</think>` on an
instruction, and a reward model scoring the answer (`scope: answer`) then has nothing to score.
"""

from __future__ import annotations

import random
from pathlib import Path

from r1lightning.tasks.arithmetic import AdditionTask, SyntheticTask
from r1lightning.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

LEADS = ("Write", "Give me", "Reply with", "Pick", "Choose", "Name", "Send", "Type", "Tell me", "Say", "Output", "Print")
MAX_DIGITS = 5
PARITIES = ("even", "odd")


def instruction(lead: str, digits: int | None, parity: str | None) -> str:
    what = f"{digits}-digit number" if digits is not None else "number"
    if parity is not None:
        what = f"{parity} {what}"
    return f"{lead} {'an' if what[0] in 'aeiou' else 'a'} {what}."


def follows(answer: str | None, digits: int | None, parity: str | None) -> float:
    """Share of the instruction's constraints the answer meets (0 when it is not a number)."""
    if answer is None or not answer.isdigit() or (len(answer) > 1 and answer[0] == "0"):
        return 0.0
    checks = []
    if digits is not None:
        checks.append(len(answer) == int(digits))
    if parity is not None:
        checks.append(int(answer[-1]) % 2 == (0 if parity == "even" else 1))
    return sum(checks) / len(checks) if checks else 0.0


def _number(rng: random.Random, digits: int, parity: str | None) -> str:
    last = [d for d in range(10) if parity is None or d % 2 == (0 if parity == "even" else 1)]
    if digits == 1:
        return str(rng.choice([d for d in last if d > 0]))
    body = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 2))
    return body + str(rng.choice(last))


class InstructionTask(SyntheticTask):
    name = "instructions"

    def __init__(self, seed: int = 0, num_train: int = 2000, num_test: int = 200, num_test_prompts: int = 32, no_answer_rate: float = 0.0):
        """
        Args:
            seed: the generator seed; the same seed gives byte-identical files.
            num_train, num_test: preference pairs in each split.
            num_test_prompts: distinct instructions kept for the test split only.
            no_answer_rate: share of pairs whose rejected side is an empty answer.
        """
        super().__init__(seed, num_train, num_test)
        self.num_test_prompts = num_test_prompts
        self.no_answer_rate = no_answer_rate
        self.name = f"instructions-p{num_test_prompts}" + (f"-empty{no_answer_rate:g}" if no_answer_rate else "")

    def specs(self) -> list[tuple[str, int | None, str | None]]:
        return [(lead, digits, parity) for lead in LEADS for digits in [None, *range(1, MAX_DIGITS + 1)] for parity in [None, *PARITIES]
                if (digits, parity) != (None, None)]  # fmt: skip

    def pair(self, rng: random.Random, spec) -> dict:
        lead, digits, parity = spec
        n = digits if digits is not None else rng.randint(1, MAX_DIGITS)
        chosen = _number(rng, n, parity)
        # Break one constraint, or both when there are two.
        breaks = [c for c, present in (("length", digits is not None), ("parity", parity is not None)) if present]
        broken = set(rng.sample(breaks, rng.randint(1, len(breaks))))
        m = rng.choice([k for k in range(1, MAX_DIGITS + 2) if k != n]) if "length" in broken else n
        q = parity
        if "parity" in broken:
            q = "odd" if parity == "even" else "even"
        elif parity is None:
            q = None
        rejected = _number(rng, m, q)
        if self.no_answer_rate and rng.random() < self.no_answer_rate:
            rejected = ""  # no answer at all (a policy that never closes its reasoning) must not score well
        assert follows(chosen, digits, parity) == 1.0 and follows(rejected, digits, parity) < 1.0
        return {"prompt": instruction(lead, digits, parity), "chosen": f"{ANSWER}{chosen}{END_ANSWER}",
                "rejected": f"{ANSWER}{rejected}{END_ANSWER}" if rejected else "", "kind": "general", "digits": digits, "parity": parity}  # fmt: skip

    def split_specs(self) -> tuple[list, list]:
        specs = self.specs()
        random.Random(self.seed).shuffle(specs)
        return specs[self.num_test_prompts :], specs[: self.num_test_prompts]

    def splits(self) -> dict[str, list[dict]]:
        train_specs, test_specs = self.split_specs()
        rng = random.Random(self.seed + 1)
        test = [self.pair(rng, rng.choice(test_specs)) for _ in range(self.num_test)]
        train = [self.pair(rng, rng.choice(train_specs)) for _ in range(self.num_train)]
        return {"train": train, "test": test}

    def prompt_rows(self, split: str) -> list[dict]:
        """One row per distinct instruction of the split: `prompt`, `kind`, and the constraints."""
        specs = self.split_specs()[0 if split == "train" else 1]
        return [{"prompt": instruction(*s), "kind": "general", "digits": s[1], "parity": s[2]} for s in specs]


def instruction_following(prompts, completions, digits=None, parity=None, **kwargs) -> list[float | None]:
    """Rule check of `InstructionTask`'s constraints on the `<answer>`; None on rows without any."""
    from r1lightning.rewards.reasoning import extract_answer

    n = len(completions)
    digits = digits if digits is not None else [None] * n
    parity = parity if parity is not None else [None] * n
    out = []
    for c, d, e in zip(completions, digits, parity):
        if d is None and e is None:
            out.append(None)
            continue
        text = c if isinstance(c, str) else c[-1]["content"]
        answer = extract_answer(text)
        out.append(follows(answer.strip() if answer is not None else None, d, e))
    return out


class MixedTask(SyntheticTask):
    def __init__(self, reasoning: AdditionTask | None = None, general: InstructionTask | None = None, general_fraction: float = 0.2,
                 seed: int = 0, general_completions: str | None = None):  # fmt: skip
        """
        Args:
            reasoning: the rule-rewarded task (default: 3-digit addition, 1000 / 500 problems).
            general: the instruction task (its training instructions; the held-out ones stay out).
            general_fraction: share of general prompts in the training split (0: reasoning only).
            seed: shuffles the mixed training rows.
            general_completions: `format` gives the general rows an SFT completion (the answer format
                with a random number, see the module doc); default none (prompts for RL).
        """
        self.reasoning = reasoning or AdditionTask(digits=3, operands=2, seed=0, num_train=1000, num_test=500)
        self.general = general or InstructionTask()
        if not 0 <= general_fraction < 1:
            raise ValueError("MixedTask: general_fraction must be in [0, 1)")
        self.general_fraction = general_fraction
        if general_completions not in (None, "format"):
            raise ValueError(f"MixedTask: general_completions must be `format` or null, got {general_completions!r}")
        self.general_completions = general_completions
        super().__init__(seed, self.reasoning.num_train, self.reasoning.num_test)
        self.name = f"mixed-{self.reasoning.directory('.').name}-{self.general.name}-seed{self.general.seed}-general{general_fraction:g}"
        if general_completions:
            self.name += f"-{general_completions}"

    def directory(self, root: str | Path) -> Path:
        return Path(root) / f"{self.name}-seed{self.seed}"

    def splits(self) -> dict[str, list[dict]]:
        base = self.reasoning.splits()
        blank = {"kind": "reasoning", "digits": None, "parity": None}
        train = [{**row, **blank} for row in base["train"]]
        test = [{**row, **blank} for row in base["test"]]
        general = self.general.prompt_rows("train")
        k = round(self.general_fraction / (1 - self.general_fraction) * len(train))
        rng = random.Random(self.seed)
        extra = [{"prompt": g["prompt"], "answer": None, "completion": None, **{c: g[c] for c in ("kind", "digits", "parity")}}
                 for g in (rng.choices(general, k=k) if k else [])]  # fmt: skip
        if self.general_completions == "format":
            answers = random.Random(self.seed + 1)  # its own generator: the prompts drawn above stay the plain task's
            for row in extra:
                number = _number(answers, answers.randint(1, MAX_DIGITS), None)
                row["completion"] = f"{THINK}\n{END_THINK}{ANSWER}{number}{END_ANSWER}"
        train = train + extra
        rng.shuffle(train)
        return {"train": train, "test": test}
