"""The long-sum task (traces of 1,000+ tokens), the GPU recipe's model size, the fp32-master AdamW,
and a CPU smoke run of the recipe's SFT through the CLI."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from r1lightning.tasks import LongSumTask
from r1lightning.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_trace_writes_every_column_and_carry():
    task = LongSumTask(digits=3, min_terms=2, max_terms=2)
    assert task.width == 4
    row = task.row((457, 386))
    assert row == {
        "prompt": "Add: a=457 b=386",
        "answer": "843",
        "completion": "<think>"
        "a:0000+0457 0+7+0=07 0+5+0=05 0+4+0=04 0+0+0=00 =0457\n"
        "b:0457+0386 7+6+0=13 5+8+1=14 4+3+1=08 0+0+0=00 =0843\n"
        "</think><answer>843</answer>",
    }
    # A carry out of the top digit lands in the padding column: 999 + 999 = 1998.
    assert task.line("b", 999, 999) == "b:0999+0999 9+9+0=18 9+9+1=19 9+9+1=19 0+0+1=01 =1998\n"


def _check_row(task, row):
    terms = [int(t.split("=")[1]) for t in row["prompt"].removeprefix("Add: ").split(" ")]
    assert task.min_terms <= len(terms) <= task.max_terms
    assert all(10 ** (task.digits - 1) <= t < 10**task.digits for t in terms)
    assert row["answer"] == str(sum(terms))
    assert row["completion"].endswith(f"</think><answer>{sum(terms)}</answer>")
    lines = row["completion"].removeprefix("<think>").split("</think>")[0].splitlines()
    assert len(lines) == len(terms)
    total = 0
    for line, term in zip(lines, terms):
        # Every group is arithmetic that holds, and the carry chain is consistent.
        groups = re.findall(r"(\d)\+(\d)\+(\d)=(\d\d)", line)
        assert len(groups) == task.width
        carry = 0
        for s, x, c, t in groups:
            assert int(c) == carry and int(s) + int(x) + int(c) == int(t)
            carry = int(t) // 10
        assert line.endswith(f"={total + term:0{task.width}d}")
        total += term
    return terms


def test_answers_and_traces_are_correct(tmp_path):
    task = LongSumTask(num_train=60, num_test=20)
    paths = task.write(tmp_path)
    for split in ("train", "test"):
        for text in paths[split].read_text().splitlines():
            _check_row(task, json.loads(text))


def test_gpu_difficulty_traces_run_1000_to_1103_tokens():
    # The recipe's task (configs/gpu/*.yaml) through the embedded character tokenizer, EOS included.
    cfg = yaml.safe_load((ROOT / "configs/gpu/long_sft.yaml").read_text())
    task = LongSumTask(**{**cfg["data"]["init_args"]["task"]["init_args"], "num_train": 300, "num_test": 100})
    tok = build_char_tokenizer()
    splits = task.splits()
    rows = splits["train"] + splits["test"]
    lengths = [len(tok(r["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]) for r in rows]
    assert min(lengths) >= 1000 and max(lengths) <= task.max_completion_tokens() == 1103
    # 13..14 terms of 78 characters a line: both represented.
    assert {n // 78 for n in lengths} == {13, 14}
    assert 1040 < sum(lengths) / len(lengths) < 1090
    # The configs leave room for the longest trace and the longest prompt.
    grpo = yaml.safe_load((ROOT / "configs/gpu/long_grpo.yaml").read_text())["model"]["init_args"]
    assert grpo["sampling"]["max_new_tokens"] >= task.max_completion_tokens()
    assert cfg["model"]["init_args"]["val_max_new_tokens"] >= task.max_completion_tokens()
    grpo_cfg = yaml.safe_load((ROOT / "configs/gpu/long_grpo.yaml").read_text())
    bench = grpo_cfg["trainer"]["callbacks"][0]["init_args"]
    assert bench["sampling"]["max_new_tokens"] >= task.max_completion_tokens()
    # The same task everywhere: SFT data, GRPO prompts and the held-out benchmark.
    sft_task = cfg["data"]["init_args"]["task"]["init_args"]
    assert grpo_cfg["data"]["init_args"]["task"]["init_args"] == sft_task
    assert bench["benchmarks"][0]["init_args"]["task"]["init_args"] == sft_task
    # Training caps leave room for start-up, evaluations and export: SFT and the checkpoint pick (~2 min) in one
    # 10-minute device call, GRPO within the 10 minutes.
    sft_s, grpo_s = [sum(int(x) * m for x, m in zip(c["trainer"]["max_time"].split(":")[1:], (3600, 60, 1))) for c in (cfg, grpo_cfg)]
    assert sft_s <= 4 * 60 and grpo_s <= 8 * 60
    prompt = max(len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True, add_generation_prompt=True))
                 for r in rows)  # fmt: skip
    assert prompt + task.max_completion_tokens() <= cfg["data"]["init_args"]["max_length"]


def test_splits_are_disjoint_deterministic_and_stable():
    small = LongSumTask(seed=1, num_train=100, num_test=50).splits()
    big = LongSumTask(seed=1, num_train=400, num_test=50).splits()
    assert [r["prompt"] for r in small["test"]] == [r["prompt"] for r in big["test"]]
    assert not {r["prompt"] for r in big["train"]} & {r["prompt"] for r in big["test"]}
    assert LongSumTask(seed=1, num_train=100, num_test=50).splits() == small
    with pytest.raises(ValueError, match="max_terms"):
        LongSumTask(min_terms=5, max_terms=4)


def test_gpu_policy_has_over_100m_parameters():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = yaml.safe_load((ROOT / "configs/gpu/long_sft.yaml").read_text())
    model_cfg = dict(cfg["model"]["init_args"]["policy"]["init_args"]["config"])
    model_cfg["vocab_size"] = len(build_char_tokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_cfg.pop("model_type"), **model_cfg))
    total = sum(p.numel() for p in model.parameters())
    h, f, layers, experts = 768, 768, 8, 8
    attention = h * 12 * 64 * 2 + h * 4 * 64 * 2  # q, o and the grouped k, v
    expert = 3 * h * f
    assert total == pytest.approx(layers * (attention + experts * expert), rel=0.002)
    assert 125e6 < total < 127e6
    active = layers * (attention + 2 * expert)
    assert 40e6 < active < 42e6  # the FLOP estimates in the configs use 40.9 M


def test_master_weight_adamw_equals_adamw_in_fp32_and_keeps_small_bf16_steps():
    from r1lightning.optim import MasterWeightAdamW

    torch.manual_seed(0)
    w = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    opt_a = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = MasterWeightAdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    # bf16 weights of 1.0 (spacing 2^-7): plain AdamW steps of 1e-3 round away, the master copy adds up.
    p_plain = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    p_master = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    plain = torch.optim.AdamW([p_plain], lr=1e-3, weight_decay=0.0)
    master = MasterWeightAdamW([p_master], lr=1e-3, weight_decay=0.0)
    for _ in range(20):
        p_plain.grad = torch.ones(4, dtype=torch.bfloat16)
        p_master.grad = torch.ones(4, dtype=torch.bfloat16)
        plain.step()
        master.step()
    assert torch.all(p_plain == 1.0)
    assert torch.allclose(p_master.float(), torch.full((4,), 0.98), atol=2**-8)
    state = master.state_dict()["state"][0]
    assert state["master"].dtype == torch.float32 and state["step"] == 20


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_long_sft_smoke_through_the_cli(tmp_path, monkeypatch):
    """The GPU recipe's SFT on CPU, shrunk (a tiny model, 3-term sums, 10 steps), then the checkpoint pick
    over its saved steps: it validates them, exports one and reports what it evaluated."""
    from r1lightning.cli import main

    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 10, "max_time": None, "log_every_n_steps": 1},
        "model": {"init_args": {
            "policy": {"init_args": {"dtype": "float32", "config": {
                "model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 512,
                "tie_word_embeddings": True}}},
            "val_max_new_tokens": 8}},
        "data": {"init_args": {"task": {"init_args": {"digits": 2, "min_terms": 2, "max_terms": 3, "num_train": 40,
                                                       "num_test": 6}},
                               "batch_size": 4, "val_batch_size": 6, "max_val_samples": 6, "max_length": 320}},
    }))  # fmt: skip
    main(["fit", "-c", str(ROOT / "configs/gpu/long_sft.yaml"), "-c", str(overlay)])
    metrics = list((tmp_path / "runs/gpu/long_sft/logs").glob("version_*/metrics.csv"))
    assert len(metrics) == 1
    assert "train/loss" in metrics[0].read_text()
    assert (tmp_path / "runs/gpu/long_sft/model/config.json").exists()
    ckpts = tmp_path / "runs/gpu/long_sft/checkpoints"
    assert sorted(p.name for p in ckpts.glob("step=*.ckpt")) == ["step=10.ckpt", "step=5.ckpt"]
    pick = _pick_checkpoint_script()
    pick.main(["-c", str(ROOT / "configs/gpu/long_sft.yaml"), "-c", str(overlay), "--checkpoints", str(ckpts), "--low", "0",
               "--high", "1", "--max-val-samples", "6", "--export", str(tmp_path / "picked"), "--report", str(tmp_path / "pick.json")])  # fmt: skip
    report = json.loads((tmp_path / "pick.json").read_text())
    assert report["picked"]["step"] == 5 and list(report["evaluated"]) == ["5"] and 0.0 <= report["evaluated"]["5"] <= 1.0
    assert (tmp_path / "picked/config.json").exists()
    assert (tmp_path / "data/generated/longsum2x2-3-seed0-train40-test6/train.jsonl").exists()


def test_char_tokenizer_is_one_token_per_character_on_long_traces():
    from r1lightning.tokenizer import SPECIAL_TOKENS, char_vocabulary

    tok = build_char_tokenizer()
    vocab = {t: i for i, t in enumerate(char_vocabulary())}
    row = LongSumTask(num_train=3, num_test=1).splits()["train"][0]
    body = row["completion"].removeprefix("<think>").split("</think>")[0] + "\u00e9\u00e9"  # two unknown characters
    text = "<think>" + body + "</think><|end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    expected = [vocab["<think>"]] + [vocab.get(c, vocab["<|unk|>"]) for c in body] + [vocab["</think>"], vocab["<|end|>"]]
    assert ids == expected and len(ids) > 1000
    assert tok.decode(ids[:-4], skip_special_tokens=False) == "<think>" + body[:-2]
    assert set(SPECIAL_TOKENS) <= set(vocab)


def test_plot_of_a_long_reasoning_run(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_long_reasoning", ROOT / "scripts/plot_long_reasoning.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    sft, grpo = tmp_path / "sft.csv", tmp_path / "grpo.csv"
    sft.write_text("step,val/accuracy,train/loss\n49,0.1,\n59,,0.5\n99,0.35,\n")
    grpo.write_text("step,bench/longsum/greedy,train/reward,train/completions/mean_length\n0,0.33,,\n1,,0.2,1150\n"
                    "3,,0.3,1149\n4,0.41,,\n")
    out = plot.main(["--sft", str(sft), "--grpo", str(grpo), "-o", str(tmp_path / "p.png")])
    assert out.stat().st_size > 10_000


class _GoldSampler:
    """A sampler that 'generates' each prompt's gold completion (trace, answer, EOS), cut at max_new_tokens:
    what a perfectly trained policy would produce, through the same decode and reward as validation."""

    def __init__(self, tok, gold_by_prompt):
        self.tok, self.gold = tok, gold_by_prompt
        self.max_new = []

    def generate(self, model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id):
        from r1lightning.rollout.base import Rollout, completion_mask_from_ids

        self.max_new.append(params.max_new_tokens)
        C = params.max_new_tokens
        rows = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            text = self.tok.decode(ids[mask.bool()], skip_special_tokens=False)
            rows.append(self.tok(self.gold[text] + self.tok.eos_token, add_special_tokens=False)["input_ids"][:C])
        out = torch.full((len(rows), C), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        mask, truncated = completion_mask_from_ids(out, eos_token_id)
        return Rollout(prompt_ids, prompt_mask, out, mask, truncated)


def test_gold_traces_score_one_through_the_recipe_validation(tmp_path):
    """The recipe's held-out accuracy counts a perfect policy as 100 %: prompts as the SFT data builds them,
    the recipe's val_max_new_tokens (the longest trace, tags and EOS fit), decode, answer extraction and
    math-verify on five-digit sums. (A GPU run reported exactly 0.000 with train loss 0.07; this rules out
    the evaluation path: the model is simply not exact over ~1,100 tokens yet.)"""
    from r1lightning import Policy
    from r1lightning.data import TraceDataModule
    from r1lightning.sft import SFTModule

    cfg = yaml.safe_load((ROOT / "configs/gpu/long_sft.yaml").read_text())
    mcfg, dcfg = cfg["model"]["init_args"], cfg["data"]["init_args"]
    task = LongSumTask(**{**dcfg["task"]["init_args"], "num_train": 20, "num_test": 60})
    module = SFTModule(Policy(config={"model_type": "qwen3_moe"}, tokenizer="char"), val_max_new_tokens=mcfg["val_max_new_tokens"])
    tok = module.tokenizer
    data = TraceDataModule(task=task, data_dir=str(tmp_path), val_batch_size=25, max_length=dcfg["max_length"])
    data.prepare_data()
    data.connect(tok)
    data.setup("validate")
    gold = {tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True):
            r["completion"] for r in task.splits()["test"]}  # fmt: skip
    module.val_sampler = _GoldSampler(tok, gold)
    for batch in data.val_dataloader():  # ragged prompts (13-14 terms), left-padded
        module.validation_step(batch, 0)
    assert module.val_sampler.max_new == [1152] * 3
    assert module.val_accuracy.compute().item() == 1.0
    # A budget that cuts the longer traces before their answer scores them 0 (truncation is not hidden).
    module.val_accuracy.reset()
    module.hparams.val_max_new_tokens = 13 * 78 + 4 + 6  # 13 lines, the four tags, a six-digit answer
    for batch in data.val_dataloader():
        module.validation_step(batch, 0)
    n_short = sum(r["prompt"].count("=") == 13 for r in task.splits()["test"])  # 13 terms
    assert 0 < n_short < 60
    assert module.val_accuracy.compute().item() == pytest.approx(n_short / 60)


def test_static_engine_greedy_holds_over_recipe_length_with_ragged_prompts():
    """Greedy decoding through the recipe's engine (StaticCacheSampler, here eager on CPU) for the recipe's
    val_max_new_tokens after ragged left-padded prompts of the recipe's length equals the argmax of one
    teacher-forced forward over prompt + completion at every one of the ~1,150 positions (KV cache, kv
    buckets and positions stay right far past the 1,024 of the tokenizer's nominal model_max_length)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from r1lightning.rollout import StaticCacheSampler
    from r1lightning.rollout.base import SamplingParams

    C = yaml.safe_load((ROOT / "configs/gpu/long_sft.yaml").read_text())["model"]["init_args"]["val_max_new_tokens"]
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=111, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048,
                         tie_word_embeddings=True)  # fmt: skip
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharp logits: no argmax ties within float noise
    N, P = 3, 119
    ids = torch.randint(11, 111, (N, P))
    mask = torch.ones(N, P, dtype=torch.long)
    mask[1, :15] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 0
    # EOS outside the vocabulary: every row runs the whole budget.
    out = StaticCacheSampler(cuda_graphs=False, return_logprobs=False).generate(
        model, ids, mask, SamplingParams(C, temperature=0.0), 10**6, 0)
    assert out.completion_ids.shape == (N, C)
    for i in range(N):
        prompt = ids[i][mask[i].bool()]
        with torch.no_grad():
            logits = model(torch.cat([prompt, out.completion_ids[i]])[None]).logits[0]
        assert torch.equal(logits[len(prompt) - 1 : -1].argmax(-1), out.completion_ids[i])


def _pick_checkpoint_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pick_checkpoint", ROOT / "scripts/pick_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pick_checkpoint_bisects_the_jump_for_a_start_inside_the_band(tmp_path):
    pick = _pick_checkpoint_script()
    for step in (5, 10, 100, 50):
        (tmp_path / f"step={step}.ckpt").touch()
    (tmp_path / "last.ckpt").touch()
    assert [s for s, _ in pick.checkpoint_steps(tmp_path)] == [5, 10, 50, 100]
    # session 5's measured jump: 0 % to 360, 16 % at 365, 68 % at 370, 93.5 % at 380
    accuracy = {275: 0.0, 345: 0.0, 360: 0.0, 365: 0.16, 370: 0.68, 380: 0.935, 415: 0.98}
    steps = list(range(5, 565, 5))
    asked = []

    def accuracy_of(step):
        asked.append(step)
        below = [s for s in accuracy if s <= step]
        return accuracy[max(below)] if below else 0.0

    index, seen = pick.bisect_band(steps, accuracy_of, 0.15, 0.6)
    assert steps[index] in (365,) and seen[365] == 0.16
    assert len(asked) <= 8 and asked == list(seen)
    # a jump too sharp for the checkpoints: no start in the band, every evaluated step reported
    index, seen = pick.bisect_band([360, 370], lambda s: {360: 0.0, 370: 0.9}[s], 0.15, 0.6)
    assert index is None and seen == {360: 0.0, 370: 0.9}
