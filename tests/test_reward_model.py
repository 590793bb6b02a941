"""Reward models (R1 stage 4): the losses by hand, training on the synthetic preferences, the reward
against plain transformers, `scope`, routing by kind, per-kind metrics, and the reward under FSDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from r1lightning.data.preference import PreferenceDataModule, reward_text
from r1lightning.reward_model import RewardModelModule, RewardModelSpec, bradley_terry_loss, pointwise_bce_loss
from r1lightning.rewards import Reward, RewardComposer, get_reward
from r1lightning.rewards.monitor import kind_metrics, row_kl
from r1lightning.rewards.reward_model import RewardModelReward, answer_part
from r1lightning.tasks import InstructionTask, MixedTask
from r1lightning.tasks.general import follows, instruction_following

ROOT = Path(__file__).resolve().parents[1]
RM_CONFIG = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip


# -- losses ----------------------------------------------------------------------------------------
def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, -1, 0
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(want, rel=1e-6)
    margin = torch.tensor([0.5, 0.0, 2.0])  # d - m = 0.5, -1, -2
    want_m = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1)) + math.log(1 + math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(want_m, rel=1e-6)
    # gradient: d/dr_c = -(1 - sigmoid(d)) / B
    c = chosen.clone().requires_grad_()
    bradley_terry_loss(c, rejected).backward()
    d = torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(c.grad, -(1 - torch.sigmoid(d)) / 3)


def test_pointwise_bce_by_hand():
    scores, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    want = (math.log(2) + (2 + math.log(1 + math.exp(-2)))) / 2  # -log s(0), -log(1 - s(2))
    assert pointwise_bce_loss(scores, labels).item() == pytest.approx(want, rel=1e-6)


# -- the synthetic task ----------------------------------------------------------------------------
def test_instruction_pairs_follow_and_break_the_rule():
    task = InstructionTask(seed=0, num_train=300, num_test=50, num_test_prompts=20)
    splits = task.splits()
    train_prompts = {r["prompt"] for r in splits["train"]}
    assert not train_prompts & {r["prompt"] for r in splits["test"]}  # held-out instructions
    for row in splits["train"][:100]:
        strip = lambda s: s.removeprefix("<answer>").removesuffix("</answer>") or None  # noqa: E731
        assert follows(strip(row["chosen"]), row["digits"], row["parity"]) == 1.0
        assert follows(strip(row["rejected"]), row["digits"], row["parity"]) < 1.0
    assert follows("517", 3, "odd") == 1.0 and follows("5170", 3, "odd") == 0.0 and follows("51", 3, "odd") == 0.5
    out = instruction_following(["p"] * 3, ["<think>x</think><answer>517</answer>", "<answer>12</answer>", "<answer>9</answer>"],
                                digits=[3, 3, None], parity=["odd", None, None])  # fmt: skip
    assert out == [1.0, 0.0, None]


def test_mixed_task_tags_kinds_and_keeps_the_reasoning_test_split(tmp_path):
    from r1lightning.tasks import AdditionTask

    add = AdditionTask(digits=2, operands=2, seed=0, num_train=300, num_test=50)
    task = MixedTask(reasoning=add, general=InstructionTask(num_test_prompts=20), general_fraction=0.25)
    splits = task.splits()
    kinds = [r["kind"] for r in splits["train"]]
    assert kinds.count("general") == 100 and kinds.count("reasoning") == 300
    assert {r["kind"] for r in splits["test"]} == {"reasoning"} and len(splits["test"]) == 50
    held_out = {r["prompt"] for r in InstructionTask(num_test_prompts=20).prompt_rows("test")}
    assert not held_out & {r["prompt"] for r in splits["train"]}


def test_mixed_task_format_completions_teach_the_format_not_the_instruction():
    from r1lightning.tasks import AdditionTask
    from r1lightning.tasks.general import follows

    add = AdditionTask(digits=2, operands=2, seed=0, num_train=300, num_test=50)
    plain = MixedTask(reasoning=add, general=InstructionTask(num_test_prompts=20), general_fraction=0.25)
    task = MixedTask(reasoning=add, general=InstructionTask(num_test_prompts=20), general_fraction=0.25, general_completions="format")
    assert task.name == plain.name + "-format"
    rows, base = task.splits()["train"], plain.splits()["train"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in base]  # the same prompts, in the same order
    general = [r for r in rows if r["kind"] == "general"]
    assert len(general) == 100 and all(r["answer"] is None for r in general)
    numbers = []
    for r in general:
        head, number = r["completion"].removesuffix("</answer>").split("<answer>")
        assert head == "<think>\n</think>" and number.isdigit() and number[0] != "0"
        numbers.append(number)
    # a random number of 1-5 digits: the instruction is followed about as often as chance allows
    assert {len(n) for n in numbers} == {1, 2, 3, 4, 5}
    followed = sum(follows(n, r["digits"], r["parity"]) for n, r in zip(numbers, general)) / len(general)
    assert 0.15 < followed < 0.6
    with pytest.raises(ValueError, match="general_completions"):
        MixedTask(reasoning=add, general_completions="chosen")


# -- preference data ------------------------------------------------------------------------------
def test_preference_data_plain_conversational_pointwise(tmp_path):
    import datasets

    from r1lightning.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Say 1.", "chosen": "<answer>1</answer>", "rejected": "<answer>22</answer>", "margin": 0.5}) + "\n")
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "Say 1."}], "chosen": [{"role": "assistant", "content": "<answer>1</answer>"}],
                                "rejected": [{"role": "assistant", "content": "<answer>22</answer>"}], "margin": 0.5}) + "\n")  # fmt: skip
    datasets.Dataset.from_list([{"prompt": "Say 1.", "completion": "<answer>1</answer>", "label": True},
                                {"prompt": "Say 1.", "completion": "<answer>3</answer>", "label": False}]).to_parquet(str(tmp_path / "points.parquet"))
    datasets.Dataset.from_list([{"prompt": "Say 1.", "chosen": "<answer>1</answer>", "rejected": "<answer>22</answer>"}]).save_to_disk(str(tmp_path / "saved"))
    batches = {}
    for name, files in (("plain", plain), ("conv", conv), ("points", tmp_path / "points.parquet"), ("saved", tmp_path / "saved")):
        data = PreferenceDataModule(train_files=str(files), batch_size=2)
        data.connect(tok)
        data.setup("fit")
        batches[name] = data._loader(data.train_rows, 2, shuffle=False).collate_fn(data.train_rows)
    torch.testing.assert_close(batches["plain"], batches["conv"])  # the chat template renders both alike
    want = tok(reward_text(tok, "Say 1.", "<answer>22</answer>"), add_special_tokens=False)["input_ids"]
    assert batches["plain"]["input_ids"].shape[0] == 2 and batches["plain"]["margin"].tolist() == [0.5]
    assert batches["plain"]["input_ids"][1, : len(want)].tolist() == want  # row B + i: rejected of pair i
    assert batches["points"]["labels"].tolist() == [1.0, 0.0] and "margin" not in batches["saved"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    data = PreferenceDataModule(train_files=str(bad), format="pairs")
    data.connect(tok)
    with pytest.raises(Exception, match=r"bad.jsonl:1: missing field 'rejected'"):
        data.setup("fit")


# -- training --------------------------------------------------------------------------------------
def fit_reward_model(tmp_path, max_steps=300, task=None):
    L.seed_everything(0)
    task = task or InstructionTask(seed=0, num_train=4000, num_test=400, num_test_prompts=32)
    module = RewardModelModule(
        RewardModelSpec(config=RM_CONFIG, tokenizer="char"), center_rewards_coefficient=0.01,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95)), warmup_steps=20, export_dir=str(tmp_path / "rm"),
    )  # fmt: skip
    data = PreferenceDataModule(task=task, data_dir=str(tmp_path / "data"), batch_size=32, val_batch_size=200, max_length=128)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=max_steps, check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0)  # fmt: skip
    trainer.fit(module, data)
    return trainer, module, data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        trainer, module, data = fit_reward_model(tmp)
    finally:
        torch.set_num_threads(threads)
    return {"dir": tmp / "rm", "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "accuracy": float(trainer.callback_metrics["val/pair_accuracy"]), "data": data}  # fmt: skip


def test_reward_model_learns_the_held_out_preferences_in_two_minutes(trained):
    """300 steps of 32 pairs, one thread. The time bound is on this process's CPU seconds: on a shared
    machine the wall clock measures the neighbours (it equals the CPU time on a quiet core)."""
    print(f"held-out pair accuracy {trained['accuracy']:.3f}; {trained['cpu_seconds']:.0f} CPU s, {trained['seconds']:.0f} s wall")
    assert trained["accuracy"] >= 0.90
    assert trained["cpu_seconds"] < 120


def test_reward_matches_the_exported_model_in_plain_transformers(trained):
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    rows = trained["data"].task.splits()["test"][:16]
    prompts = [r["prompt"] for r in rows]
    completions = ["<think>n=3</think>" + r["chosen"] for r in rows] + ["<think>1+1=2</think>" + r["rejected"] for r in rows]
    reward = get_reward(str(trained["dir"]), scope="answer", batch_size=5, device="cpu")  # TRL's form: a model directory as the reward
    assert isinstance(reward, RewardModelReward)
    got = reward(prompts + prompts, completions)

    tok = PreTrainedTokenizerFast.from_pretrained(trained["dir"])  # AutoTokenizer would pick Qwen2Tokenizer from config.json
    model = AutoModelForSequenceClassification.from_pretrained(trained["dir"]).eval()
    want = []
    for p, c in zip(prompts + prompts, completions):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c.split("</think>")[-1]}], tokenize=False)
        with torch.no_grad():
            want.append(float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    # and the reward model prefers the answers that follow the instruction
    assert sum(a > b for a, b in zip(got[:16], got[16:])) >= 14

    sig = get_reward("reward_model", model=str(trained["dir"]), normalize="sigmoid", shift=1.0, scale=2.0, device="cpu")(prompts, completions[:16])
    torch.testing.assert_close(torch.tensor(sig), torch.sigmoid((torch.tensor(want[:16]) - 1.0) / 2.0), rtol=1e-4, atol=1e-5)


def test_scope_answer_reads_only_the_text_after_think(trained):
    reward_answer = RewardModelReward(str(trained["dir"]), scope="answer", device="cpu")
    reward_full = RewardModelReward(str(trained["dir"]), scope="full", device="cpu")
    prompt = ["Give me an odd 3-digit number."] * 2
    same_answer = ["<think>short</think><answer>517</answer>", "<think>a much longer line of reasoning 99</think><answer>517</answer>"]
    a, f = reward_answer(prompt, same_answer), reward_full(prompt, same_answer)
    assert a[0] == pytest.approx(a[1], abs=1e-6)  # the reasoning is not read
    assert abs(f[0] - f[1]) > 1e-4  # the whole response is
    tok = reward_answer.tokenizer
    assert reward_answer.texts(prompt[:1], same_answer[:1]) == [reward_text(tok, prompt[0], "<answer>517</answer>")]
    assert reward_full.texts(prompt[:1], same_answer[:1]) == [reward_text(tok, prompt[0], same_answer[0])]
    assert answer_part("no closing tag") == "" and answer_part("<think>a</think>b</think>c") == "c"
    strict = RewardModelReward(str(trained["dir"]), scope="answer", no_answer=-1.0, device="cpu")  # no summary: a fixed low reward
    assert strict(prompt, ["<think>never closed", same_answer[0]]) == [-1.0, pytest.approx(a[0], abs=1e-6)]
    msgs = [{"role": "assistant", "content": "<think>x</think><answer>1</answer>"}]
    assert answer_part(msgs) == [{"role": "assistant", "content": "<answer>1</answer>"}]


def test_a_qwen2_export_keeps_the_char_tokenizer(tmp_path):
    """transformers 5's AutoTokenizer picks Qwen2Tokenizer from a qwen2 config.json, whose byte-level
    pre-tokenizer drops every space of the char vocabulary; `load_tokenizer` (the policy's and the
    reward's loader) reads the class the tokenizer was saved as."""
    from r1lightning.policy import Policy, export_pretrained

    model, tok = RewardModelSpec(config=RM_CONFIG, tokenizer="char").build()
    export_pretrained(model, tok, tmp_path / "m")
    text = "Give me a 3-digit number."
    assert Policy(name_or_path=str(tmp_path / "m")).build_tokenizer()(text)["input_ids"] == tok(text)["input_ids"]


# -- routing ---------------------------------------------------------------------------------------
def count_calls(prompts, completions, **columns):
    count_calls.seen.append(list(completions))
    return [float(len(c)) for c in completions]


count_calls.seen = []


def test_routing_gives_none_to_the_other_kind():
    count_calls.seen.clear()
    composer = RewardComposer([
        Reward("accuracy", kinds=["reasoning"]),
        Reward("tests.test_reward_model.count_calls", name="general_only", kinds=["general"]),
        Reward("tests.test_reward_model.count_calls", name="unrouted", weight=0.0),
    ])  # fmt: skip
    completions = ["<answer>5</answer>", "<answer>12345</answer>", "<answer>7</answer>", "abc"]
    columns = {"kind": ["reasoning", "general", "reasoning", None], "answer": ["5", None, "8", None]}
    out = composer(["p"] * 4, completions, columns)
    torch.testing.assert_close(out.per_fn["accuracy"], torch.tensor([1.0, float("nan"), 0.0, float("nan")]), equal_nan=True)
    torch.testing.assert_close(out.per_fn["general_only"], torch.tensor([float("nan"), 22.0, float("nan"), float("nan")]), equal_nan=True)
    torch.testing.assert_close(out.per_fn["unrouted"], torch.tensor([18.0, 22.0, 18.0, 3.0]))
    assert count_calls.seen[0] == ["<answer>12345</answer>"]  # called on its rows only
    assert out.total.tolist() == [1.0, 22.0, 0.0, 0.0]
    # rows with no kind match `null`; a missing column is an error, counted, not silent
    assert Reward("tests.test_reward_model.count_calls", kinds=[None])(["p"] * 2, ["a", "bb"], kind=["x", None]) == [None, 2.0]
    bad = RewardComposer([Reward("accuracy", kinds=["reasoning"])])(["p"], ["<answer>1</answer>"], {"answer": ["1"]})
    assert bad.errors == {"accuracy": 1}


def test_a_model_id_is_a_reward_model_and_loads_only_when_called():
    r = Reward("Skywork/Skywork-Reward-V2-Qwen3-0.6B", kinds=["general"])
    assert isinstance(r._callable, RewardModelReward) and r._callable.model is None and r.name == "Skywork-Reward-V2-Qwen3-0.6B"
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        RewardModelReward("./no/such/dir").load()


# -- metrics ---------------------------------------------------------------------------------------
def test_kind_metrics_by_hand():
    nan = float("nan")
    per_fn = {"rm": torch.tensor([nan, 1.0, 2.0, 3.0, nan]), "rule": torch.tensor([nan, 0.0, 0.5, 1.0, nan]),
              "accuracy": torch.tensor([1.0, nan, nan, nan, 0.0])}  # fmt: skip
    lengths = torch.tensor([10, 20, 30, 40, 50])
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    m = kind_metrics(["reasoning", "general", "general", "general", "reasoning"], per_fn, lengths, kl, {"rm"})
    assert m["kinds/general/fraction"] == pytest.approx(0.6) and m["kinds/general/completion_length"] == pytest.approx(30)
    assert m["kinds/reasoning/kl"] == pytest.approx(0.3) and m["kinds/general/kl"] == pytest.approx(0.3)
    assert m["kinds/general/rm/mean"] == pytest.approx(2.0) and m["kinds/general/rm/std"] == pytest.approx(1.0)
    assert m["kinds/general/rm/min"] == 1.0 and m["kinds/general/rm/max"] == 3.0
    assert m["kinds/reasoning/accuracy/mean"] == pytest.approx(0.5) and "kinds/reasoning/rm/mean" not in m
    assert m["corr/rm/rule"] == pytest.approx(1.0) and "corr/rm/accuracy" not in m  # never both on one row
    logp, ref = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, 5.0]])
    d = -0.5
    assert row_kl(logp, ref, torch.tensor([[1, 1, 0]])).item() == pytest.approx((math.exp(d) - d - 1) / 2)


def test_first_grpo_step_logs_the_per_kind_metrics(tmp_path):
    """Every step's CSV row holds the per-kind metrics, the first included (they were computed before the
    update and Lightning dropped keys first logged then: the first `train/kinds/*` row was step 1)."""
    import csv

    from r1lightning.cli import R1CLI
    from tests.test_strategies import TINY

    rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "kind": "reasoning"} for a, b in [(1, 2), (3, 4)]]
    rows += [{"prompt": f"Say {w}.", "answer": None, "kind": "general"} for w in ("yes", "no")]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "logs"}}},
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": TINY, "tokenizer": "char", "moe_backend": "eager"}},
            "rewards": [{"fn": "accuracy", "kinds": ["reasoning"]},
                        {"fn": "tests.test_reward_model.count_calls", "name": "length", "kinds": ["general"]}],
            "sampling": {"num_samples": 2, "max_new_tokens": 6}, "micro_batch_size": 64, "log_completions_every": 0}},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {"train_files": str(prompts), "batch_size": 4}},
    }  # fmt: skip
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(cfg))
    R1CLI(args=["fit", "-c", str(path)])
    logged = [r for r in csv.DictReader(open(next(tmp_path.glob("logs/version_*/metrics.csv")))) if r.get("train/reward")]
    assert [int(r["step"]) for r in logged] == [0, 1]
    for r in logged:  # the batch is every prompt: half of each kind, every general completion scored by length
        assert float(r["train/kinds/general/fraction"]) == pytest.approx(0.5)
        assert float(r["train/kinds/general/length/mean"]) == pytest.approx(float(r["train/kinds/general/completion_length"]), abs=7)


# -- under FSDP ------------------------------------------------------------------------------------
def test_reward_model_reward_runs_under_fsdp_with_two_processes(trained, tmp_path):
    """GRPO with the trained reward model (routed to general prompts) next to a rule reward on
    reasoning prompts, FSDP2 over 2 gloo processes: the policy is sharded, the reward model is not
    (each rank scores its own rows), and every rank's scores equal plain transformers' on its rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.test_reward_model",
           str(trained["dir"]), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(trained["dir"])  # AutoTokenizer would pick Qwen2Tokenizer from config.json
    model = AutoModelForSequenceClassification.from_pretrained(trained["dir"]).eval()
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rec["strategy"] == "FSDP2Strategy" and rec["policy_sharded"] and not rec["reward_model_sharded"]
        assert rec["calls"] >= 1 and rec["general_rows"] > 0 and rec["reasoning_rows"] > 0  # every rank scored its own general rows
        for p, c, score in rec["scored"]:
            text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": answer_part(c)}], tokenize=False)
            with torch.no_grad():
                want = float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
            assert score == pytest.approx(want, abs=1e-4)


class RecordingRM(RewardModelReward):
    """The reward model reward, recording what it scored (rows, scores) on this rank."""

    def __call__(self, prompts, completions, **kwargs):
        out = super().__call__(prompts, completions, **kwargs)
        self.scored = getattr(self, "scored", []) + [list(x) for x in zip(prompts, completions, out)]
        self.calls = getattr(self, "calls", 0) + 1
        return out


class FSDPRecorder(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self.rows = {"general": 0, "reasoning": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for k in batch["columns"]["kind"]:
            self.rows[k] += 1

    def on_train_end(self, trainer, pl_module):
        from r1lightning.strategies import is_sharded

        rm = next(r._callable for r in pl_module.rewards.rewards if isinstance(r._callable, RewardModelReward))
        Path(self.path.format(rank=trainer.global_rank)).write_text(json.dumps({
            "strategy": type(trainer.strategy).__name__, "policy_sharded": is_sharded(pl_module.model),
            "reward_model_sharded": is_sharded(rm.model), "calls": rm.calls, "scored": rm.scored,
            "general_rows": self.rows["general"], "reasoning_rows": self.rows["reasoning"]}))  # fmt: skip


def _fsdp_run(rm_dir: str, workdir: str) -> None:
    from r1lightning.cli import R1CLI
    from tests.test_strategies import TINY

    import torch.distributed as dist

    dist.init_process_group("gloo")
    work = Path(workdir)
    prompts = work / "prompts.jsonl"
    if int(os.environ["RANK"]) == 0:
        rows = [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "kind": "reasoning", "digits": None, "parity": None} for a, b in [(1, 2), (3, 4), (2, 2), (4, 1)]]
        rows += [{"prompt": f"Give me a {n}-digit number.", "answer": None, "kind": "general", "digits": n, "parity": None} for n in (1, 2, 3, 4)]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dist.barrier()
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 2, "max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "precision": "32-true", "enable_checkpointing": False,
                    "callbacks": [{"class_path": "tests.test_reward_model.FSDPRecorder", "init_args": {"path": str(work / "rank{rank}.json")}}]},
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": TINY, "tokenizer": "char", "moe_backend": "eager"}},
            "rewards": [{"fn": "accuracy", "kinds": ["reasoning"]},
                        {"fn": "tests.test_reward_model.RecordingRM", "name": "rm", "kinds": ["general"], "kwargs": {"model": rm_dir, "batch_size": 3, "device": "cpu"}}],
            "sampling": {"num_samples": 2, "max_new_tokens": 8}, "micro_batch_size": 64, "loss": {"beta": 0.04}, "log_completions_every": 0}},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {"train_files": str(prompts), "batch_size": 2}},
    }  # fmt: skip
    path = work / "grpo-fsdp.json"
    path.write_text(json.dumps(cfg))
    R1CLI(args=["fit", "-c", str(path), "-c", str(ROOT / "configs/strategy/fsdp.yaml"), "--trainer.accelerator", "cpu",
                "--trainer.devices", "2", "--trainer.precision", "32-true"])  # fmt: skip


if __name__ == "__main__":
    _fsdp_run(sys.argv[1], sys.argv[2])


# -- held-out evaluation ---------------------------------------------------------------------------
def test_heldout_eval_samples_seeded_and_averages_per_prompt(tmp_path):
    """R1's protocol (k samples at T 0.6): the same seed gives the same score at every evaluation and the
    training RNG is left alone; each prompt's k samples are averaged first, the standard error is over prompts."""
    from callbacks.reward_eval import HeldoutRewardEval
    from r1lightning.grpo import GRPOModule
    from r1lightning.policy import Policy
    from tests.test_strategies import TINY

    torch.manual_seed(0)
    module = GRPOModule(policy=Policy(config=TINY, tokenizer="char", moe_backend="eager"),
                        rewards=[Reward(fn="tests.test_reward_model.count_calls", name="length", kinds=["general"])])  # fmt: skip
    module.configure_model()
    rows = [{"prompt": p, "kind": "general"} for p in ("Say yes.", "Give me a number.", "Hi")] + [{"prompt": "1+1?", "kind": "reasoning"}]
    files = tmp_path / "held_out.jsonl"
    files.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cb = HeldoutRewardEval(prompt_files=str(files), max_new_tokens=8, num_samples=4, temperature=0.6, top_p=0.95, seed=3)
    count_calls.seen = []
    state = torch.random.get_rng_state()
    first = cb.evaluate(module)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = cb.evaluate(module)
    assert first == second
    (completions,) = count_calls.seen[:1]
    assert len(completions) == 3 * 4  # the general rows' samples only
    per_prompt = torch.tensor([float(len(c)) for c in completions]).view(3, 4).mean(-1)
    assert first["val/general/length"] == pytest.approx(float(per_prompt.mean()))
    assert first["val/general/length/sem"] == pytest.approx(float(per_prompt.std() / math.sqrt(3)))
    with pytest.raises(ValueError, match="num_samples"):
        HeldoutRewardEval(prompt_files=str(files), num_samples=4)  # k greedy samples would be k copies
