"""The pipeline's final model, the dense student of `configs/quickstart/distill.yaml` (a Llama with the
character tokenizer, at a tenth of the size), round-trips: plain `AutoTokenizer` +
`AutoModelForCausalLM` give the module's token ids and greedy answers, and `r1lightning validate` on
the export reproduces the accuracy the run reported."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1lightning.cli import main as cli
from r1lightning.data import TraceDataModule
from r1lightning.policy import Policy, export_pretrained
from r1lightning.sft import SFTModule
from r1lightning.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def student_config(**shrink) -> dict:
    """The quickstart student's config (model type, tied embeddings, ...) with smaller sizes."""
    recipe = yaml.safe_load((ROOT / "configs/quickstart/distill.yaml").read_text())
    config = dict(recipe["model"]["init_args"]["policy"]["init_args"]["config"])
    config.update(shrink)
    return config


STUDENT = student_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128)
PAIRS = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a * 7 + b) % 3 == 0]  # 27 problems
STEPS = 60
QUESTION = "What is 4 + 5?"  # spaces: what a Qwen2Tokenizer reload used to drop


def test_quickstart_student_is_the_model_type_that_round_trips():
    assert STUDENT["model_type"] == "llama" and STUDENT["tie_word_embeddings"]


def write_problems(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b),
                                        "completion": f"<think>{a}+{b}={a + b}</think><answer>{a + b}</answer>"}) + "\n"
                            for a, b in PAIRS))
    return path


def test_dense_student_export_round_trips_in_plain_transformers(tmp_path):
    # Trained and evaluated on the same 27 problems: a student that answers most of them in a
    # minute of CPU, so the comparisons below are about real answers, not noise.
    problems = write_problems(tmp_path / "problems.jsonl")
    L.seed_everything(0)
    export = tmp_path / "model"
    module = SFTModule(Policy(config=STUDENT, tokenizer="char"), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                       warmup_steps=5, val_max_new_tokens=16, export_dir=str(export))
    data = TraceDataModule(train_files=str(problems), val_files=str(problems), batch_size=27, val_batch_size=27, max_length=64)
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, val_check_interval=STEPS, check_val_every_n_epoch=None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    reported = float(trainer.callback_metrics["val/accuracy"])
    assert reported >= 0.2  # 26 % here (7 of 27): real answers, right and wrong

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    text = module.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    want_ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == want_ids
    assert len(want_ids) == len(QUESTION) + 3  # one token per character, spaces kept, + 3 tags

    ids = torch.tensor([want_ids])
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        ours = module.model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert torch.equal(theirs, ours)
    answer = tokenizer.decode(theirs[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer.startswith("<think>"), answer

    # `r1lightning validate` on the export, as a user runs it on the pipeline's final model.
    config = {
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "val"}}]},
        "model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"name_or_path": str(export)}}, "val_max_new_tokens": 16}},
        "data": {"class_path": "r1lightning.data.TraceDataModule", "init_args": {
            "train_files": str(problems), "val_files": str(problems), "val_batch_size": 27, "max_length": 64}},
    }
    (tmp_path / "validate.yaml").write_text(json.dumps(config))
    cli(["validate", "-c", str(tmp_path / "validate.yaml")])
    with open(next((tmp_path / "val").glob("version_*/metrics.csv"))) as f:
        validated = float(next(row for row in csv.DictReader(f) if row.get("val/accuracy"))["val/accuracy"])
    assert abs(validated - reported) <= 0.01, (validated, reported)


def test_qwen2_export_is_flagged_and_the_project_still_loads_the_saved_tokenizer(tmp_path, caplog):
    """transformers substitutes Qwen2Tokenizer for any qwen2 checkpoint; export says so, and the
    project's loader (used by `r1lightning validate` and the pipeline) keeps the declared class."""
    policy = Policy(config={**STUDENT, "model_type": "qwen2"}, tokenizer="char")
    model, tokenizer = policy.build()
    with caplog.at_level(logging.WARNING, logger="r1lightning.policy"):
        export_pretrained(model, tokenizer, tmp_path / "qwen2")
    auto = AutoTokenizer.from_pretrained(tmp_path / "qwen2")
    ids = tokenizer(QUESTION)["input_ids"]
    warned = [r.getMessage() for r in caplog.records if r.name == "r1lightning.policy"]
    if auto(QUESTION)["input_ids"] != ids:
        assert len(warned) == 1 and f"loads this tokenizer as {type(auto).__name__}" in warned[0]
    else:  # a transformers release that honours tokenizer_config.json
        assert not warned
    assert load_tokenizer(tmp_path / "qwen2")(QUESTION)["input_ids"] == ids
