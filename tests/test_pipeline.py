"""The pipeline command: composing stage configs, a tiny end-to-end run, skipping, custom callbacks."""

import json
import re
from pathlib import Path

import pytest
import yaml

from r1lightning import pipeline as pl
from tests.conftest import TINY_MOE

ROOT = Path(__file__).resolve().parents[1]


def _readme_example(name: str):
    """The README's custom stage callback, executed from the README itself so the two cannot drift."""
    block = re.search(r"```python\n# my_project/callbacks.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    namespace = {"__name__": __name__}  # importable as tests.test_pipeline.<name> from YAML
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace[name]


StageMarker = _readme_example("StageMarker")


# --------------------------------------------------------------------------- composition rules


def test_merge_replaces_entries_of_another_class_and_lists():
    base = {"model": {"class_path": "a.SFT", "init_args": {"lr": 1, "x": 2}}, "trainer": {"callbacks": [1, 2], "max_steps": 5}}
    over = {"model": {"class_path": "a.SFT", "init_args": {"lr": 3}}, "trainer": {"callbacks": [9]}}
    assert pl.merge(base, over) == {"model": {"class_path": "a.SFT", "init_args": {"lr": 3, "x": 2}},
                                    "trainer": {"callbacks": [9], "max_steps": 5}}  # fmt: skip
    other = {"model": {"class_path": "a.GRPO", "init_args": {"beta": 0.1}}}
    assert pl.merge(base, other)["model"] == {"class_path": "a.GRPO", "init_args": {"beta": 0.1}}


def test_set_dotted_indexes_lists():
    cfg = {"trainer": {"callbacks": [{"init_args": {"a": 1}}, {"init_args": {"a": 2}}]}}
    pl.set_dotted(cfg, "trainer.callbacks.-1.init_args.a", 7)
    pl.set_dotted(cfg, "model.init_args.lr", 0.5)
    assert cfg == {"trainer": {"callbacks": [{"init_args": {"a": 1}}, {"init_args": {"a": 7}}]}, "model": {"init_args": {"lr": 0.5}}}
    with pytest.raises(pl.PipelineError, match="not an index"):
        pl.set_dotted(cfg, "trainer.callbacks.5.x", 1)


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return str(path)


def test_compose_links_stages_and_moves_paths_under_the_stage(tmp_path):
    recipe = {
        "trainer": {"default_root_dir": "runs/q/sft", "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs/q/sft", "name": "logs"}}],
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "runs/q/sft/ckpt"}}]},
        "model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {"policy": {"class_path": "r1lightning.Policy",
                  "init_args": {"config": {"model_type": "qwen2"}, "tokenizer": "char"}}, "export_dir": "runs/q/sft/model"}},
        "data": {"class_path": "r1lightning.data.TraceDataModule", "init_args": {"train_files": "x.jsonl"}},
    }  # fmt: skip
    cfg = _write(tmp_path / "sft.yaml", recipe)
    spec = {"run_dir": str(tmp_path / "run"), "overrides": {"trainer.max_steps": 3}, "stages": [
        {"name": "a", "config": cfg},
        {"name": "b", "config": cfg, "data_from": "a", "extra_train_files": ["gold.jsonl"], "overrides": {"trainer.max_steps": 4},
         "callbacks": [{"class_path": "tests.test_pipeline.StageMarker", "init_args": {"path": "${stage_dir}/m.json", "note": "${a.model}"}}]},
    ]}  # fmt: skip
    pipe = pl.load_pipeline(_write(tmp_path / "p.yaml", spec))
    run = tmp_path / "run"
    a = pl.stage_config(pipe, pipe.stages[0], 0, {})
    assert a["trainer"]["default_root_dir"] == str(run / "a") and a["trainer"]["max_steps"] == 3
    assert a["trainer"]["logger"][0]["init_args"]["save_dir"] == str(run / "a")
    assert a["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(run / "a" / "ckpt")
    assert a["model"]["init_args"]["export_dir"] == str(run / "a" / "model")
    assert a["model"]["init_args"]["policy"]["init_args"] == {"config": {"model_type": "qwen2"}, "tokenizer": "char"}
    done = {"a": {"model": str(run / "a" / "model"), "datasets": [str(run / "a" / "traces.jsonl")]}}
    b = pl.stage_config(pipe, pipe.stages[1], 1, done)
    assert b["trainer"]["max_steps"] == 4
    assert b["model"]["init_args"]["policy"]["init_args"] == {"name_or_path": str(run / "a" / "model")}
    assert b["data"]["init_args"]["train_files"] == [str(run / "a" / "traces.jsonl"), "gold.jsonl"]
    assert b["trainer"]["callbacks"][1]["init_args"] == {"path": str(run / "b" / "m.json"), "note": str(run / "a" / "model")}


def test_compose_is_a_function_of_dicts():
    """compose.compose reads no file: the same dicts give the same config, and its inputs are not changed."""
    from r1lightning.pipeline.compose import compose

    recipe = {"trainer": {"default_root_dir": "runs/x", "callbacks": [{"class_path": "a.B", "init_args": {"dir": "runs/x/ck"}}]},
              "model": {"class_path": "m.M", "init_args": {"policy": {"class_path": "p.P", "init_args": {"config": {}, "tokenizer": "char"}}}}}
    frozen = json.dumps(recipe, sort_keys=True)
    kw = dict(name="s", overrides=[("trainer.max_steps", 3)], model="/m", train_files=["a.jsonl"], placeholders={"stage_dir": "/r/s"})
    out = compose([recipe], Path("/r/s"), **kw)
    assert out == compose([recipe], Path("/r/s"), **kw) and json.dumps(recipe, sort_keys=True) == frozen
    assert out["trainer"]["callbacks"][0]["init_args"]["dir"] == "/r/s/ck" and out["trainer"]["max_steps"] == 3
    assert out["model"]["init_args"]["policy"]["init_args"] == {"name_or_path": "/m"}
    assert out["data"]["init_args"]["train_files"] == ["a.jsonl"]
    assert out["trainer"]["callbacks"][-1]["class_path"] == "r1lightning.callbacks.StageReport"


def test_the_datasets_a_stage_produces_are_what_its_callbacks_declare():
    """No class-name match: any callback with `stage_outputs` (RejectionSampling, a subclass, your own) declares them."""
    config = {"trainer": {"callbacks": [
        {"class_path": "r1lightning.callbacks.RejectionSampling", "init_args": {"output": "a.jsonl"}},
        {"class_path": "r1lightning.callbacks.RejectionSampling", "init_args": {"output": "b.jsonl", "when": "never", "every_n_steps": 5}},
        {"class_path": "r1lightning.callbacks.RejectionSampling", "init_args": {"output": "c.parquet", "when": "validate_end"}},
        {"class_path": "tests.test_pipeline.StageMarker", "init_args": {"path": "m.json"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}}]}}  # fmt: skip
    assert pl.produced_datasets(config) == ["a.jsonl", "c.parquet"]


def test_pipeline_file_errors_are_one_line(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"trainer": {}})
    with pytest.raises(pl.PipelineError, match="not an earlier stage"):
        pl.load_pipeline(_write(tmp_path / "p.yaml", {"stages": [{"name": "a", "config": cfg, "data_from": "b"}]}))
    with pytest.raises(pl.PipelineError, match="config file not found"):
        pl.load_pipeline(_write(tmp_path / "p.yaml", {"stages": [{"name": "a", "config": "nope.yaml"}]}))
    with pytest.raises(pl.PipelineError, match="unknown key"):
        pl.load_pipeline(_write(tmp_path / "p.yaml", {"stages": [{"name": "a", "config": cfg, "modle_from": None}]}))


PIPELINES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "stages" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pipeline_file_composes_and_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert pl.main(["-c", str(path), "--run-dir", str(tmp_path), "--dry-run"]) == 0
    stages = yaml.safe_load(path.read_text())["stages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s["name"] for s in stages)


def test_quickstart_pipeline_links_its_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    done = pl.run_pipeline(pl.load_pipeline(ROOT / "configs/quickstart/pipeline.yaml", str(tmp_path)), dry_run=True)
    assert list(done) == ["cold_start", "reasoning_rl", "rejection_sft", "reward_model", "grpo_all", "distill"]
    stage4 = yaml.safe_load((tmp_path / "grpo_all" / "config.dry-run.yaml").read_text())["model"]["init_args"]
    assert stage4["policy"]["init_args"]["name_or_path"] == str(tmp_path / "rejection_sft" / "model")
    assert stage4["rewards"][2]["kwargs"]["model"] == str(tmp_path / "reward_model" / "model")
    rsft = yaml.safe_load((tmp_path / "rejection_sft" / "config.dry-run.yaml").read_text())
    assert rsft["model"]["init_args"]["policy"]["init_args"]["name_or_path"] == str(tmp_path / "reasoning_rl" / "model")
    assert rsft["data"]["init_args"]["train_files"][0] == str(tmp_path / "reasoning_rl" / "traces.jsonl")
    distill = yaml.safe_load((tmp_path / "distill" / "config.dry-run.yaml").read_text())
    assert distill["model"]["init_args"]["policy"]["init_args"]["config"]["model_type"] == "llama"
    assert distill["data"]["init_args"]["train_files"] == [str(tmp_path / "grpo_all" / "teacher_traces.jsonl")]


# --------------------------------------------------------------------------- a tiny run


def tiny_configs(tmp_path):
    task = {"class_path": "r1lightning.tasks.AdditionTask", "init_args": {"digits": 2, "num_train": 24, "num_test": 8}}
    data = {"task": task, "data_dir": str(tmp_path / "data"), "batch_size": 4, "val_batch_size": 8, "max_length": 64}
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2, "check_val_every_n_epoch": None,
               "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
               "default_root_dir": "runs/tiny", "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                            "init_args": {"save_dir": "runs/tiny", "name": "logs"}}]}  # fmt: skip
    policy = {"class_path": "r1lightning.Policy", "init_args": {"config": dict(TINY_MOE), "tokenizer": "char"}}
    sft = {"seed_everything": 0, "trainer": trainer,
           "model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {"policy": policy, "val_max_new_tokens": 8}},
           "data": {"class_path": "r1lightning.data.TraceDataModule", "init_args": data}}  # fmt: skip
    grpo = {"seed_everything": 0, "trainer": trainer,
            "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
                "policy": {"class_path": "r1lightning.Policy", "init_args": {"name_or_path": "unused"}},
                "rewards": [{"fn": "accuracy"}, {"fn": "format", "weight": 0.1}],
                "sampling": {"num_samples": 2, "max_new_tokens": 8}, "val_max_new_tokens": 8, "log_completions_every": 0}},
            "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": data}}  # fmt: skip
    dense = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    student = {**sft, "model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {
        "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": dense, "tokenizer": "char"}}, "val_max_new_tokens": 8}}}
    return _write(tmp_path / "sft.yaml", sft), _write(tmp_path / "grpo.yaml", grpo), _write(tmp_path / "student.yaml", student)


# An untrained model passes nothing, so the smoke test keeps every (deduplicated) sample.
KEEP_ALL = {"filters": {"require_correct": False, "require_format": False, "drop_truncated": False},
            "sampling": {"num_samples": 2, "max_new_tokens": 8}, "batch_size": 8, "max_prompts": 6}  # fmt: skip


def tiny_pipeline(tmp_path, launcher="inprocess"):
    sft, grpo, student = tiny_configs(tmp_path)
    rs = {"class_path": "r1lightning.callbacks.RejectionSampling", "init_args": {"output": "${stage_dir}/traces.jsonl", **KEEP_ALL}}
    marker = {"class_path": "tests.test_pipeline.StageMarker", "init_args": {"path": "${stage_dir}/marker.json", "note": "${cold_start.model}"}}
    spec = {"run_dir": str(tmp_path / "run"), "launcher": launcher, "stages": [
        {"name": "cold_start", "config": sft},
        {"name": "reasoning_rl", "config": grpo, "callbacks": [rs, marker]},
        {"name": "rejection_sft", "config": sft, "data_from": "reasoning_rl"},
        {"name": "grpo_all", "config": grpo, "callbacks": [rs]},
        {"name": "distill", "config": student, "model_from": None, "data_from": "grpo_all", "compare_to": "grpo_all"},
    ]}  # fmt: skip
    return _write(tmp_path / "pipeline.yaml", spec)


def test_stage4_ablation_shares_the_pipelines_first_stages():
    """configs/quickstart/ablation_no_general.yaml repeats stages 1-4 of the quickstart pipeline (the file format
    has no include): run in the same directory they are skipped only while they stay identical."""
    main = yaml.safe_load((ROOT / "configs/quickstart/pipeline.yaml").read_text())
    ablation = yaml.safe_load((ROOT / "configs/quickstart/ablation_no_general.yaml").read_text())
    shared = [s for s in main["stages"] if s["name"] not in ("grpo_all", "distill")]
    assert ablation["stages"][: len(shared)] == shared and len(shared) == 4
    assert {k: v for k, v in ablation.items() if k != "stages"} == {k: v for k, v in main.items() if k != "stages"}
    mixed = next(s for s in main["stages"] if s["name"] == "grpo_all")
    only = ablation["stages"][len(shared)]
    assert only["config"] == mixed["config"] and only["model_from"] == mixed["model_from"]
    # arithmetic only, as many arithmetic prompts per step as the mixed stage averages
    data = yaml.safe_load((ROOT / mixed["config"]).read_text())["data"]["init_args"]
    arithmetic = round(data["batch_size"] * (1 - data["task"]["init_args"]["general_fraction"]))
    assert only["overrides"] == {**mixed["overrides"], "data.init_args.task.init_args.general_fraction": 0.0,
                                 "data.init_args.batch_size": arithmetic}


def test_tiny_pipeline_runs_every_stage_then_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tiny_pipeline(tmp_path)
    run = tmp_path / "run"
    assert pl.main(["-c", path]) == 0
    names = ["cold_start", "reasoning_rl", "rejection_sft", "grpo_all", "distill"]
    for name in names:
        done = json.loads((run / name / "DONE").read_text())
        assert Path(done["model"]).joinpath("config.json").is_file(), name
        assert done["metrics"]["steps"] == 2 and "accuracy" in done["metrics"], name
    # The custom callback from the pipeline YAML ran in the stage, with its placeholders filled.
    assert json.loads((run / "reasoning_rl" / "marker.json").read_text()) == {"step": 2, "note": str(run / "cold_start" / "model")}
    traces = [json.loads(line) for line in open(run / "reasoning_rl" / "traces.jsonl")]
    assert {r["prompt_index"] for r in traces} == set(range(6)) and all(r["source_step"] == 2 for r in traces)
    assert traces[0]["source_model"] == str(run / "reasoning_rl" / "model")  # the model exported after sampling
    rsft = yaml.safe_load((run / "rejection_sft" / "config.yaml").read_text())
    assert rsft["data"]["init_args"]["train_files"] == [str(run / "reasoning_rl" / "traces.jsonl")]
    assert rsft["model"]["init_args"]["policy"]["init_args"]["name_or_path"] == str(run / "reasoning_rl" / "model")
    summary = (run / "summary.md").read_text()
    assert summary.count("\n| ") == 6 and "points vs grpo_all" in summary  # header + 5 stages
    assert f"Final model: `{run / 'distill' / 'model'}`" in summary
    assert json.loads((run / "summary.json").read_text())["final_model"] == str(run / "distill" / "model")
    rows = [line for line in summary.splitlines() if line.startswith("| 1 |")]
    assert rows and " % | " in rows[0] and " points | " in rows[0]  # percent and points, not fractions
    assert not list(run.rglob("*.parts"))  # rejection sampling's progress folders went with the finished stage
    assert (run / "summary.png").stat().st_size > 1000
    # Again: every stage is skipped, nothing is trained or rewritten.
    stamps = {n: (run / n / "DONE").stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert pl.main(["-c", path]) == 0
    assert {n: (run / n / "DONE").stat().st_mtime_ns for n in names} == stamps
    assert len(list((run / "distill" / "logs").iterdir())) == 1
    # --from reruns that stage and everything after it.
    assert pl.main(["-c", path, "--from", "grpo_all"]) == 0
    assert (run / "rejection_sft" / "DONE").stat().st_mtime_ns == stamps["rejection_sft"]
    assert (run / "grpo_all" / "DONE").stat().st_mtime_ns != stamps["grpo_all"]
    assert (run / "distill" / "DONE").stat().st_mtime_ns != stamps["distill"]


def test_failed_stage_writes_no_done_and_the_error_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    sft, _, _ = tiny_configs(tmp_path)
    spec = {"run_dir": str(tmp_path / "run"), "launcher": "inprocess", "stages": [
        {"name": "ok", "config": sft},
        {"name": "broken", "config": sft, "overrides": {"model.init_args.no_such_option": 1}}]}  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        pl.main(["-c", _write(tmp_path / "p.yaml", spec)])
    assert exc.value.code == 2  # the stage's config was rejected, as `r1lightning fit` exits
    assert (tmp_path / "run" / "ok" / "DONE").exists() and not (tmp_path / "run" / "broken" / "DONE").exists()
    assert "pipeline: error: stage broken" in capsys.readouterr().err


def test_a_moved_key_in_a_pipeline_stage_is_one_line(tmp_path, monkeypatch, capsys):
    """An option of an earlier version in a stage's overrides or inline callbacks: the stage, the key, its
    new place; checked by --dry-run and by a run (the stage's command exits 2, and so does the pipeline)."""
    monkeypatch.chdir(ROOT)
    sft, grpo, _ = tiny_configs(tmp_path)
    spec = {"run_dir": str(tmp_path / "run"), "launcher": "subprocess", "stages": [
        {"name": "rl", "config": grpo, "model_from": None, "overrides": {
            "model.init_args.policy.init_args": {"config": dict(TINY_MOE), "tokenizer": "char"},
            "model.init_args.temperature": 0.7}}]}  # fmt: skip
    path = _write(tmp_path / "p.yaml", spec)
    for dry in (True, False):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            pl.main(["-c", path, *(["--dry-run"] if dry else [])])
        assert exc.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        config = tmp_path / "run" / "rl" / ("config.dry-run.yaml" if dry else "config.yaml")
        assert line.startswith(f"pipeline: error: stage rl: {config}: `model.init_args.temperature` moved: "
                               "use `model.init_args.sampling.temperature`"), line


def test_custom_callback_from_yaml_through_the_cli_subprocess(tmp_path, monkeypatch):
    """The README example: a callback class in your own module, named in the pipeline YAML only."""
    monkeypatch.chdir(ROOT)
    sft, _, _ = tiny_configs(tmp_path)
    marker = {"class_path": "tests.test_pipeline.StageMarker", "init_args": {"path": "${stage_dir}/marker.json", "note": "hello"}}
    spec = {"run_dir": str(tmp_path / "run"), "launcher": "subprocess", "overrides": {"trainer.max_steps": 1},
            "stages": [{"name": "only", "config": sft, "callbacks": [marker]}]}  # fmt: skip
    assert pl.main(["-c", _write(tmp_path / "p.yaml", spec)]) == 0
    assert json.loads((tmp_path / "run" / "only" / "marker.json").read_text()) == {"step": 1, "note": "hello"}
    assert "StageMarker" in (tmp_path / "run" / "only" / "config.yaml").read_text()
