"""Plot a run's reward and held-out accuracy over steps from Lightning's CSV log.

    python scripts/plot_metrics.py runs/quickstart/grpo/logs/version_0/metrics.csv -o docs/quickstart_grpo.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_series(path: Path, column: str, smooth: int = 1) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(column):
                steps.append(int(row["step"]))
                values.append(float(row[column]))
    if smooth > 1 and values:
        # Trailing moving average: the per-step reward of 128 samples is noisy.
        values = [sum(values[max(0, i - smooth + 1) : i + 1]) / min(smooth, i + 1) for i in range(len(values))]
    return steps, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="metrics.csv written by CSVLogger")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: next to metrics.csv)")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window for the reward")
    parser.add_argument("--start-accuracy", type=float, default=None, help="held-out accuracy before training (plotted at step 0)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, reward = read_series(args.metrics, "train/reward", args.smooth)
    if reward:
        ax.plot(steps, reward, label=f"train reward (moving average of {args.smooth})", color="tab:blue")
    vsteps, acc = read_series(args.metrics, "val/accuracy")
    if args.start_accuracy is not None:
        vsteps, acc = [0] + vsteps, [args.start_accuracy] + acc
    if acc:
        ax.plot(vsteps, acc, "o-", label="held-out accuracy (greedy)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(args.metrics.parent.parent.parent.name or "run")
    out = args.output or args.metrics.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
