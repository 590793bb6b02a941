import logging
import math
import threading

import pytest
import torch

import r1lightning.rewards as rewards_pkg
from r1lightning.rewards import Reward, RewardComposer, get_reward, registered_rewards
from r1lightning.rewards.reasoning import (
    AccuracyReward,
    LanguageConsistencyReward,
    SoftOverlongReward,
    extract_answer,
    format_reward,
    last_boxed,
)
from tests import trl_style_reward

nan = float("nan")


def same(a, b):
    """Element-wise equality where None == None (reward lists)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is y, (a, b)
        else:
            assert x == pytest.approx(y), (a, b)


# --------------------------------------------------------------------------- accuracy


def test_extract_answer_prefers_last_answer_tag_then_last_balanced_box():
    assert extract_answer("<answer>3</answer> then <answer> 5 </answer>") == "5"
    assert extract_answer("\\boxed{1} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    # an answer tag wins over a later box
    assert extract_answer("<answer>7</answer> \\boxed{8}") == "7"
    # empty answer tag falls back to the box
    assert extract_answer("<answer> </answer> \\boxed{8}") == "8"
    assert extract_answer("no answer here") is None
    # truncated last box: use the previous complete one
    assert last_boxed("\\boxed{2} ... \\boxed{\\frac{1}{") == "2"
    assert last_boxed("\\boxed {x^{2}}") == "x^{2}"


def test_accuracy_correct_wrong_missing_and_unparsable_gold():
    acc = get_reward("accuracy")
    completions = [
        "<think>7*120+3</think><answer>843</answer>",  # correct
        "<think>...</think><answer>842</answer>",  # wrong
        "<think>I give up</think>",  # no answer -> 0
        "<answer>0843</answer>",  # leading zero: math-verify compares numerically -> correct
        "the result is \\boxed{\\frac{1}{2}}",  # boxed fallback, 1/2 == 0.5
        "<answer>1/2</answer>",  # plain 1/2 vs 0.5
        "<answer>The answer is $\\sqrt{18}$</answer>",  # text + delimiters inside the tag
        "<answer>843</answer>",  # gold is empty -> None
        "<answer>843</answer>",  # gold is malformed LaTeX -> None
        "<answer>843</answer>",  # numeric gold
    ]
    answers = ["843", "843", "843", "843", "0.5", "0.5", "3\\sqrt{2}", "", "\\frac{", 843]
    same(acc(["p"] * 10, completions, answer=answers), [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, None, None, 1.0])


def test_accuracy_gold_in_latex_and_answer_as_fraction():
    acc = AccuracyReward()
    out = acc(["p"] * 3, ["<answer>0.5</answer>", "<answer>\\frac12</answer>", "<answer>\\pi</answer>"],
              answer=["\\frac{1}{2}", "1/2", "\\pi"])  # fmt: skip
    same(out, [1.0, 1.0, 1.0])


def test_accuracy_works_off_the_main_thread():
    acc = AccuracyReward(timeout_seconds=5)
    result = {}

    def run():
        try:
            result["out"] = acc(["p", "p"], ["<answer>1/2</answer>", "<answer>2</answer>"], answer=["0.5", "0.5"])
        except Exception as e:  # surfaced below
            result["err"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert "err" not in result, result.get("err")
    same(result["out"], [1.0, 0.0])


def test_accuracy_missing_column_names_it():
    with pytest.raises(KeyError, match="answer"):
        AccuracyReward()(["p"], ["<answer>1</answer>"], solution=["1"])


# --------------------------------------------------------------------------- format


def test_format_positives_and_negatives():
    completions = [
        "<think>reason</think><answer>5</answer>",  # 1
        "  \n<think>\nreason\n</think>\n\n<answer>\n5\n</answer>\n ",  # 1: whitespace around is fine
        "<think></think><answer>5</answer>",  # 1: empty reasoning still has the format
        "reason</think><answer>5</answer>",  # 0: no opening think
        "<think>a</think><think>b</think><answer>5</answer>",  # 0: two think blocks
        "<think>a</think><answer>5</answer> trailing",  # 0: text after the answer
        "Sure! <think>a</think><answer>5</answer>",  # 0: text before think
        "<think>a</think><answer>  </answer>",  # 0: empty answer
        "<think>a</think>5",  # 0: answer tag required by default
        "<think>a</think><answer>5</answer><answer>6</answer>",  # 0: two answers
        "<think>a<answer>5</answer>",  # 0: think never closed
    ]
    assert format_reward(["p"] * len(completions), completions) == [1.0, 1.0, 1.0] + [0.0] * 8


def test_format_without_answer_tag_and_think_in_prompt():
    f = get_reward("format", require_answer_tag=False)
    assert f(["p"] * 3, ["<think>a</think> so 5", "<think>a</think>  \n", "<think>a</think><answer>5</answer>"]) == [
        1.0,
        0.0,
        1.0,
    ]
    g = get_reward("format", think_in_prompt=True)
    assert g(["p"] * 2, ["reason</think><answer>5</answer>", "<think>r</think><answer>5</answer>"]) == [1.0, 0.0]


# --------------------------------------------------------------------------- language consistency


def test_language_consistency_mixed_en_zh_share():
    completion = "<think>The answer is 答</think><answer>5</answer>"
    assert get_reward("language_consistency", language="en")(["p"], [completion]) == [pytest.approx(0.75)]
    assert get_reward("language_consistency", language="zh")(["p"], [completion]) == [pytest.approx(0.25)]


def test_language_consistency_ignores_symbols_counts_ideographs_and_uses_column():
    lc = LanguageConsistencyReward()
    completions = [
        "<think>x = 5 , 答案</think>",  # words: x | 答 | 案  ("=", "5", "," have no letters)
        "<think>x = 5 , 答案</think>",
        "<think>Ответ is 42</think>",  # Ответ | is
        "<think>1 + 2 = 3</think><answer>3</answer>",  # no words -> None
        "no think block here, всё",  # whole completion: 5 words, 4 Latin
        "<think>def f(): pass</think>",  # unsupported language in the column -> None
    ]
    out = lc(["p"] * 6, completions, language=["en", "zh", "ru", "en", "en-US", "python"])
    same(out, [1 / 3, 2 / 3, 0.5, None, 0.8, None])


def test_language_consistency_constructor_beats_column_and_rejects_unknown():
    lc = LanguageConsistencyReward(language="zh")
    same(lc(["p"], ["<think>答 a</think>"], language=["python"]), [0.5])
    # a word mixing scripts (Cyrillic "О" and "в" among Latin letters) is not English
    same(LanguageConsistencyReward(language="en")(["p"], ["<think>Оtвеt word</think>"]), [0.5])
    with pytest.raises(ValueError, match="klingon"):
        LanguageConsistencyReward(language="klingon")


def test_language_consistency_reasoning_with_think_in_prompt():
    # "<think>" in the prompt: everything before "</think>" is the reasoning.
    lc = LanguageConsistencyReward(language="en")
    same(lc(["p"], ["good 好</think><answer>答 答 答</answer>"]), [0.5])


# --------------------------------------------------------------------------- soft overlong


def test_soft_overlong_three_regimes_exact():
    # max 10, cache 4 -> free up to 6 tokens, linear to -1 at 10, -1 beyond
    r = get_reward("soft_overlong", max_completion_length=10, cache_length=4)
    assert isinstance(r, SoftOverlongReward)
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    assert r(["p"] * 6, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # without ids it falls back to characters
    assert r(["p"] * 2, ["a" * 5, "a" * 9]) == [0.0, -0.75]
    with pytest.raises(ValueError):
        SoftOverlongReward(max_completion_length=4, cache_length=5)


# --------------------------------------------------------------------------- registry


def test_unknown_name_is_one_line_listing_registered():
    with pytest.raises(ValueError) as e:
        Reward(fn="acuracy")
    msg = str(e.value)
    assert "\n" not in msg and "'acuracy'" in msg
    for name in ("accuracy", "format", "language_consistency", "soft_overlong", "code"):
        assert name in msg


def test_bad_import_path_is_one_line_naming_it():
    for path in ("no_such_pkg.mod.fn", "tests.trl_style_reward.missing", "tests.trl_style_reward:missing"):
        with pytest.raises(ValueError) as e:
            get_reward(path)
        assert path in str(e.value) and "\n" not in str(e.value)


def test_lazy_entries_import_only_when_requested(monkeypatch):
    monkeypatch.setitem(rewards_pkg._LAZY, "lazy_len", "tests.trl_style_reward:ScaledLength")
    monkeypatch.setitem(rewards_pkg._LAZY, "lazy_missing", "r1lightning.rewards.not_written_yet:Thing")
    assert "code" in registered_rewards() and "lazy_missing" in registered_rewards()
    r = get_reward("lazy_len", scale=2.0)
    assert r(["p"], ["abc"]) == [6.0]
    with pytest.raises(ValueError, match="not_written_yet"):
        get_reward("lazy_missing")
    monkeypatch.delitem(rewards_pkg._REGISTRY, "lazy_len")


def test_reward_names_classes_and_bound_kwargs():
    assert Reward(fn="accuracy").name == "accuracy"
    assert Reward(fn="tests.trl_style_reward.my_reward").name == "my_reward"
    assert Reward(fn="tests.trl_style_reward:ScaledLength", name="len").name == "len"
    scaled = Reward(fn="tests.trl_style_reward:ScaledLength", kwargs={"scale": 0.5})
    assert scaled(["p"], ["abcd"]) == [2.0]
    col = Reward(fn="tests.trl_style_reward.column_reward", kwargs={"column": "b"})
    assert col(["p"], ["x"], a=[1.0], b=[7.0]) == [7.0]


def test_reward_is_buildable_from_config_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    cfg = parser.parse_object(
        {"reward": {"class_path": "r1lightning.rewards.Reward",
                    "init_args": {"fn": "soft_overlong", "weight": 0.5,
                                  "kwargs": {"max_completion_length": 10, "cache_length": 4}}}}
    )  # fmt: skip
    reward = parser.instantiate_classes(cfg).reward
    assert reward.weight == 0.5 and reward.name == "soft_overlong"
    assert reward(["p"], ["x"], completion_ids=[[0] * 8]) == [-0.5]


# --------------------------------------------------------------------------- composer


def _col(name, weight):
    return Reward(fn="tests.trl_style_reward.column_reward", weight=weight, name=name, kwargs={"column": name})


def test_composer_weighted_nansum_and_all_none_is_zero():
    comp = RewardComposer([_col("a", 1.0), _col("b", 0.5)])
    out = comp(["p"] * 4, ["w", "x", "y", "z"], {"a": [1.0, None, 0.5, None], "b": [2.0, 4.0, None, None]})
    assert out.total.dtype == torch.float32 and out.total.shape == (4,)
    assert out.total.tolist() == [2.0, 2.0, 0.5, 0.0]
    torch.testing.assert_close(out.per_fn["a"], torch.tensor([1.0, nan, 0.5, nan]), equal_nan=True)
    torch.testing.assert_close(out.per_fn["b"], torch.tensor([2.0, 4.0, nan, nan]), equal_nan=True)
    assert out.errors == {"a": 0, "b": 0}


def test_composer_isolates_a_raising_sample(caplog):
    comp = RewardComposer([Reward(fn="tests.trl_style_reward.flaky_reward", weight=2.0), _col("a", 1.0)])
    with caplog.at_level(logging.WARNING, logger="r1lightning.rewards"):
        out = comp(["p"] * 3, ["ab", "boom", "abcd"], {"a": [1.0, 1.0, 1.0]})
    torch.testing.assert_close(out.per_fn["flaky_reward"], torch.tensor([2.0, nan, 4.0]), equal_nan=True)
    assert out.total.tolist() == [5.0, 1.0, 9.0]
    assert out.errors == {"flaky_reward": 1, "a": 0}
    warnings = [r for r in caplog.records if "flaky_reward" in r.getMessage()]
    assert len(warnings) == 1 and "1/3" in warnings[0].getMessage()


def test_composer_wrong_length_is_a_programming_error():
    comp = RewardComposer([Reward(fn="tests.trl_style_reward.short_reward")])
    with pytest.raises(ValueError, match="short_reward"):
        comp(["p"] * 3, ["a", "b", "c"], {})


def test_composer_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicate"):
        RewardComposer([Reward(fn="format"), Reward(fn="format", kwargs={"require_answer_tag": False})])


def test_trl_style_function_receives_dataset_columns():
    trl_style_reward.CALLS.clear()
    comp = RewardComposer([Reward(fn="tests.trl_style_reward.my_reward")])
    out = comp(["p1", "p2"], ["42", "41"], {"answer": ["42", "42"], "level": [3, 5]}, completion_ids=[[1, 2], [3]])
    assert out.total.tolist() == [1.0, 0.0]
    (call,) = trl_style_reward.CALLS
    assert call["prompts"] == ["p1", "p2"] and call["answer"] == ["42", "42"]
    assert call["kwargs"] == {"level": [3, 5], "completion_ids": [[1, 2], [3]]}


def test_composer_with_builtins_end_to_end():
    comp = RewardComposer(
        [
            Reward(fn="accuracy"),
            Reward(fn="format", weight=0.5),
            Reward(fn="soft_overlong", kwargs={"max_completion_length": 10, "cache_length": 4}),
        ]
    )
    completions = ["<think>x</think><answer>4</answer>", "<think>x</think><answer>5</answer>", "\\boxed{4}"]
    ids = [[0] * 5, [0] * 8, [0] * 12]
    out = comp(["2+2?"] * 3, completions, {"answer": ["4", "4", "4"]}, completion_ids=ids)
    # acc + 0.5*format + overlong: [1 + 0.5 + 0, 0 + 0.5 - 0.5, 1 + 0 - 1]
    torch.testing.assert_close(out.total, torch.tensor([1.5, 0.0, 0.0]))
    assert not math.isnan(out.total.sum().item())
