"""`r1lightning pipeline -c pipeline.yaml`: run training stages in order, each feeding the next.

A pipeline file lists stages; each is an ordinary `r1lightning fit` recipe plus how it connects:

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
            init_args: {output: ${stage_dir}/traces.jsonl, num_samples: 4}
      - name: rejection_sft
        config: configs/quickstart/rejection_sft.yaml
        data_from: reasoning_rl              # train on the datasets that stage generated
        extra_train_files: [more/data.jsonl] # ... together with these
      - name: distill
        config: configs/quickstart/distill.yaml
        model_from: null                     # a fresh student from its own config
        data_from: grpo_all
        compare_to: grpo_all                 # the summary reports the gap to this stage

For each stage the pipeline composes one config and writes it to `<stage_dir>/config.yaml`:
the files are merged (dicts recursively; a different `class_path` replaces the whole entry;
lists are replaced), then `overrides` (pipeline-wide, then the stage's; keys like
`trainer.callbacks.0.init_args.x` index lists), then the stage's `callbacks` are appended.
Paths under the recipe's own `trainer.default_root_dir` (logs, checkpoints, export) move under
the stage directory; `model.init_args.export_dir` becomes `<stage_dir>/model`, which the next
stage loads as `policy.init_args.name_or_path` (its `config`/`tokenizer` are dropped); datasets
that a stage's `RejectionSampling` callbacks write are what `data_from` passes on, as
`data.init_args.train_files` (the data module's `task` stays for held-out validation). In
strings, `${run_dir}`, `${stage_dir}`, `${<stage>.dir}` and `${<stage>.model}` are replaced.

After a stage exits successfully and its model is exported, `<stage_dir>/DONE` (JSON: model,
datasets, metrics, wall time, config hash) is written atomically. A re-run skips stages whose
DONE matches the composed config, unless an earlier stage ran again; an interrupted stage
resumes from its `last.ckpt` if its config is unchanged (a changed stage starts over; the old
directory is kept as `<name>.old-<time>`). At the end `summary.md` (a table of held-out
accuracy per stage), `summary.json` and `summary.png` are written to the run directory.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from r1lightning.files import atomic_write_text

log = logging.getLogger("r1lightning.pipeline")

_PREVIOUS = object()  # model_from not given: the previous stage
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
_METRIC = "val/accuracy"


class PipelineError(RuntimeError):
    """A problem with the pipeline file or a stage that failed; the message is one line."""


# --------------------------------------------------------------------------- the pipeline file


@dataclass
class Stage:
    name: str
    configs: list[str]
    command: str = "fit"
    overrides: dict = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    model_from: Any = _PREVIOUS
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


_STAGE_KEYS = {"name", "config", "command", "overrides", "callbacks", "model_from", "data_from", "extra_train_files", "compare_to"}
_PIPELINE_KEYS = {"run_dir", "launcher", "overrides", "stages"}


def load_pipeline(path: str | Path, run_dir: str | None = None) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - _PIPELINE_KEYS
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(_PIPELINE_KEYS)}")
    if not raw.get("stages"):
        raise PipelineError(f"{path}: no stages")
    stages: list[Stage] = []
    for i, s in enumerate(raw["stages"]):
        where = f"{path}: stage {i + 1}"
        if not isinstance(s, dict) or "name" not in s or "config" not in s:
            raise PipelineError(f"{where}: each stage needs `name` and `config`")
        unknown = set(s) - _STAGE_KEYS
        if unknown:
            raise PipelineError(f"{where} ({s['name']}): unknown key(s) {sorted(unknown)}")
        name = str(s["name"])
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name in {st.name for st in stages}:
            raise PipelineError(f"{where}: stage name {name!r} must be unique and use letters, digits, _ or -")
        if s.get("command", "fit") not in ("fit", "validate", "test"):
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
            callbacks=list(s.get("callbacks") or []), model_from=s["model_from"] if "model_from" in s else _PREVIOUS,
            data_from=data_from, extra_train_files=list(s.get("extra_train_files") or []), compare_to=s.get("compare_to"),
        ))  # fmt: skip
    launcher = raw.get("launcher", "subprocess")
    if launcher not in ("subprocess", "inprocess"):
        raise PipelineError(f"{path}: launcher must be subprocess or inprocess, got {launcher!r}")
    return Pipeline(path, Path(run_dir or raw.get("run_dir") or f"runs/{path.stem}"), stages, launcher, dict(raw.get("overrides") or {}))


# --------------------------------------------------------------------------- composing a stage config


def merge(base: Any, over: Any) -> Any:
    """`over` merged into `base` (copies): dicts recursively; an entry with another `class_path`
    replaces the old one whole (its init_args belong to another class); anything else replaces."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    if "class_path" in base and "class_path" in over and base["class_path"] != over["class_path"]:
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
    return out


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists (numeric parts index lists, negative from the end)."""
    parts = key.split(".")
    node: Any = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise PipelineError(f"override {key}: {part!r} is not an index of a list of {len(node)}") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        else:
            raise PipelineError(f"override {key}: {'.'.join(parts[:i])} is not a mapping or a list")


def get_dotted(config: dict, key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def _map_strings(obj: Any, fn) -> Any:
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    return obj


def _callbacks(config: dict) -> list:
    cbs = get_dotted(config, "trainer.callbacks") or []
    return cbs if isinstance(cbs, list) else [cbs]


def produced_datasets(config: dict) -> list[str]:
    """Datasets a stage writes: the outputs of its `RejectionSampling` callbacks (at fit end)."""
    out = []
    for cb in _callbacks(config):
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("RejectionSampling"):
            args = cb.get("init_args") or {}
            if args.get("output") and args.get("when", "fit_end") in ("fit_end", "validate_end"):
                out.append(str(args["output"]))
    return out


def stage_dir(pipeline: Pipeline, name: str) -> Path:
    return pipeline.run_dir / name


def compose(pipeline: Pipeline, stage: Stage, index: int, done: dict[str, dict], cli_overrides: list[tuple[str | None, str, Any]] = ()) -> dict:
    """The complete config of `stage` (see the module docstring for the rules)."""
    config: dict = {}
    for f in stage.configs:
        config = merge(config, yaml.safe_load(Path(f).read_text()) or {})
    for key, value in pipeline.overrides.items():
        set_dotted(config, key, copy.deepcopy(value))
    for key, value in stage.overrides.items():
        set_dotted(config, key, copy.deepcopy(value))
    for target, key, value in cli_overrides:
        if target in (None, stage.name):
            set_dotted(config, key, copy.deepcopy(value))
    if stage.callbacks:
        set_dotted(config, "trainer.callbacks", _callbacks(config) + copy.deepcopy(stage.callbacks))

    here = stage_dir(pipeline, stage.name)
    old_root = get_dotted(config, "trainer.default_root_dir")
    if old_root:
        old_root = str(old_root).rstrip("/")

        def reroot(s: str) -> str:
            if s == old_root or s.startswith(old_root + "/"):
                return str(here) + s[len(old_root):]
            return s

        config = _map_strings(config, reroot)
    set_dotted(config, "trainer.default_root_dir", str(here))
    loggers = get_dotted(config, "trainer.logger")
    if loggers is None or loggers is True:
        # The summary reads Lightning's CSV log.
        set_dotted(config, "trainer.logger", [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                               "init_args": {"save_dir": str(here), "name": "logs"}}])  # fmt: skip

    if stage.command == "fit":
        set_dotted(config, "model.init_args.export_dir", str(here / "model"))
    # Last, so it sees what the other callbacks logged at the end of training.
    report = {"class_path": "r1lightning.callbacks.StageReport", "init_args": {"path": str(here / "stage_report.json")}}
    set_dotted(config, "trainer.callbacks", _callbacks(config) + [report])
    source = pipeline.stages[index - 1].name if stage.model_from is _PREVIOUS and index > 0 else stage.model_from
    if source is not _PREVIOUS and source:
        policy = get_dotted(config, "model.init_args.policy.init_args")
        if not isinstance(policy, dict):
            raise PipelineError(f"stage {stage.name}: model_from needs model.init_args.policy.init_args in its config")
        policy.pop("config", None)
        policy.pop("tokenizer", None)  # the export holds its own tokenizer
        policy["name_or_path"] = done[source]["model"]
    if stage.data_from or stage.extra_train_files:
        files = []
        for src in stage.data_from:
            for f in done[src]["datasets"]:
                if _is_empty(f):
                    log.warning("stage %s: %s (from %s) has no rows; training without it", stage.name, f, src)
                else:
                    files.append(f)
        files += list(stage.extra_train_files)
        if not files:
            raise PipelineError(f"stage {stage.name}: data_from {stage.data_from} produced no rows to train on")
        set_dotted(config, "data.init_args.train_files", files)

    values = {"run_dir": str(pipeline.run_dir), "stage_dir": str(here)}
    for name, rec in done.items():
        values[f"{name}.dir"] = str(stage_dir(pipeline, name))
        values[f"{name}.model"] = rec.get("model") or ""

    def substitute(s: str) -> str:
        def repl(m: re.Match) -> str:
            if m.group(1) not in values:
                raise PipelineError(f"stage {stage.name}: unknown placeholder ${{{m.group(1)}}} (known: {', '.join(sorted(values))})")
            return values[m.group(1)]

        return _PLACEHOLDER.sub(repl, s)

    return _map_strings(config, substitute)


def _is_empty(dataset: str) -> bool:
    """A dataset that exists but has no rows (a policy none of whose samples passed)."""
    stats = _stats(dataset)
    if stats is not None:
        return stats.get("kept", 1) == 0
    p = Path(dataset)
    return p.is_file() and p.stat().st_size == 0


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- running


def _last_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_stage(pipeline: Pipeline, stage: Stage, config: dict, config_path: Path, resume: Path | None) -> None:
    args = [stage.command, "-c", str(config_path)]
    if resume is not None:
        args += ["--ckpt_path", str(resume)]
    here = config_path.parent
    if pipeline.launcher == "inprocess":
        from r1lightning.cli import main as cli_main

        try:
            cli_main(args)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise PipelineError(f"stage {stage.name}: r1lightning {' '.join(args)} exited with {e.code}") from None
        return
    log_path = here / "stage.log"
    cmd = [sys.executable, "-m", "r1lightning", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise PipelineError(f"stage {stage.name} failed (exit {code}); log: {log_path}")


def read_metrics(directory: Path) -> dict:
    """The stage's final step and metrics (from `StageReport`) and its held-out accuracy per step
    (from the newest CSV log under `directory`)."""
    out: dict = {}
    report = directory / "stage_report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        out = {"steps": rep["global_step"], "last": rep["metrics"]}
        if _METRIC in rep["metrics"]:
            out["accuracy"] = rep["metrics"][_METRIC]
    logs = sorted(directory.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return out
    series: list[tuple[int, float]] = []
    last: dict[str, float] = {}
    steps = 0
    with open(logs[-1]) as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            steps = max(steps, step)
            for k, v in row.items():
                if v in (None, "") or k in ("step", "epoch"):
                    continue
                try:
                    value = float(v)
                except ValueError:
                    continue
                if k == _METRIC:
                    series.append((step, value))
                if not k.startswith("train/"):
                    last[k] = value
    out.setdefault("steps", steps)
    out.setdefault("last", last)
    out["log"] = str(logs[-1])
    if series:
        out["accuracy_series"] = series
        out.setdefault("accuracy", series[-1][1])
    return out


def run_pipeline(pipeline: Pipeline, cli_overrides=(), rerun_from: str | None = None, dry_run: bool = False) -> dict[str, dict]:
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    rerun = False
    if rerun_from is not None and rerun_from not in {s.name for s in pipeline.stages}:
        raise PipelineError(f"--from {rerun_from}: no such stage")
    t_pipeline = time.perf_counter()
    for i, stage in enumerate(pipeline.stages):
        rerun = rerun or stage.name == rerun_from
        config = compose(pipeline, stage, i, done, cli_overrides)
        digest = config_hash(config)
        here = stage_dir(pipeline, stage.name)
        marker = here / "DONE"
        previous = json.loads(marker.read_text()) if marker.exists() else None
        if previous and previous.get("config_hash") == digest and not rerun:
            log.info("[%d/%d] %s: done before, skipped", i + 1, len(pipeline.stages), stage.name)
            done[stage.name] = previous
            continue
        if dry_run:
            here.mkdir(parents=True, exist_ok=True)
            config_path = here / "config.dry-run.yaml"
            atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
            done[stage.name] = {"model": str(here / "model"), "datasets": produced_datasets(config), "config": str(config_path)}
            continue
        rerun = True  # everything after a stage that runs again must run again too
        config_path = here / "config.yaml"
        resume = None
        if here.exists():
            old = here / "config.yaml"
            same = old.exists() and config_hash(yaml.safe_load(old.read_text()) or {}) == digest and previous is None
            if same:
                resume = _last_checkpoint(here)
            else:
                aside = here.with_name(f"{here.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                log.info("%s: config changed; moving the old attempt to %s", stage.name, aside)
                os.replace(here, aside)
        here.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        log.info("[%d/%d] %s: r1lightning %s -c %s%s", i + 1, len(pipeline.stages), stage.name, stage.command, config_path,
                 f" (resuming from {resume})" if resume else "")  # fmt: skip
        t0 = time.perf_counter()
        run_stage(pipeline, stage, config, config_path, resume)
        wall = time.perf_counter() - t0
        if stage.command == "fit":
            model = get_dotted(config, "model.init_args.export_dir")
            if not model or not Path(model).is_dir():
                raise PipelineError(f"stage {stage.name}: finished but exported no model to {model}")
        else:  # validate/test stages (e.g. sampling a teacher) pass their input model on
            model = get_dotted(config, "model.init_args.policy.init_args.name_or_path")
        datasets = produced_datasets(config)
        for d in datasets:
            if not Path(d).exists():
                raise PipelineError(f"stage {stage.name}: finished but did not write the dataset {d}")
        record = {
            "stage": stage.name,
            "model": model,
            "datasets": datasets,
            "dataset_stats": {d: _stats(d) for d in datasets},
            "metrics": read_metrics(here),
            "wall_s": wall,
            "config": str(config_path),
            "config_hash": digest,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(marker, json.dumps(record, indent=1))
        done[stage.name] = record
        _remove_parts(here)
        acc = record["metrics"].get("accuracy")
        log.info("[%d/%d] %s: done in %.0f s%s", i + 1, len(pipeline.stages), stage.name, wall,
                 f", held-out accuracy {100 * acc:.1f} %" if acc is not None else "")  # fmt: skip
    if not dry_run:
        log.info("pipeline: %.0f s in this invocation", time.perf_counter() - t_pipeline)
    return done


def _remove_parts(directory: Path) -> None:
    """A finished stage's `<dataset>.parts/` folders (rejection sampling's progress for a resume) are
    no longer needed: the dataset next to them is complete."""
    import shutil

    for parts in sorted(directory.rglob("*.parts")):
        if parts.is_dir():
            shutil.rmtree(parts, ignore_errors=True)


def final_model(pipeline: Pipeline, done: dict[str, dict]) -> str | None:
    """The model the last finished stage exported (or, for a validate stage, evaluated)."""
    for stage in reversed(pipeline.stages):
        rec = done.get(stage.name)
        if rec and rec.get("model"):
            return rec["model"]
    return None


def _stats(dataset: str) -> dict | None:
    p = Path(dataset + ".stats.json")
    return json.loads(p.read_text()) if p.exists() else None


# --------------------------------------------------------------------------- summary


def summarize(pipeline: Pipeline, done: dict[str, dict]) -> str:
    """Write summary.md / summary.json / summary.png to the run directory; returns the Markdown."""
    rows = []
    first = None
    for i, stage in enumerate(pipeline.stages):
        rec = done.get(stage.name)
        if rec is None:
            continue
        acc = rec.get("metrics", {}).get("accuracy")
        if first is None and acc is not None:
            first = acc
        if stage.model_from is _PREVIOUS:
            source = pipeline.stages[i - 1].name if i > 0 else "config"
        else:
            source = stage.model_from or "config"
        notes = []
        for d, st in (rec.get("dataset_stats") or {}).items():
            if st:
                notes.append(f"wrote {st['kept']} traces ({100 * st['pass_rate']:.1f}% of {st['sampled']} samples passed)")
        if stage.data_from:
            notes.append("trained on " + " + ".join(stage.data_from) + (" + extra files" if stage.extra_train_files else ""))
        last = rec.get("metrics", {}).get("last") or {}
        bench = [f"{k[len('bench/'):]} {v:.3f}" for k, v in sorted(last.items()) if k.startswith("bench/")]
        if bench:
            notes.append(", ".join(bench))
        if stage.compare_to and acc is not None:
            ref = done.get(stage.compare_to, {}).get("metrics", {}).get("accuracy")
            if ref is not None:
                notes.append(f"{100 * (acc - ref):+.1f} points vs {stage.compare_to}")
        rows.append({"stage": stage.name, "from": source, "steps": rec.get("metrics", {}).get("steps"), "accuracy": acc,
                     "delta": None if acc is None or first is None else acc - first, "wall_s": rec.get("wall_s"),
                     "notes": "; ".join(notes)})  # fmt: skip

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = [f"# Pipeline `{pipeline.path}`", "", f"Held-out accuracy (`{_METRIC}`, greedy) at the end of each stage.", "",
             "| # | stage | model from | steps | held-out accuracy | Δ vs stage 1 | wall (s) | notes |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, r in enumerate(rows, 1):
        accuracy = None if r["accuracy"] is None else 100 * r["accuracy"]
        delta = None if r["delta"] is None else 100 * r["delta"]
        lines.append(f"| {n} | {r['stage']} | {r['from']} | {fmt(r['steps'], 'd')} | {fmt(accuracy, '.1f')} % | "
                     f"{fmt(delta, '+.1f')} points | {fmt(r['wall_s'], '.0f')} | {r['notes']} |")  # fmt: skip
    total = sum(r["wall_s"] or 0 for r in rows)
    model = final_model(pipeline, done)
    lines += ["", f"Total stage wall time: {total:.0f} s ({total / 60:.1f} min).", ""]
    if model:
        lines += [f"Final model: `{model}` (a save_pretrained directory: `AutoModelForCausalLM.from_pretrained` and "
                  "`AutoTokenizer.from_pretrained` load it, and so does a recipe's `policy.init_args.name_or_path`).", ""]  # fmt: skip
    text = "\n".join(lines)
    atomic_write_text(pipeline.run_dir / "summary.md", text)
    atomic_write_text(pipeline.run_dir / "summary.json",
                      json.dumps({"stages": rows, "total_wall_s": total, "final_model": model}, indent=1))
    try:
        plot(pipeline, done, pipeline.run_dir / "summary.png")
    except ImportError:
        log.warning("matplotlib is not installed: no summary.png (pip install matplotlib)")
    return text


def plot(pipeline: Pipeline, done: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    offset = 0
    names, finals, colours = [], [], []
    palette = plt.get_cmap("tab10")
    for k, stage in enumerate(pipeline.stages):
        m = (done.get(stage.name) or {}).get("metrics") or {}
        series = m.get("accuracy_series") or []
        if series:
            # Stages are laid end to end; a fresh student (model_from: null) starts its own line.
            xs = [offset + s + 1 for s, _ in series]
            left.plot(xs, [v for _, v in series], "o-", markersize=3, label=stage.name, color=palette(k % 10))
        offset += (m.get("steps") or 0) + 1
        if m.get("accuracy") is not None:
            names.append(stage.name)
            finals.append(m["accuracy"])
            colours.append(palette(k % 10))  # the same colour as the stage's line
    left.set_xlabel("optimizer steps, stages end to end")
    left.set_ylabel("held-out accuracy")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    if names:
        left.legend(fontsize=8, loc="lower right")
    right.bar(range(len(finals)), finals, color=colours)
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    right.set_ylim(0, 1)
    right.set_title("end of stage")
    for x, v in enumerate(finals):
        right.text(x, v + 0.02, f"{100 * v:.1f} %", ha="center", fontsize=8)
    fig.suptitle(str(pipeline.path))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _parse_override(text: str) -> tuple[str | None, str, Any]:
    if "=" not in text:
        raise PipelineError(f"--override {text!r}: expected [STAGE:]KEY=VALUE")
    key, value = text.split("=", 1)
    stage = None
    if ":" in key:
        stage, key = key.split(":", 1)
    return stage, key, yaml.safe_load(value)


def check_configs(pipeline: Pipeline, done: dict[str, dict]) -> None:
    """Parse every composed stage config with the real CLI (nothing is trained)."""
    import r1lightning.data  # noqa: F401
    import r1lightning.grpo  # noqa: F401
    import r1lightning.sft  # noqa: F401
    from r1lightning.cli import R1CLI

    import warnings

    for stage in pipeline.stages:
        path = done[stage.name]["config"]
        extra = []
        policy = get_dotted(yaml.safe_load(Path(path).read_text()), "model.init_args.policy.init_args") or {}
        if policy.get("name_or_path") and not Path(policy["name_or_path"]).exists():
            extra = ["--model.init_args.policy.init_args.tokenizer", "char"]  # the model does not exist yet
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            R1CLI(args=["-c", path, *extra], run=False)
        log.info("%s: %s parses", stage.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1lightning pipeline", description="Run training stages in order (see r1lightning/pipeline.py).")
    parser.add_argument("-c", "--config", required=True, help="the pipeline YAML")
    parser.add_argument("--run-dir", default=None, help="overrides the file's run_dir")
    parser.add_argument("--override", action="append", default=[], metavar="[STAGE:]KEY=VALUE",
                        help="set a dotted key in every stage's config (or in STAGE's); VALUE is YAML; repeatable")  # fmt: skip
    parser.add_argument("--from", dest="rerun_from", default=None, metavar="STAGE", help="run STAGE and all later stages again")
    parser.add_argument("--launcher", choices=["subprocess", "inprocess"], default=None)
    parser.add_argument("--dry-run", action="store_true", help="compose and check every stage config, train nothing")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        pipeline = load_pipeline(args.config, args.run_dir)
        if args.launcher:
            pipeline.launcher = args.launcher
        overrides = [_parse_override(o) for o in args.override]
        for target, _, _ in overrides:
            if target is not None and target not in {s.name for s in pipeline.stages}:
                raise PipelineError(f"--override {target}:...: no such stage")
        done = run_pipeline(pipeline, overrides, args.rerun_from, args.dry_run)
        if args.dry_run:
            check_configs(pipeline, done)
            print(f"dry run: {len(done)} stage configs composed and parsed under {pipeline.run_dir}")
            return 0
        print(summarize(pipeline, done))
        return 0
    except PipelineError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
