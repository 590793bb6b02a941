"""Running a pipeline: `r1lightning pipeline -c pipeline.yaml` (the file format: `spec.py`; how a
stage's config is built: `compose.py`; the summary: `report.py`).

Each stage's composed config is written to `<stage_dir>/config.yaml` and run as
`r1lightning <command> -c <that file>` (a subprocess, or in this interpreter with `launcher:
inprocess`). After a stage exits successfully and its model is exported, `<stage_dir>/DONE` (JSON:
model, datasets, metrics, wall time, config hash) is written atomically. A re-run skips stages whose
DONE matches the composed config, unless an earlier stage ran again; an interrupted stage resumes
from its `last.ckpt` if its config is unchanged (a changed stage starts over; the old directory is
kept as `<name>.old-<time>`). At the end `summary.md`, `summary.json` and `summary.png` are written
to the run directory.

Datasets a stage writes for the next one (`data_from`) are declared by its callbacks: a callback
class with a `stage_outputs(init_args) -> list[str]` class method (`RejectionSampling` has one)
names the files it writes by the end of the stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from r1lightning.files import atomic_write_text
from r1lightning.pipeline.compose import EXPORT_DIR, POLICY_ARGS, callbacks, compose, config_hash, get_dotted
from r1lightning.pipeline.report import read_metrics, summarize
from r1lightning.pipeline.spec import Pipeline, PipelineError, Stage, load_pipeline, parse_override

log = logging.getLogger("r1lightning.pipeline")


# --------------------------------------------------------------------------- a stage's config


def stage_config(pipeline: Pipeline, stage: Stage, index: int, done: dict[str, dict],
                 cli_overrides: list[tuple[str | None, str, Any]] = ()) -> dict:  # fmt: skip
    """The complete config of `stage`: its recipe files read, and what the earlier stages in `done`
    produced (their models and datasets), composed by `compose.compose`."""
    recipes = [yaml.safe_load(Path(f).read_text()) or {} for f in stage.configs]
    overrides = [*pipeline.overrides.items(), *stage.overrides.items(),
                 *((key, value) for target, key, value in cli_overrides if target in (None, stage.name))]  # fmt: skip
    source = pipeline.model_source(index)
    train_files = None
    if stage.data_from or stage.extra_train_files:
        train_files = []
        for src in stage.data_from:
            for f in done[src]["datasets"]:
                if _is_empty(f):
                    log.warning("stage %s: %s (from %s) has no rows; training without it", stage.name, f, src)
                else:
                    train_files.append(f)
        train_files += list(stage.extra_train_files)
        if not train_files:
            raise PipelineError(f"stage {stage.name}: data_from {stage.data_from} produced no rows to train on")
    placeholders = {"run_dir": str(pipeline.run_dir), "stage_dir": str(pipeline.stage_dir(stage.name))}
    for name, rec in done.items():
        placeholders[f"{name}.dir"] = str(pipeline.stage_dir(name))
        placeholders[f"{name}.model"] = rec.get("model") or ""
    return compose(recipes, pipeline.stage_dir(stage.name), name=stage.name, command=stage.command, overrides=overrides,
                   extra_callbacks=stage.callbacks, model=done[source]["model"] if source else None,
                   train_files=train_files, placeholders=placeholders)  # fmt: skip


def produced_datasets(config: dict) -> list[str]:
    """Datasets a stage writes by its end: what its callbacks declare with `stage_outputs`."""
    out = []
    for cb in callbacks(config):
        if not isinstance(cb, dict) or not cb.get("class_path"):
            continue
        cls = _import(str(cb["class_path"]))
        declare = getattr(cls, "stage_outputs", None)
        if declare is not None:
            out += [str(path) for path in declare(dict(cb.get("init_args") or {}))]
    return out


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the stage's own run reports it


def _stats(dataset: str) -> dict | None:
    p = Path(dataset + ".stats.json")
    return json.loads(p.read_text()) if p.exists() else None


def _is_empty(dataset: str) -> bool:
    """A dataset that exists but has no rows (a policy none of whose samples passed)."""
    stats = _stats(dataset)
    if stats is not None:
        return stats.get("kept", 1) == 0
    p = Path(dataset)
    return p.is_file() and p.stat().st_size == 0


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
                raise PipelineError(f"stage {stage.name}: r1lightning {' '.join(args)} exited with {e.code}",
                                    exit_code=2 if e.code == 2 else 1) from None
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
        if code == 2 and tail and tail[-1].startswith("r1lightning: error: "):
            # The command rejected the stage's config or data: its one line says what and where.
            raise PipelineError(f"stage {stage.name}: {tail[-1][len('r1lightning: error: '):]} (log: {log_path})", exit_code=2)
        sys.stderr.write("\n".join(tail) + "\n")
        raise PipelineError(f"stage {stage.name} failed (exit {code}); log: {log_path}")



def run_pipeline(pipeline: Pipeline, cli_overrides=(), rerun_from: str | None = None, dry_run: bool = False) -> dict[str, dict]:
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    rerun = False
    if rerun_from is not None and rerun_from not in {s.name for s in pipeline.stages}:
        raise PipelineError(f"--from {rerun_from}: no such stage")
    t_pipeline = time.perf_counter()
    for i, stage in enumerate(pipeline.stages):
        rerun = rerun or stage.name == rerun_from
        config = stage_config(pipeline, stage, i, done, cli_overrides)
        digest = config_hash(config)
        here = pipeline.stage_dir(stage.name)
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
            model = get_dotted(config, EXPORT_DIR)
            if not model or not Path(model).is_dir():
                raise PipelineError(f"stage {stage.name}: finished but exported no model to {model}")
        else:  # validate/test stages (e.g. sampling a teacher) pass their input model on
            model = get_dotted(config, POLICY_ARGS + ".name_or_path")
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


# --------------------------------------------------------------------------- command line


def check_configs(pipeline: Pipeline, done: dict[str, dict]) -> None:
    """Parse every composed stage config with the real CLI (nothing is trained)."""
    import r1lightning.data  # noqa: F401
    import r1lightning.grpo  # noqa: F401
    import r1lightning.sft  # noqa: F401
    from r1lightning.cli import R1CLI
    from r1lightning.errors import UserError

    import warnings

    for stage in pipeline.stages:
        path = done[stage.name]["config"]
        extra = []
        policy = get_dotted(yaml.safe_load(Path(path).read_text()), POLICY_ARGS) or {}
        if policy.get("name_or_path") and not Path(policy["name_or_path"]).exists():
            extra = ["--model.init_args.policy.init_args.tokenizer", "char"]  # the model does not exist yet
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            try:
                R1CLI(args=["-c", path, *extra], run=False)
            except UserError as err:
                raise PipelineError(f"stage {stage.name}: {err}", exit_code=2) from None
        log.info("%s: %s parses", stage.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1lightning pipeline", description="Run training stages in order (see r1lightning/pipeline/).")
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
        overrides = [parse_override(o) for o in args.override]
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
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()

