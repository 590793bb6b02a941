#!/usr/bin/env bash
# Quickstart SFT on one GPU with each MoE backend, same seeds: held-out accuracy must agree within noise.
#   bash scripts/gpu_quickstart_sft.sh [OUTDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-/tmp/gpu_quickstart_sft}}
mkdir -p "$out"
for seed in ${SEEDS:-0 1}; do
  for backend in grouped_mm megablocks; do
    run="$out/$backend-seed$seed"
    mkdir -p "$run"
    start=$(date +%s.%N)
    (cd "$run" && r1lightning fit -c "$root/configs/quickstart/sft.yaml" --seed_everything "$seed" --trainer.max_steps "${STEPS:-250}" \
        --trainer.accelerator gpu --trainer.precision bf16-true --trainer.enable_progress_bar false \
        --model.init_args.policy.init_args.moe_backend "$backend" \
        --model.init_args.policy.init_args.dtype bfloat16 > "$run/log.txt" 2>&1)
    end=$(date +%s.%N)
    acc=$(python3 - "$run" <<'PY'
import csv, glob, sys
rows = list(csv.DictReader(open(glob.glob(sys.argv[1] + "/runs/quickstart/sft/logs/version_*/metrics.csv")[0])))
vals = [r["val/accuracy"] for r in rows if r.get("val/accuracy")]
print(vals[-1])
PY
)
    backend_used=$(grep -o "moe_backend=[a-z_]*" "$run/log.txt" | head -1)
    printf "seed %s  %-10s  %s  val/accuracy %s  wall %.1f s\n" "$seed" "$backend" "$backend_used" "$acc" "$(python3 -c "print($end - $start)")"
  done
done
