"""`r1lightning export`: a Lightning checkpoint becomes a `save_pretrained` directory that plain
transformers loads with identical logits. (Sharded FSDP checkpoint directories: tests/test_strategies.py.)"""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from r1lightning.checkpointing import AtomicCheckpointIO
from r1lightning.cli import main as cli
from r1lightning.data import PromptDataModule, TraceDataModule
from r1lightning.export import META_KEY
from r1lightning.grpo import GRPOModule
from r1lightning.options import SamplingOptions
from r1lightning.policy import Policy
from r1lightning.rewards import Reward
from r1lightning.sft import SFTModule
from tests.test_strategies import TINY, write_data

TEXT = "<|user|>What is 3+4?<|end|><|assistant|><think>3+4=7</think><answer>7</answer><|end|>"


def train(kind: str, tmp_path, steps: int = 2):
    traces, prompts = write_data(tmp_path)
    L.seed_everything(0)
    policy = Policy(config=TINY, tokenizer="char", moe_backend="eager")
    if kind == "sft":
        module, data = SFTModule(policy, lr_schedule="constant"), TraceDataModule(train_files=str(traces), batch_size=4)
    else:
        module = GRPOModule(policy, rewards=[Reward("tests.test_strategies.toy_reward")], sampling=SamplingOptions(num_samples=4, max_new_tokens=4),
                            lr_schedule="constant", log_completions_every=0)
        data = PromptDataModule(train_files=str(prompts), batch_size=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[ckpt])
    trainer.fit(module, data)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # ExactResume put it in
    return module, tmp_path / "ckpt" / "last.ckpt"


def logits(model, tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_export_reloads_in_transformers_with_identical_logits(kind, tmp_path, caplog):
    module, ckpt = train(kind, tmp_path)
    out = tmp_path / "exported"
    with caplog.at_level(logging.WARNING, logger="r1lightning.export"):
        cli(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert not [r for r in caplog.records if r.name == "r1lightning.export"]  # loaded with weights_only=True

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == module.tokenizer(TEXT)["input_ids"]
    assert tokenizer.chat_template == module.tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied

    want = logits(module.model, module.tokenizer)
    # Same weights, same kernels: bit-identical. The module ran its experts with the `eager` backend
    # (`moe_backend="eager"`, a loop over experts); reloaded with that implementation the float32
    # operations are the same ones in the same order.
    same_kernels = AutoModelForCausalLM.from_pretrained(out, experts_implementation=module.model.config._experts_implementation)
    assert torch.equal(logits(same_kernels, tokenizer), want)
    # A plain reload runs transformers' default experts kernel (`grouped_mm`): the same sums in another
    # order, so float32 rounding may differ (it does with some transformers releases and CPUs). Logits
    # here are O(1-10) after a 32-wide hidden state and 2 layers; 1e-5 is ~100 float32 ulps at that size,
    # far below any change a wrong weight would make (test below: policy vs reference differ by >1e-3).
    torch.testing.assert_close(logits(model, tokenizer), want, rtol=1e-5, atol=1e-5)
    if kind == "grpo":  # the policy was exported, not the frozen reference
        assert (logits(module.ref_model, module.tokenizer) - want).abs().max() > 1e-3


def test_checkpoint_without_metadata_needs_the_run_config(tmp_path, capsys):
    module, ckpt = train("sft", tmp_path, steps=1)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state[META_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)

    with pytest.raises(SystemExit):
        cli(["export", "--ckpt", str(old), "--out", str(tmp_path / "a")])
    assert "pass the run's --config" in capsys.readouterr().err

    config = tmp_path / "config.yaml"  # what SaveConfigCallback writes, reduced to the policy
    config.write_text(json.dumps({"model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {
        "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": TINY, "tokenizer": "char"}}}}}))
    out = tmp_path / "b"
    cli(["export", "--ckpt", str(old), "--config", str(config), "--out", str(out), "--dtype", "bfloat16"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    for name, p in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p.to(torch.bfloat16)), name


def test_export_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    with pytest.raises(SystemExit):
        cli(["export", "--ckpt", str(tmp_path / "plain"), "--out", str(tmp_path / "x")])
    assert "not a sharded Lightning checkpoint" in capsys.readouterr().err
