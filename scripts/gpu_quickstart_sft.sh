#!/usr/bin/env bash
# Quickstart SFT on one GPU with each MoE backend, same seeds: held-out accuracy must agree within noise.
#   STEPS=500 SEEDS="0 1 2" bash scripts/gpu_quickstart_sft.sh [OUTDIR]
# The runs are launched side by side (the model is tiny: each run is bound by Python on one CPU core,
# not by the GPU), so wall times are indicative only; accuracy is what this compares.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-/tmp/gpu_quickstart_sft}}
mkdir -p "$out"
runs=()
for seed in ${SEEDS:-0 1}; do
  for backend in grouped_mm megablocks; do
    run="$out/$backend-seed$seed"
    runs+=("$seed $backend $run")
    mkdir -p "$run"
    (
      start=$(date +%s.%N)
      cd "$run" && r1lightning fit -c "$root/configs/quickstart/sft.yaml" --seed_everything "$seed" \
        --trainer.max_steps "${STEPS:-250}" --trainer.accelerator "${ACCEL:-gpu}" --trainer.precision bf16-true \
        --trainer.enable_progress_bar false --model.init_args.policy.init_args.moe_backend "$backend" \
        --model.init_args.policy.init_args.dtype bfloat16 > "$run/log.txt" 2>&1
      python3 -c "import time; print(time.time() - $start)" > "$run/wall.txt"
    ) &
  done
done
wait
for entry in "${runs[@]}"; do
  read -r seed backend run <<< "$entry"
  acc=$(python3 - "$run" 2>/dev/null <<'PY'
import csv, glob, sys
rows = list(csv.DictReader(open(glob.glob(sys.argv[1] + "/runs/quickstart/sft/logs/version_*/metrics.csv")[0])))
print([r["val/accuracy"] for r in rows if r.get("val/accuracy")][-1])
PY
  ) || acc="failed: $(tail -n 1 "$run/log.txt")"
  used=$(grep -o "policy: .*moe_backend=[a-z_]*" "$run/log.txt" | grep -o "moe_backend=[a-z_]*" | head -1)
  printf "seed %s  %-10s  %s  val/accuracy %s  wall %.1f s\n" "$seed" "$backend" "$used" "$acc" "$(cat "$run/wall.txt" 2>/dev/null || echo 0)"
done
