"""The pipeline file: a list of stages, each an ordinary `r1lightning fit` recipe plus how it connects.

    run_dir: runs/quickstart/pipeline       # every stage writes under <run_dir>/<name>/
    launcher: subprocess                     # or inprocess (faster start, shares one interpreter)
    overrides: {trainer.enable_progress_bar: false}   # dotted keys, applied to every stage
    stages:
      - name: cold_start
        config: configs/quickstart/sft.yaml  # one file or a list (merged in order)
      - name: reasoning_rl
        config: configs/quickstart/grpo.yaml # model_from defaults to the previous stage
        overrides: {trainer.max_steps: 200}
        callbacks:                           # appended to trainer.callbacks
          - class_path: r1lightning.callbacks.RejectionSampling
            init_args: {output: ${stage_dir}/traces.jsonl, sampling: {num_samples: 4}}
      - name: rejection_sft
        config: configs/quickstart/rejection_sft.yaml
        data_from: reasoning_rl              # train on the datasets that stage generated
        extra_train_files: [more/data.jsonl] # ... together with these
      - name: distill
        config: configs/quickstart/distill.yaml
        model_from: null                     # a fresh student from its own config
        data_from: grpo_all
        compare_to: grpo_all                 # the summary reports the gap to this stage

`load_pipeline` reads and checks the file (names, references to earlier stages, that the recipe
files exist); every problem is one `PipelineError` line naming the file and the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREVIOUS = object()  # model_from not given: the previous stage
COMMANDS = ("fit", "validate", "test")


class PipelineError(RuntimeError):
    """A problem with the pipeline file or a stage that failed; the message is one line. `exit_code`:
    what `r1lightning pipeline` exits with (2 where a stage's config was rejected, as `r1lightning fit` does)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Stage:
    name: str
    configs: list[str]
    command: str = "fit"
    overrides: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    model_from: Any = PREVIOUS
    data_from: list[str] = field(default_factory=list)
    extra_train_files: list[str] = field(default_factory=list)
    compare_to: str | None = None


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    stages: list[Stage]
    launcher: str = "subprocess"
    overrides: dict = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def model_source(self, index: int) -> str | None:
        """The stage whose exported model stage `index` starts from (None: its own config)."""
        stage = self.stages[index]
        if stage.model_from is PREVIOUS:
            return self.stages[index - 1].name if index > 0 else None
        return stage.model_from or None


STAGE_KEYS = {"name", "config", "command", "overrides", "callbacks", "model_from", "data_from", "extra_train_files", "compare_to"}
PIPELINE_KEYS = {"run_dir", "launcher", "overrides", "stages"}


def load_pipeline(path: str | Path, run_dir: str | None = None) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - PIPELINE_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(PIPELINE_KEYS)}")
    if not raw.get("stages"):
        raise PipelineError(f"{path}: no stages")
    stages: list[Stage] = []
    for i, s in enumerate(raw["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(s, dict) or "name" not in s or "config" not in s:
            raise PipelineError(f"{where}: each stage needs `name` and `config`")
        unknown = set(s) - STAGE_KEYS
        if unknown:
            raise PipelineError(f"{where} ({s['name']}): unknown key(s) {sorted(unknown)}")
        name = str(s["name"])
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name in {st.name for st in stages}:
            raise PipelineError(f"{where}: stage name {name!r} must be unique and use letters, digits, _ or -")
        if s.get("command", "fit") not in COMMANDS:
            raise PipelineError(f"{where} ({name}): command must be fit, validate or test")
        configs = [s["config"]] if isinstance(s["config"], str) else list(s["config"])
        for c in configs:
            if not Path(c).is_file():
                raise PipelineError(f"{where} ({name}): config file not found: {c}")
        data_from = s.get("data_from") or []
        data_from = [data_from] if isinstance(data_from, str) else list(data_from)
        earlier = {st.name for st in stages}
        for ref in data_from + [r for r in (s.get("model_from"), s.get("compare_to")) if r]:
            if ref not in earlier:
                raise PipelineError(f"{where} ({name}): refers to {ref!r}, which is not an earlier stage")
        stages.append(Stage(
            name=name, configs=configs, command=s.get("command", "fit"), overrides=dict(s.get("overrides") or {}),
            callbacks=list(s.get("callbacks") or []), model_from=s["model_from"] if "model_from" in s else PREVIOUS,
            data_from=data_from, extra_train_files=list(s.get("extra_train_files") or []), compare_to=s.get("compare_to"),
        ))  # fmt: skip
    launcher = raw.get("launcher", "subprocess")
    if launcher not in ("subprocess", "inprocess"):
        raise PipelineError(f"{path}: launcher must be subprocess or inprocess, got {launcher!r}")
    return Pipeline(path, Path(run_dir or raw.get("run_dir") or f"runs/{path.stem}"), stages, launcher, dict(raw.get("overrides") or {}))


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """`--override [STAGE:]KEY=VALUE` as (stage or None, dotted key, the value parsed as YAML)."""
    if "=" not in text:
        raise PipelineError(f"--override {text!r}: expected [STAGE:]KEY=VALUE")
    key, value = text.split("=", 1)
    stage = None
    if ":" in key:
        stage, key = key.split(":", 1)
    return stage, key, yaml.safe_load(value)
