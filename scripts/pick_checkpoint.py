"""Export the SFT checkpoint whose held-out accuracy falls in a band (issue 13's learning run).

SFT learns the long sums of configs/gpu/long_sft.yaml in a jump: 0 % greedy accuracy one validation, 99 %
a hundred steps later (an exact 1,000-token answer needs a per-token error below ~0.25 %). GRPO can only
show what it adds from a start inside that jump, and where the jump falls moves between runs. So the SFT
run saves weights every few steps, and this script bisects those checkpoints (accuracy rises with the
step across the jump) for one with `--low` <= accuracy <= `--high`, using the run's own validation
(`trainer.validate`, greedy, `--max-val-samples` held-out problems), and exports it for GRPO.

  python scripts/pick_checkpoint.py -c configs/gpu/long_sft.yaml --checkpoints runs/gpu/long_sft/checkpoints \
      --export runs/gpu/long_sft/model --report $OUT/pick.json

Exit 1 with one line when no checkpoint lands in the band (the evaluated steps and accuracies are in the
report either way).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `*step=N*.ckpt` in `directory`, by step."""
    found = []
    for path in directory.glob("*.ckpt"):
        match = re.search(r"step=(\d+)", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def bisect_band(steps: list, accuracy_of, low: float, high: float) -> tuple[int | None, dict]:
    """Index into `steps` of an entry with low <= accuracy <= high, assuming accuracy rises with the
    index; None if the bisection closes without one. Returns it and {step: accuracy} of what it evaluated."""
    seen = {}
    lo, hi = 0, len(steps) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        acc = seen[steps[mid]] = accuracy_of(steps[mid])
        if acc < low:
            lo = mid + 1
        elif acc > high:
            hi = mid - 1
        else:
            return mid, seen
    return None, seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, action="append", help="the SFT run's config(s) (model, data, validation)")
    parser.add_argument("--checkpoints", required=True, type=Path, help="directory of the run's step=N checkpoints")
    parser.add_argument("--low", type=float, default=0.15)
    parser.add_argument("--high", type=float, default=0.6)
    parser.add_argument("--max-val-samples", type=int, default=200)
    parser.add_argument("--export", required=True, type=Path, help="save_pretrained directory to write")
    parser.add_argument("--report", type=Path, help="JSON with every evaluated step and the pick")
    args = parser.parse_args(argv)
    if not 0.0 <= args.low <= args.high <= 1.0:
        parser.error("need 0 <= --low <= --high <= 1")

    ckpts = checkpoint_steps(args.checkpoints)
    if not ckpts:
        sys.exit(f"pick_checkpoint: no step=N .ckpt files in {args.checkpoints}")

    from r1lightning.export import export_checkpoint
    from r1lightning.lightning_cli import R1CLI

    configs = [arg for path in args.config for arg in ("-c", path)]
    cli = R1CLI(args=[*configs, "--data.init_args.max_val_samples", str(args.max_val_samples),
                      "--trainer.logger", "false", "--trainer.limit_val_batches", "1.0"], run=False)  # fmt: skip
    paths = dict(ckpts)

    def accuracy_of(step: int) -> float:
        start = time.perf_counter()
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(paths[step]), verbose=False)[0]
        acc = float(metrics["val/accuracy"])
        print(f"step {step}: held-out accuracy {acc:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
        return acc

    index, seen = bisect_band([s for s, _ in ckpts], accuracy_of, args.low, args.high)
    report = {"band": [args.low, args.high], "max_val_samples": args.max_val_samples, "evaluated": seen,
              "checkpoints": [s for s, _ in ckpts], "picked": None}  # fmt: skip
    if index is not None:
        step = ckpts[index][0]
        export_checkpoint(paths[step], args.export)
        report["picked"] = {"step": step, "accuracy": seen[step], "export": str(args.export)}
        print(f"picked step {step} ({seen[step]:.3f}) -> {args.export}")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1))
    if index is None:
        sys.exit(f"pick_checkpoint: no checkpoint in {args.checkpoints} with held-out accuracy in "
                 f"[{args.low}, {args.high}]; evaluated {seen}")  # fmt: skip


if __name__ == "__main__":
    main()
