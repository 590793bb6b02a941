"""Stage 4 with and without general prompts, over seeds: the README's stage-4 table and plot.

Each run dir holds one seed's quickstart pipeline with both versions of stage 4 next to each other:
`grpo_all` (arithmetic + general instructions scored by the reward model) and `grpo_reasoning_only`
(the same stage with `general_fraction: 0`, 16 arithmetic prompts per step as in the mixed stage).

    python scripts/stage4_compare.py runs/quickstart/seeds/seed{0,1,2} -o docs/stage4_seeds.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def stage(run: Path, name: str) -> dict:
    done = json.loads((run / name / "DONE").read_text())
    evals = json.loads((run / name / "general_eval.json").read_text())
    return {"accuracy": 100 * done["metrics"]["accuracy"], "wall_s": done["wall_s"], "evals": evals}


def score(evals: list[dict], key: str, at: int) -> tuple[float, float]:
    return evals[at][key], evals[at][key + "/sem"]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f} to {max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--with-general", default="grpo_all")
    ap.add_argument("--without-general", default="grpo_reasoning_only")
    ap.add_argument("--score", default="val/general/helpfulness", help="the reward model's held-out score")
    ap.add_argument("-o", "--plot", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    for run in args.runs:
        before = json.loads((run / "rejection_sft" / "DONE").read_text())["metrics"]["accuracy"] * 100
        mixed, alone = stage(run, args.with_general), stage(run, args.without_general)
        rows.append({"run": run.name, "before": before, "mixed": mixed, "alone": alone})

    k = args.score
    print(f"| seed run | arithmetic before stage 4 | after, with general prompts | after, arithmetic only | "
          f"`{k}` start → end, with general prompts (± s.e.) | end, arithmetic only |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s0, e0 = score(r["mixed"]["evals"], k, 0)
        s1, e1 = score(r["mixed"]["evals"], k, -1)
        a1, ae1 = score(r["alone"]["evals"], k, -1)
        print(f"| {r['run']} | {r['before']:.1f} % | {r['mixed']['accuracy']:.1f} % | {r['alone']['accuracy']:.1f} % | "
              f"{s0:.3f} ± {e0:.3f} → {s1:.3f} ± {e1:.3f} | {a1:.3f} ± {ae1:.3f} |")
    diff = [r["mixed"]["accuracy"] - r["alone"]["accuracy"] for r in rows]
    rise = [score(r["mixed"]["evals"], k, -1)[0] - score(r["mixed"]["evals"], k, 0)[0] for r in rows]
    rise_alone = [score(r["alone"]["evals"], k, -1)[0] - score(r["alone"]["evals"], k, 0)[0] for r in rows]
    print(f"\nArithmetic accuracy, with minus without general prompts: mean {statistics.mean(diff):+.1f} points "
          f"(per seed {', '.join(f'{d:+.1f}' for d in diff)}).")
    print(f"Reward-model score rise on held-out instructions: with general prompts {spread(rise)}; arithmetic only "
          f"{spread(rise_alone)} (mean over seeds, range).")
    print(f"Stage-4 wall time: with {statistics.mean(r['mixed']['wall_s'] for r in rows):.0f} s, without "
          f"{statistics.mean(r['alone']['wall_s'] for r in rows):.0f} s (mean; machine load as it was).")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        x = range(len(rows))
        left.bar([i - 0.2 for i in x], [r["mixed"]["accuracy"] for r in rows], 0.4, label="with general prompts")
        left.bar([i + 0.2 for i in x], [r["alone"]["accuracy"] for r in rows], 0.4, label="arithmetic only")
        left.scatter(list(x), [r["before"] for r in rows], color="k", marker="_", s=300, label="before stage 4", zorder=3)
        left.set_xticks(list(x), [r["run"] for r in rows])
        left.set_ylabel("held-out arithmetic accuracy (%)")
        left.set_ylim(min(r["before"] for r in rows) - 10, 100)
        left.legend(fontsize=8, loc="lower right")
        for r, color in zip(rows, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for part, style in (("mixed", "-"), ("alone", ":")):
                ev = r[part]["evals"]
                right.errorbar([e["step"] for e in ev], [e[k] for e in ev], yerr=[e[k + "/sem"] for e in ev], ls=style,
                               color=color, marker="o", ms=3, capsize=2,
                               label=f"{r['run']}, {'with general' if part == 'mixed' else 'arithmetic only'}")
        right.set_xlabel("stage-4 step")
        right.set_ylabel("reward-model score, 32 held-out instructions")
        right.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
