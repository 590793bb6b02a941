"""``code`` reward: run the completion's program against the row's tests in the sandbox.

Program extraction (``extract_code``): inside the answer (the text after the last ``</think>``, or
the whole completion if there is none) the last fenced block tagged python/py/python3, else the last
untagged fenced block, else the answer text itself; if the answer has neither code nor text, the
last python block anywhere (e.g. inside the reasoning) is used.

HumanEval-style rows (``include_prompt=True``): the prompt is a function signature plus docstring and
the completion usually continues the body. If the extracted code defines the entry point at column
0 it is a complete program and runs after the prompt (so the prompt's imports and helper functions
stay available and the new definition replaces the stub); otherwise the program is
``prompt + code`` verbatim, i.e. the code is taken as the body. When the row has an entry point,
the prompt also runs in the judge as the trusted *prelude*: the tests call the prompt's helpers
(HumanEval/32 ``poly``, /38 ``encode_cyclic``), so redefining them in the answer gains nothing.

Tests run in the sandbox's judge process, never in the program's (``r1lightning.sandbox``): a test
is Python source (asserts, or HumanEval's ``check(candidate)``), or for programs that read stdin and
print, JSON ``{"inputs": [...], "outputs": [...]}`` (APPS style; the printed text is compared).

Scoring: 1.0 if every test passed (the judge's verdict), else 0.0. With ``partial_credit`` the score
is passed / total *test units*, where a unit is a top-level statement of the test that contains an
``assert`` (for HumanEval tests: of the body of ``check(candidate)``), or one stdio case; other
statements are setup, and when one fails the remaining units count as failed. A program that fails
to load, times out or exits early scores 0.0. Rows without a test return None ("does not apply").
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

from r1lightning.sandbox import SandboxConfig, SandboxJob, SandboxResult, run_programs

__all__ = ["CodeReward", "extract_code", "build_program"]

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n", re.IGNORECASE)
_PY_TAGS = ("python", "py", "python3")


def _text(content: Any) -> str:
    """Plain text of a completion/prompt: a string, or the last message of a conversation."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = content.get("content", "")
        return content if isinstance(content, str) else _text(content)
    if isinstance(content, Sequence) and content:
        last = content[-1]
        if isinstance(last, dict) and last.get("type") == "text":  # multimodal parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return _text(last)
    return ""


def _fenced(text: str) -> str | None:
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for wanted in (_PY_TAGS, ("",)):
        picked = [body for lang, body in blocks if lang in wanted]
        if picked:
            return picked[-1]
    # A truncated generation: an opening python fence that was never closed.
    last_close = text.rfind("```") if blocks else -1
    opening = [m for m in _OPEN_PY_FENCE.finditer(text) if m.start() >= last_close]
    if opening and text.count("```", opening[-1].start()) == 1:
        return text[opening[-1].end() :]
    return None


def extract_code(completion: Any) -> str:
    """The program inside a completion (see the module docstring for the rules)."""
    text = _text(completion)
    answer = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    code = _fenced(answer)
    if code is not None:
        return code
    if answer.strip():
        return answer
    code = _fenced(text)
    return code if code is not None else text


def test_mode(test: str) -> str:
    """"stdio" for a JSON object with ``inputs`` and ``outputs``, else "function" (Python source)."""
    if test.lstrip().startswith("{"):
        try:
            spec = json.loads(test)
        except ValueError:
            return "function"
        if isinstance(spec, dict) and "inputs" in spec and "outputs" in spec:
            if spec.get("fn_name"):
                raise ValueError(f"code reward: a call-based test (fn_name={spec['fn_name']!r:.40}) is not supported; "
                                 "write it as Python asserts")  # fmt: skip
            return "stdio"
    return "function"


def _defines(code: str, entry_point: str | None) -> bool:
    name = re.escape(entry_point) if entry_point else r"\w+"
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{name}[ \t]*\(", code, re.MULTILINE) is not None


def build_program(code: str, prompt: Any = None, entry_point: str | None = None,
                  include_prompt: bool = False) -> str:  # fmt: skip
    """Join prompt and code for HumanEval-style rows (see the module docstring)."""
    if not include_prompt or not isinstance(prompt, str) or not prompt:
        return code
    if _defines(code, entry_point):
        return prompt.rstrip("\n") + "\n\n\n" + code
    return prompt + code


class CodeReward:
    """TRL-style reward function: ``reward(prompts, completions, test=..., entry_point=...)``.

    ``cpu_time`` defaults to ``timeout``; ``max_workers`` (parallel sandboxes) to the CPU count.
    Extra keyword arguments tune the sandbox (see ``SandboxConfig``: ``max_processes``, ``disk_mb``,
    ``call_timeout``, ``isolation``, ``cgroup``, ...).
    """

    def __init__(
        self,
        timeout: float = 10.0,
        cpu_time: float | None = None,
        memory_mb: int = 1024,
        max_workers: int | None = None,
        partial_credit: bool = False,
        include_prompt: bool = False,
        **sandbox: Any,
    ) -> None:
        self.__name__ = "code"  # TRL logs reward functions by __name__
        self.config = SandboxConfig(timeout=timeout, cpu_time=cpu_time, memory_mb=memory_mb, **sandbox)
        self.max_workers = max_workers or os.cpu_count() or 1
        self.partial_credit = partial_credit
        self.include_prompt = include_prompt
        self.last_results: list[SandboxResult | None] = []  # for debugging and logging

    def _prelude(self, prompt: Any, entry_point: str | None) -> str | None:
        # With the prompt prepended, its helpers (HumanEval's poly, encode_cyclic, ...) are part of the
        # task, not of the answer: the tests use the prompt's own definitions. Needs the entry point
        # to know which definition is the answer.
        if self.include_prompt and entry_point and isinstance(prompt, str) and prompt:
            return prompt
        return None

    def score(self, result: SandboxResult) -> float:
        if result.passed:
            return 1.0
        if self.partial_credit and result.status in ("failed", "timeout", "killed") and result.tests_total > 0:
            return result.tests_passed / result.tests_total
        return 0.0

    def __call__(
        self,
        prompts: Sequence[Any] | None,
        completions: Sequence[Any],
        test: Sequence[str | None] | None = None,
        entry_point: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        n = len(completions)
        tests = list(test) if test is not None else [None] * n
        entries = list(entry_point) if entry_point is not None else [None] * n
        if len(tests) != n or len(entries) != n:
            raise ValueError(f"{n} completions but {len(tests)} tests / {len(entries)} entry points")
        prompts = list(prompts) if prompts is not None else [None] * n
        todo = [i for i in range(n) if tests[i]]  # rows without a test are not run
        jobs = [SandboxJob(build_program(extract_code(completions[i]), prompts[i], entries[i], self.include_prompt),
                           tests[i], entries[i] or None, self.partial_credit, self._prelude(prompts[i], entries[i]),
                           test_mode(tests[i]))
                for i in todo]  # fmt: skip
        results = run_programs(jobs, max_workers=self.max_workers, config=self.config)
        scores: list[float | None] = [None] * n
        self.last_results = [None] * n
        for i, r in zip(todo, results):
            scores[i] = self.score(r)
            self.last_results[i] = r
        broken = [r for r in results if r.status == "error"]  # the sandbox itself, not the program
        if broken and len(broken) == len(results):
            raise RuntimeError(f"code reward: the sandbox could not run any program: {broken[0].error}")
        if broken:
            warnings.warn(f"code reward: {len(broken)}/{len(results)} sandbox runs failed to start "
                          f"(scored 0.0): {broken[0].error}", RuntimeWarning, stacklevel=2)  # fmt: skip
        return scores
