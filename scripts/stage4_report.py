"""What stage 4 of a quickstart pipeline run did: held-out arithmetic accuracy, the reward model's
score on held-out general prompts at the start and end (± standard error), and the reward-hacking
metrics averaged over the first and last `window` steps.

    python scripts/stage4_report.py runs/quickstart/pipeline [--stage grpo_all] [--window 20]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--stage", default="grpo_all")
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args()
    stage = Path(args.run_dir) / args.stage
    done = json.loads((stage / "DONE").read_text())
    print(f"{args.stage}: held-out arithmetic accuracy {done['metrics'].get('accuracy')}, wall {done['wall_s']:.0f} s")
    evals = json.loads((stage / "general_eval.json").read_text())
    for key in sorted(k for k in evals[0] if k.startswith("val/general/") and not k.endswith("/sem")):
        first, last = evals[0], evals[-1]
        print(f"{key}: step {first['step']} {first[key]:.4f} ± {first[key + '/sem']:.4f} -> step {last['step']} {last[key]:.4f} ± {last[key + '/sem']:.4f}"
              f" (change {last[key] - first[key]:+.4f})")
    logs = sorted(stage.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return
    rows = [r for r in csv.DictReader(open(logs[-1])) if any(k.startswith("train/kinds/") and v for k, v in r.items())]
    keys = sorted({k for r in rows for k, v in r.items() if v and (k.startswith("train/kinds/") or k.startswith("train/corr/"))})
    w = args.window

    def mean(part, k):
        vals = [float(r[k]) for r in part if r.get(k)]
        return sum(vals) / len(vals) if vals else float("nan")

    print(f"training metrics, mean of the first / last {w} steps:")
    for k in keys:
        print(f"  {k}: {mean(rows[:w], k):.4f} -> {mean(rows[-w:], k):.4f}")


if __name__ == "__main__":
    main()
