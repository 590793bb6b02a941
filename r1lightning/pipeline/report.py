"""The pipeline's report: held-out accuracy per stage from each stage's `StageReport` and CSV log,
as `summary.md` (a table), `summary.json` and `summary.png` (accuracy over the stages, end to end)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from r1lightning.files import atomic_write_text
from r1lightning.pipeline.spec import Pipeline

log = logging.getLogger("r1lightning.pipeline")

_METRIC = "val/accuracy"


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
        source = pipeline.model_source(i) or "config"
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

