#!/usr/bin/env bash
# The README's quickstart tables: the whole pipeline for seeds 0 1 2, and stage 4 without general prompts (training seed only; the task's
# problems stay those of seed 0), then per stage the mean and the range of held-out accuracy and wall
# time, and the library versions they were measured with. About 13 min per seed on a quiet 2-core CPU (the pipeline ~11, the stage-4 ablation ~2).
#
#   bash scripts/pipeline_seeds.sh                 # seeds 0 1 2 under runs/quickstart/seeds/
#   SEEDS="0 1 2 3 4" bash scripts/pipeline_seeds.sh
#
# A finished seed is skipped on a re-run (the pipeline skips finished stages), so an interrupted
# sweep continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
ROOT=${ROOT:-runs/quickstart/seeds}
mkdir -p "$ROOT"
for seed in $SEEDS; do
    echo "== seed $seed" >&2
    # the pipeline, stage 4 without general prompts next to it, then the pipeline again (all stages
    # skipped) so that summary.{json,md} are the pipeline's
    for config in pipeline ablation_no_general pipeline; do
        r1lightning pipeline -c configs/quickstart/$config.yaml --run-dir "$ROOT/seed$seed" \
            --override "seed_everything=$seed" >> "$ROOT/seed$seed.log" 2>&1 || { tail -20 "$ROOT/seed$seed.log" >&2; exit 1; }
    done
done
runs=(); for seed in $SEEDS; do runs+=("$ROOT/seed$seed"); done
python scripts/stage4_compare.py "${runs[@]}" -o "$ROOT/stage4.png"
python - "$ROOT" $SEEDS <<'PY'
import json, platform, sys
from importlib.metadata import version

root, seeds = sys.argv[1], sys.argv[2:]
runs = [json.load(open(f"{root}/seed{s}/summary.json")) for s in seeds]
print(f"| # | stage | held-out accuracy, mean over seeds {', '.join(seeds)} (range) | wall, mean (range) |")
print("|---|---|---|---|")
for i, stage in enumerate(runs[0]["stages"]):
    acc = [100 * (r["stages"][i]["accuracy"] or 0.0) for r in runs]
    wall = [r["stages"][i]["wall_s"] for r in runs]
    print(f"| {i + 1} | {stage['stage']} | {sum(acc) / len(acc):.1f} % ({min(acc):.1f}–{max(acc):.1f}) "
          f"| {sum(wall) / len(wall):.0f} s ({min(wall):.0f}–{max(wall):.0f}) |")
total = [r["total_wall_s"] for r in runs]
print(f"\nTotal {sum(total) / len(total):.0f} s of stages per seed ({min(total):.0f}–{max(total):.0f}); "
      f"final model of seed {seeds[0]}: {runs[0].get('final_model')}")
libs = ["torch", "lightning", "transformers", "tokenizers", "datasets", "math-verify"]
print(f"Python {platform.python_version()}, " + ", ".join(f"{name} {version(name)}" for name in libs) + f", {platform.machine()}")
PY
