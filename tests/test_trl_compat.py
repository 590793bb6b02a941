"""Drop-in behaviour for TRL and open-r1 users: reward inputs and failures, unscorable rows, GSPO,
global normalisers under data parallelism, datasets by name (issue 15)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1lightning.errors import UserError
from r1lightning.losses import global_count, global_nanstd, group_advantages, grpo_loss, nanstd, zero_variance_groups
from r1lightning.rewards import Reward, RewardComposer, TrainerState

ROOT = Path(__file__).resolve().parents[1]
nan = float("nan")


# -- rows every reward function returned None for ----------------------------------------------------
def test_unscorable_rows_are_left_out_of_the_baseline_and_get_zero_advantage():
    rewards = torch.tensor([1.0, nan, 3.0, nan, 2.0, 2.0, 2.0, nan, nan, nan, nan, nan])  # 3 groups of 4
    eps = 1e-4
    # Group 0: scored [1, 3] -> mean 2, unbiased std sqrt(2); group 1: std 0; group 2: nothing scored.
    s2 = math.sqrt(2.0)
    want = [-1 / (s2 + eps), 0.0, 1 / (s2 + eps), 0.0] + [0.0] * 8
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), torch.tensor(want))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([-1.0, 0, 1, 0] + [0.0] * 8))
    # Batch std over the five scored rewards [1, 3, 2, 2, 2]: mean 2, var (1 + 1) / 4 = 0.5.
    sb = math.sqrt(0.5)
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"), torch.tensor([-1 / (sb + eps), 0, 1 / (sb + eps), 0] + [0.0] * 8))
    assert zero_variance_groups(rewards, 4).tolist() == [False, True, True]
    # Without NaN the values are the unchanged GRPO ones (torch.std, unbiased).
    plain = torch.tensor([1.0, 2.0, 4.0, 5.0])
    torch.testing.assert_close(group_advantages(plain, 4), (plain - 3.0) / (plain.std() + eps))


def test_nanstd_matches_torch_std_on_the_scored_values():
    x = torch.tensor([[1.0, nan, 4.0, 6.0], [nan, nan, 1.0, nan]])
    torch.testing.assert_close(nanstd(x, dim=1)[0], torch.tensor([1.0, 4.0, 6.0]).std())
    assert math.isnan(nanstd(x, dim=1)[1].item())  # one value: no std
    torch.testing.assert_close(nanstd(x), torch.tensor([1.0, 4.0, 6.0, 1.0]).std())


def _column_reward(name, weight=1.0):
    return Reward(fn="tests.trl_style_reward.column_reward", weight=weight, name=name, kwargs={"column": name})


def test_composer_marks_rows_no_function_scored():
    comp = RewardComposer([_column_reward("a"), _column_reward("b", 0.5)])
    out = comp(["p"] * 4, ["w", "x", "y", "z"], {"a": [1.0, None, None, 0.0], "b": [None, 2.0, None, None]})
    assert out.unscorable.tolist() == [False, False, True, False]
    assert out.total.tolist() == [1.0, 1.0, 0.0, 0.0]


# -- reward inputs exactly as TRL passes them ---------------------------------------------------------
def test_conversational_rows_get_message_lists_and_trl_keyword_arguments():
    from tests import openr1_style_rewards as fns

    fns.CALLS.clear()
    comp = RewardComposer([Reward(fn="tests.openr1_style_rewards.recording_reward"), Reward(fn="format", weight=0.0)])
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}]
    state = TrainerState(global_step=7, max_steps=10)
    out = comp(
        ["rendered 2+2?"] * 2, ["<think>a</think><answer>4</answer>", "four"],
        {"prompt": [chat, chat], "solution": ["4", "4"]}, completion_ids=[[1, 2], [3]],
        reward_prompts=[chat, chat], trainer_state=state,
    )
    (call,) = fns.CALLS
    assert call["prompts"] == [chat, chat]
    assert call["completions"] == [[{"role": "assistant", "content": "<think>a</think><answer>4</answer>"}],
                                   [{"role": "assistant", "content": "four"}]]
    # TRL passes every dataset column but `prompt` / `completion`, plus these.
    assert sorted(call["kwargs"]) == ["completion_ids", "log_extra", "log_metric", "solution", "trainer_state"]
    assert call["kwargs"]["trainer_state"].global_step == 7 and call["kwargs"]["completion_ids"] == [[1, 2], [3]]
    assert out.per_fn["recording_reward"].tolist() == [2.0, 1.0]  # reads completion[0]["content"]
    assert out.metrics == {"recording/calls": [1.0]} and out.extra == {"seen": ["<think>", "four"]}
    # Builtins keep taking text: format scored the strings.
    assert out.per_fn["format"].tolist() == [1.0, 0.0]


def test_plain_rows_get_strings():
    from tests import openr1_style_rewards as fns

    fns.CALLS.clear()
    comp = RewardComposer([Reward(fn="tests.openr1_style_rewards.recording_reward")])
    comp(["rendered"], ["x"], {"prompt": ["What is 1+1?"], "solution": ["2"]}, reward_prompts=["What is 1+1?"])
    (call,) = fns.CALLS
    assert call["prompts"] == ["What is 1+1?"] and call["completions"] == ["x"]
    assert sorted(call["kwargs"]) == ["solution"]  # no trainer: no trainer_state / log_* arguments


def test_async_reward_functions_are_awaited_together():
    from tests import openr1_style_rewards as fns

    comp = RewardComposer([Reward(fn="tests.openr1_style_rewards.async_length", name="a"),
                           Reward(fn="tests.openr1_style_rewards.async_length", name="b", weight=2.0)])
    fns.ASYNC_RUNNING.clear()
    out = comp(["p"] * 2, ["ab", "abcd"])
    assert out.per_fn["a"].tolist() == [2.0, 4.0] and out.total.tolist() == [6.0, 12.0]
    assert max(fns.ASYNC_RUNNING) == 2  # both ran concurrently on one loop


def test_openr1_style_rewards_read_the_content():
    from r1lightning.rewards import openr1

    good = [{"role": "assistant", "content": "<think>\nStep 1: add.\nStep 2: check.\n</think>\n<answer>\n\\boxed{4}\n</answer>"}]
    bad = [{"role": "assistant", "content": "5"}]
    assert openr1.accuracy_reward([good, bad], solution=["$4$", "$4$"]) == [1.0, 0.0]
    assert openr1.format_reward([good, bad]) == [1.0, 0.0]
    assert openr1.tag_count_reward([good, bad]) == [1.0, 0.0]
    assert openr1.reasoning_steps_reward([good, bad]) == [2 / 3, 0.0]
    # Kimi length reward: lengths scaled to [0, 1]; correct short gets 0.5, wrong long min(0, -0.5).
    assert openr1.len_reward([good, bad], solution=["4", "4"]) == [-0.5, 0.0]
    lens = openr1.len_reward([bad, good], solution=["5", "5"])  # bad is correct now and shorter
    assert lens == [0.5, -0.5]


# -- failing reward functions ------------------------------------------------------------------------
def test_a_function_failing_on_every_sample_stops_after_max_failed_steps():
    comp = RewardComposer([Reward(fn="tests.openr1_style_rewards.always_raises"), _column_reward("a")], max_failed_steps=2)
    out = comp(["p"] * 2, ["x", "y"], {"a": [1.0, 1.0]})  # first step: warned, scored None
    assert out.errors["always_raises"] == 2 and out.total.tolist() == [1.0, 1.0]
    with pytest.raises(UserError) as err:
        comp(["p"] * 2, ["x", "y"], {"a": [1.0, 1.0]})
    msg = str(err.value)
    assert "\n" not in msg and "always_raises" in msg and "KeyError" in msg and "2 step(s)" in msg


@pytest.mark.parametrize("fn,why", [("returns_nan", "returned NaN"), ("returns_text", "non-number 'yes'")])
def test_nan_or_non_numbers_are_failures_reported_the_same_way(fn, why):
    comp = RewardComposer([Reward(fn=f"tests.openr1_style_rewards.{fn}")], max_failed_steps=1)
    with pytest.raises(UserError, match=why):
        comp(["p"] * 2, ["x", "y"])


def test_a_failure_streak_resets_when_the_function_scores_again():
    comp = RewardComposer([Reward(fn="tests.trl_style_reward.flaky_reward")], max_failed_steps=2)
    comp(["p"], ["boom"])
    comp(["p"], ["fine"])  # scores: the streak restarts
    comp(["p"], ["boom"])
    with pytest.raises(UserError, match="RuntimeError: boom in completion"):
        comp(["p"], ["boom"])


# -- GSPO ----------------------------------------------------------------------------------------------
def test_gspo_sequence_ratio_values_and_gradients_by_hand():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.2, 0.4], [0.5, 0.3, -9.0]], requires_grad=True)  # row 1: last token masked
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(logp, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="sequence")
    loss.backward()
    s0, s1 = math.exp(0.1), math.exp(0.4)  # exp(mean token log-ratio): 0.3 / 3 and 0.8 / 2
    # Row 0: A > 0, s0 < 1.2 unclipped: -s0. Row 1: A < 0, -min(-s1, -1.2) = s1 (the unclipped side wins).
    assert loss.item() == pytest.approx((-s0 + s1) / 2, rel=1e-6)
    # d/dlogp_t of s = s / |tokens|; grpo aggregation averages over 2 sequences.
    want = torch.tensor([[-s0 / 3 / 2] * 3, [s1 / 2 / 2, s1 / 2 / 2, 0.0]])
    torch.testing.assert_close(logp.grad, want)
    assert metrics["clip_ratio/region_mean"].item() == 0.0


def test_gspo_clips_whole_sequences_at_the_paper_range():
    # GSPO's paper clips at 3e-4 / 4e-4: a sequence ratio of exp(5e-4) > 1 + 4e-4 with A > 0 is clipped.
    logp = torch.tensor([[5e-4, 5e-4], [1e-4, 3e-4]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, metrics = grpo_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, epsilon_low=3e-4,
                              epsilon_high=4e-4, importance_sampling_level="sequence")
    loss.backward()
    s1 = math.exp(2e-4)
    assert loss.item() == pytest.approx(-(1 + 4e-4 + s1) / 2, rel=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [-s1 / 2 / 2] * 2]))
    assert metrics["clip_ratio/high_mean"].item() == 0.5  # the two tokens of row 0 out of four


def test_token_and_sequence_levels_agree_when_the_policy_has_not_moved():
    torch.manual_seed(0)
    logp = torch.randn(3, 4)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    grads = []
    for level in ("token", "sequence"):
        x = logp.clone().requires_grad_(True)
        loss, _ = grpo_loss(x, logp, adv, mask, importance_sampling_level=level)
        loss.backward()
        grads.append(x.grad)
    # Ratio 1 everywhere: both are the length-normalised policy gradient -A / |o| / N per token.
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp, logp, adv, mask, importance_sampling_level="segment")


# -- datasets by name ---------------------------------------------------------------------------------
README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
  - split: test
    path: main/test.jsonl
- config_name: math
  data_files:
  - split: train
    path: math/train.jsonl
---
A dataset repository laid out as on the Hub.
"""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def dataset_repo(tmp_path):
    repo = tmp_path / "my-dataset"
    (repo / "README.md").parent.mkdir(parents=True)
    (repo / "README.md").write_text(README)
    _write_jsonl(repo / "main/train.jsonl", [{"question": "Tom has 3 apples and buys 1,231 more. How many?", "answer": "3 + 1231 = 1234\n#### 1,234"}])
    _write_jsonl(repo / "main/test.jsonl", [
        {"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"},
        {"question": "What is 10 minus 4?", "answer": "10 - 4 = 6\n#### 6"},
    ])
    _write_jsonl(repo / "math/train.jsonl", [
        {"problem": "Compute 1/2 + 0.", "solution": "Adding zero: $\\boxed{\\frac{1}{2}}$.", "level": "1"},
        {"problem": "Find x if 2x = 10.", "solution": "x = 10/2, so $x = \\boxed{5}$.", "level": "2"},
        {"problem": "No box here.", "solution": "The answer is 3.", "level": "3"},
    ])
    return repo


def _data(char_tokenizer, **kwargs):
    from r1lightning.data import PromptDataModule

    dm = PromptDataModule(batch_size=2, **kwargs)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    return dm


def test_local_dataset_repo_by_spec_with_config_split_columns_and_gsm8k_answers(dataset_repo, char_tokenizer):
    dm = _data(char_tokenizer, dataset={"path": str(dataset_repo), "name": "main", "split": "test"},
               prompt_column="question", answer_column="answer", answer_format="gsm8k")
    rows = dm.train_rows
    assert rows["prompt"] == ["What is 6 times 7?", "What is 10 minus 4?"]  # the test split of `main`
    assert rows["answer"] == ["42", "6"]
    train = _data(char_tokenizer, dataset={"path": str(dataset_repo), "name": "main"}, prompt_column="question",
                  answer_column="answer", answer_format="auto")
    assert train.train_rows["answer"] == ["1234"]  # default split train; thousands separator dropped
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["prompts"]) == ["What is 10 minus 4?", "What is 6 times 7?"]  # plain rows: strings


def test_boxed_answers_keep_the_solution_column_and_conversational_prompts(dataset_repo, char_tokenizer, caplog):
    dm = _data(char_tokenizer, dataset={"path": str(dataset_repo), "name": "math", "split": "train"},
               prompt_column="problem", answer_column="solution", answer_format="boxed", conversational=True,
               system_prompt="Think, then answer.")
    rows = dm.train_rows
    assert rows["answer"] == ["\\frac{1}{2}", "5", None]  # the third has no box: warned, gold None
    assert rows["solution"][1] == "x = 10/2, so $x = \\boxed{5}$."  # open-r1 reads `solution` unchanged
    assert rows["prompt"][0] == [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": "Compute 1/2 + 0."}]
    assert any("1 of 3 rows have no boxed answer" in r.getMessage() for r in caplog.records)
    batch = next(iter(dm._prompt_loader(rows, 3, shuffle=False)))
    assert batch["prompts"][1] == [{"role": "system", "content": "Think, then answer."}, {"role": "user", "content": "Find x if 2x = 10."}]
    # The system prompt appears once in what the policy sees.
    text = char_tokenizer.decode(rows[0]["prompt_ids"])
    assert text.count("Think, then answer.") == 1


def test_missing_dataset_config_or_column_is_one_line(dataset_repo, char_tokenizer, tmp_path):
    from r1lightning.data import DataError

    cases = [
        ({"dataset": {"path": str(tmp_path / "nowhere")}}, "nowhere"),
        ({"dataset": "no-such-org/no-such-dataset"}, "no-such-org/no-such-dataset"),
        ({"dataset": {"path": str(dataset_repo), "name": "nope"}}, "nope"),
        ({"dataset": {"path": str(dataset_repo), "name": "main"}, "prompt_column": "problem"}, "no column 'problem'"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(DataError) as err:
            _data(char_tokenizer, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_trace_data_by_spec_with_a_messages_column(tmp_path, char_tokenizer):
    from r1lightning.data import TraceDataModule

    repo = tmp_path / "chats"
    (repo / "data").mkdir(parents=True)
    convo = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>1+1=2</think><answer>2</answer>"}]
    _write_jsonl(repo / "data/train.jsonl", [{"conversation": convo, "id": 0}])
    dm = TraceDataModule(dataset={"path": str(repo)}, messages_column="conversation", batch_size=1)
    dm.connect(char_tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert char_tokenizer.decode(labels) == "<think>1+1=2</think><answer>2</answer><|end|>"


def test_extract_gold_formats():
    from r1lightning.data.hub import extract_gold

    assert extract_gold("so 3 * 4 = 12\n#### 12", "gsm8k") == "12"
    assert extract_gold("#### 1,000,000", "gsm8k") == "1000000"
    assert extract_gold("no marker", "gsm8k") is None
    assert extract_gold("first \\boxed{1} then \\boxed{\\sqrt{2}}", "boxed") == "\\sqrt{2}"
    assert extract_gold(" 7 ", "auto") == "7" and extract_gold(42, "auto") == "42"


# -- the CLI, conversational data, open-r1-style functions -----------------------------------------
def _openr1_config(tmp_path, tiny_moe_config, rewards, data_file, **model):
    return {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "limit_val_batches": 0, "enable_model_summary": False},
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": tiny_moe_config, "tokenizer": "char"}},
            "rewards": rewards, "sampling": {"num_samples": 4, "max_new_tokens": 8}, "micro_batch_size": 8,
            "loss": {"beta": 0.0, **model.pop("loss", {})}, "log_completions_every": 0, **model}},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {
            "train_files": str(data_file), "batch_size": 2, "prompt_column": "problem", "conversational": True,
            "system_prompt": "Reason in <think> tags, answer in <answer> tags."}},
    }


@pytest.fixture
def openr1_file(tmp_path):
    path = tmp_path / "openr1.jsonl"
    _write_jsonl(path, [{"problem": f"What is {a} + {b}?", "solution": f"${a + b}$"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])
    return path


def test_cli_fit_with_open_r1_style_rewards_on_a_conversational_dataset(openr1_file, tmp_path, tiny_moe_config, monkeypatch):
    from r1lightning import cli, grpo
    from tests import openr1_style_rewards as fns

    monkeypatch.chdir(tmp_path)
    seen = []
    real = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: seen.append((a[0].clone(), real(*a, **k))) or seen[-1][1])
    rewards = [{"fn": "r1lightning.rewards.openr1.accuracy_reward"}, {"fn": "r1lightning.rewards.openr1.format_reward"},
               {"fn": "r1lightning.rewards.openr1.tag_count_reward"}, {"fn": "tests.openr1_style_rewards.content_length_reward"},
               {"fn": "tests.openr1_style_rewards.solution_seen_reward"}, {"fn": "tests.openr1_style_rewards.recording_reward"}]
    cfg = tmp_path / "openr1.json"
    # With GSPO at the paper's clip range, two updates per rollout (the sequence ratios move off 1).
    gspo = {"loss": {"importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4}, "num_iterations": 2}
    conf = _openr1_config(tmp_path, tiny_moe_config, rewards, openr1_file, **gspo)
    conf["trainer"]["max_steps"] = 4
    cfg.write_text(json.dumps(conf))
    fns.CALLS.clear()
    cli.main(["fit", "-c", str(cfg)])
    assert len(seen) == 2  # max_steps 4 = two rollouts x num_iterations 2
    for rewards_, adv in seen:
        assert torch.isfinite(rewards_).all() and rewards_.std() > 0
        assert torch.isfinite(adv).all() and adv.abs().sum() > 0
    first = fns.CALLS[0]
    assert first["prompts"][0][0] == {"role": "system", "content": "Reason in <think> tags, answer in <answer> tags."}
    assert first["prompts"][0][1]["role"] == "user" and first["prompts"][0][1]["content"].startswith("What is")
    assert all(c[0]["role"] == "assistant" for c in first["completions"])
    assert first["kwargs"]["solution"][0].startswith("$") and "problem" not in first["kwargs"]


def test_cli_stops_with_one_line_when_a_reward_always_raises(openr1_file, tmp_path, tiny_moe_config, monkeypatch, capsys):
    from r1lightning import cli

    monkeypatch.chdir(tmp_path)
    rewards = [{"fn": "r1lightning.rewards.openr1.tag_count_reward"}, {"fn": "tests.openr1_style_rewards.always_raises"}]
    cfg = tmp_path / "raise.json"
    conf = _openr1_config(tmp_path, tiny_moe_config, rewards, openr1_file)
    conf["trainer"]["max_steps"] = 5
    cfg.write_text(json.dumps(conf))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "-c", str(cfg)])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("r1lightning: error")]
    assert len(err) == 1 and "always_raises" in err[0] and "KeyError" in err[0] and "2 step(s)" in err[0], err


def test_grpo_module_options(tiny_moe_config):
    from r1lightning.grpo import GRPOModule
    from r1lightning.options import GRPOLossOptions
    from r1lightning.policy import Policy

    policy = Policy(config=tiny_moe_config, tokenizer="char")
    with pytest.raises(UserError, match="loss.importance_sampling_level: 'segment' is not one of token, sequence"):
        GRPOModule(policy, rewards=[Reward("format")], loss=GRPOLossOptions(importance_sampling_level="segment"))
    module = GRPOModule(policy, rewards=[Reward("format")], loss=GRPOLossOptions(importance_sampling_level="sequence"),
                        max_reward_failures=5)
    assert module.rewards.max_failed_steps == 5 and module.loss.importance_sampling_level == "sequence"
    # hparams (hparams.yaml, checkpoints) hold the groups as plain mappings, which rebuild the module
    assert module.hparams.loss["importance_sampling_level"] == "sequence" and module.hparams.sampling["num_samples"] == 8
    again = GRPOModule(policy, rewards=[Reward("format")], **{k: module.hparams[k] for k in ("sampling", "loss")})
    assert again.loss == module.loss and again.sampling == module.sampling


# -- global normalisers: two gloo processes equal one ------------------------------------------------
def _normaliser_data():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (16,), generator=g).float()  # 4 groups of 4
    rewards[5] = nan  # an unscorable row
    logp = torch.randn(16, 5, generator=g) * 0.1
    old = logp + torch.randn(16, 5, generator=g) * 0.05
    lengths = torch.tensor([5, 1, 3, 2, 4, 5, 5, 1, 2, 3, 4, 5, 1, 1, 2, 5])  # rank 0's rows are shorter
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    return rewards, logp, old, mask


def _normaliser_step(rewards, logp, old, mask):
    """What GRPOModule does per process: batch-scale advantages with the global std, dapo by the global
    token count; returns the gradient (DDP-averaged when distributed) and the logged reward_std."""
    adv = group_advantages(rewards, 4, "batch", batch_std=global_nanstd(rewards))
    x = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, adv, mask, aggregation="dapo", num_tokens=global_count(mask), epsilon_high=0.28)
    loss.backward()
    return x.grad, adv, global_nanstd(rewards)


def _normaliser_worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rewards, logp, old, mask = _normaliser_data()
    rows = slice(rank * 8, (rank + 1) * 8)  # each process holds two whole groups
    grad, adv, std = _normaliser_step(rewards[rows], logp[rows], old[rows], mask[rows])
    # DDP: each process's rows only touch its own slice of a shared parameter; the average over processes
    # of the full-size gradients is what the optimizer sees.
    full = torch.zeros(16, 5)
    full[rows] = grad
    dist.all_reduce(full)
    full /= world
    advs = [torch.zeros(8) for _ in range(world)]
    dist.all_gather(advs, adv)
    if rank == 0:
        torch.save({"grad": full, "adv": torch.cat(advs), "std": std}, out)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_over_the_same_data(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.test_trl_compat", "normalisers", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = torch.load(out)
    grad, adv, std = _normaliser_step(*_normaliser_data())
    torch.testing.assert_close(ddp["adv"], adv)
    torch.testing.assert_close(ddp["grad"], grad)
    torch.testing.assert_close(ddp["std"], std)
    rewards = _normaliser_data()[0]
    assert std.item() == pytest.approx(rewards[~rewards.isnan()].std().item(), rel=1e-6)
    # The local normalisers would differ: rank 0 alone has fewer tokens and its own std.
    local = group_advantages(rewards[:8], 4, "batch")
    assert not torch.allclose(local, adv[:8])


if __name__ == "__main__":
    if sys.argv[1] == "normalisers":
        _normaliser_worker(sys.argv[2])
