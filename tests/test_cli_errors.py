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
    assert code == 2 and "policy.name_or_path: path does not exist: ./models/missing" in line
