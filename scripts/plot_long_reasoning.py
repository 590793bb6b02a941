"""Plot a long-reasoning run (scripts/gpu_long_reasoning.sh): GRPO training reward, held-out greedy
accuracy (the SFT's validations, then GRPO's evaluations) and mean completion length, from the two
CSV logs.

    python scripts/plot_long_reasoning.py --sft long_sft_metrics.csv --grpo long_grpo_metrics.csv -o long.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_metrics import read_series  # noqa: E402

ACCURACY = "bench/longsum/greedy"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpo", type=Path, required=True, help="metrics.csv of the GRPO run")
    parser.add_argument("--sft", type=Path, default=None, help="metrics.csv of the SFT run (its val/accuracy)")
    parser.add_argument("--accuracy-column", default=ACCURACY, help="the GRPO run's held-out accuracy column")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window for reward and length")
    parser.add_argument("--num-iterations", type=int, default=1,
                        help="GRPO's mu: training metrics are logged per batch, evaluations per optimizer step")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG path")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_a, ax_l) = plt.subplots(1, 3, figsize=(13, 3.8))
    steps, reward = read_series(args.grpo, "train/reward", args.smooth)
    ax_r.plot(steps, reward, color="tab:blue")
    ax_r.set_title(f"GRPO training reward (moving average of {args.smooth})")
    ax_r.set_xlabel("GRPO batch")

    # SFT validations at negative steps, so both stages share one axis ending at GRPO's last step.
    if args.sft is not None:
        s_steps, s_acc = read_series(args.sft, "val/accuracy")
        if s_steps:
            last = s_steps[-1]
            ax_a.plot([s - last for s in s_steps], s_acc, "s-", color="tab:gray", label="cold-start SFT (200 problems)")
    g_steps, g_acc = read_series(args.grpo, args.accuracy_column)
    g_steps = [s / args.num_iterations for s in g_steps]  # optimizer steps -> batches
    ax_a.plot(g_steps, g_acc, "o-", color="tab:orange", label="GRPO (500 problems)")
    ax_a.axvline(0, color="k", lw=0.5)
    ax_a.set_ylim(0, 1)
    ax_a.set_title("held-out accuracy (greedy)")
    ax_a.set_xlabel("SFT step (< 0), GRPO batch (> 0)")
    ax_a.legend(loc="upper left", fontsize=8)

    l_steps, length = read_series(args.grpo, "train/completions/mean_length", args.smooth)
    ax_l.plot(l_steps, length, color="tab:green")
    ax_l.set_title("mean completion length (tokens)")
    ax_l.set_xlabel("GRPO batch")
    for ax in (ax_r, ax_a, ax_l):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(args.output)
    return args.output


if __name__ == "__main__":
    main()
