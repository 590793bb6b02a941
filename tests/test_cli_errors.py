"""Bad input through the real command: one line on stderr naming the file/line/key, exit status 2."""

import json

import pytest

from r1lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def run(tmp_path, capsys, monkeypatch, data_file, policy):
    monkeypatch.chdir(tmp_path)
    config = {
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
        "model": {"class_path": "r1lightning.sft.SFTModule", "init_args": {"policy": {"class_path": "r1lightning.Policy", "init_args": policy}}},
        "data": {"class_path": "r1lightning.data.TraceDataModule", "init_args": {"train_files": str(data_file)}},
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err[-1] if err else ""


def test_malformed_row_is_one_line_with_file_and_line(tmp_path, capsys, monkeypatch, tiny_moe_config):
    data = tmp_path / "traces.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    code, line = run(tmp_path, capsys, monkeypatch, data, {"config": tiny_moe_config, "tokenizer": "char"})
    assert code == 2
    assert line.startswith("r1lightning: error: ") and f"{data}:2: invalid JSON" in line


def test_missing_model_path_names_the_path(tmp_path, capsys, monkeypatch):
    data = tmp_path / "traces.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code, line = run(tmp_path, capsys, monkeypatch, data, {"name_or_path": "./models/missing", "tokenizer": "char"})
    assert (code, line) == (2, "r1lightning: error: model.init_args.policy.init_args.name_or_path: path does not exist: ./models/missing")


def fit(tmp_path, capsys, monkeypatch, config: dict, *extra: str) -> tuple[int, list[str]]:
    """`r1lightning fit -c <config>`: (exit status, the error lines of stderr). In-process, stderr
    also holds Lightning's info lines (and, after an earlier test, its handler's complaints about
    the closed capture stream); the command's own error is the last line and the only one."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(path), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("r1lightning: error:")]
    assert errors[-1:] == lines[-1:], lines[-20:]
    return exit_info.value.code, errors


def grpo_recipe(tmp_path, tiny_moe_config, prompts, **module_args) -> dict:
    return {
        "trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}}]},
        "model": {"class_path": "r1lightning.grpo.GRPOModule", "init_args": {
            "policy": {"class_path": "r1lightning.Policy", "init_args": {"config": tiny_moe_config, "tokenizer": "char", "moe_backend": "eager"}},
            "rewards": [{"fn": "accuracy"}, {"fn": "format", "weight": 0.1}], "sampling": {"num_samples": 2, "max_new_tokens": 4},
            "log_completions_every": 0, **module_args}},
        "data": {"class_path": "r1lightning.data.PromptDataModule", "init_args": {"train_files": str(prompts), "batch_size": 2}},
    }


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_misspelled_key_names_the_file_and_the_closest_key(tmp_path, capsys, monkeypatch, tiny_moe_config):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    recipe = grpo_recipe(tmp_path, tiny_moe_config, prompts)
    recipe["model"]["init_args"]["log_completions_evry"] = recipe["model"]["init_args"].pop("log_completions_every")
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert code == 2
    assert err == [f"r1lightning: error: {tmp_path / 'recipe.yaml'}: unknown key `model.init_args.log_completions_evry`, "
                   "did you mean `log_completions_every`?"]


def test_misspelled_trainer_key(tmp_path, capsys, monkeypatch, tiny_moe_config):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    recipe = grpo_recipe(tmp_path, tiny_moe_config, prompts)
    recipe["trainer"]["max_step"] = recipe["trainer"].pop("max_steps")
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert (code, err) == (2, [f"r1lightning: error: {tmp_path / 'recipe.yaml'}: unknown key `trainer.max_step`, did you mean `max_steps`?"])


def test_missing_model_path_names_the_users_key(tmp_path, capsys, monkeypatch, tiny_moe_config):
    # What `fit -c configs/quickstart/grpo.yaml` meets before the SFT stage ran: the GRPO module builds
    # its tokenizer from the path in __init__, inside jsonargparse's instantiation.
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    recipe = grpo_recipe(tmp_path, tiny_moe_config, prompts)
    recipe["model"]["init_args"]["policy"]["init_args"] = {"name_or_path": "runs/quickstart/sft/model"}
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert (code, err) == (2, ["r1lightning: error: model.init_args.policy.init_args.name_or_path: path does not exist: "
                               "runs/quickstart/sft/model"])


def test_prompt_row_without_the_column_a_reward_needs(tmp_path, capsys, monkeypatch, tiny_moe_config):
    rows = [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    del rows[2]["answer"]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    code, err = fit(tmp_path, capsys, monkeypatch, grpo_recipe(tmp_path, tiny_moe_config, prompts))
    assert (code, err) == (2, [f"r1lightning: error: {prompts}:3: missing field 'answer' (the `accuracy` reward needs it)"])


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path, capsys, monkeypatch, tiny_moe_config):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    code, err = fit(tmp_path, capsys, monkeypatch, grpo_recipe(tmp_path, tiny_moe_config, prompts), "--ckpt_path", "last")
    assert (code, err) == (2, [f"r1lightning: error: --ckpt_path last: no checkpoint to resume in {tmp_path / 'checkpoints'}; "
                               "run without --ckpt_path to start from step 0"])


def test_unknown_command_suggests_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "-c", "x.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["r1lightning: error: unknown command `fitt`, did you mean `fit`?"]


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "pipeline", "export"):
        assert sum(line.startswith(f"  {command} ") for line in out.splitlines()) == 1, command


# -- options that moved into groups: one line naming the new place, exit status 2 ----------------------
@pytest.mark.parametrize("key,value,new", [("temperature", 0.7, "sampling.temperature"), ("beta", 0.0, "loss.beta"),
                                           ("num_generations", 4, "sampling.num_samples")])
def test_a_flat_grpo_option_names_its_group(tmp_path, capsys, monkeypatch, tiny_moe_config, key, value, new):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    recipe = grpo_recipe(tmp_path, tiny_moe_config, prompts)
    recipe["model"]["init_args"][key] = value
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert (code, err) == (2, [f"r1lightning: error: {tmp_path / 'recipe.yaml'}: `model.init_args.{key}` moved: "
                               f"use `model.init_args.{new}`"])


def test_a_flat_callback_option_names_its_group(tmp_path, capsys, monkeypatch, tiny_moe_config):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    recipe = grpo_recipe(tmp_path, tiny_moe_config, prompts)
    recipe["trainer"]["callbacks"].append({"class_path": "r1lightning.callbacks.RejectionSampling",
                                           "init_args": {"output": "t.jsonl", "max_per_prompt": 2}})
    recipe["trainer"]["callbacks"].append({"class_path": "r1lightning.callbacks.BenchmarkEval",
                                           "init_args": {"benchmarks": [{"name": "heldout"}], "k": 4}})
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert (code, err) == (2, [f"r1lightning: error: {tmp_path / 'recipe.yaml'}: `trainer.callbacks.1.init_args.max_per_prompt` "
                               "moved: use `trainer.callbacks.1.init_args.filters.max_per_prompt`"])
    recipe["trainer"]["callbacks"].pop(1)
    code, err = fit(tmp_path, capsys, monkeypatch, recipe)
    assert (code, err) == (2, [f"r1lightning: error: {tmp_path / 'recipe.yaml'}: `trainer.callbacks.1.init_args.k` moved: "
                               "use `trainer.callbacks.1.init_args.sampling.num_samples`"])


def test_a_flat_option_on_the_command_line_names_its_group(tmp_path, capsys, monkeypatch, tiny_moe_config):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "What is 1+2?", "answer": "3"}])
    code, err = fit(tmp_path, capsys, monkeypatch, grpo_recipe(tmp_path, tiny_moe_config, prompts), "--model.init_args.top_p", "0.9")
    assert (code, err) == (2, ["r1lightning: error: command line: `--model.init_args.top_p` moved: use `--model.init_args.sampling.top_p`"])
