#!/usr/bin/env bash
# Long reasoning on one GPU (issue 13, must-show 3): cold-start SFT then GRPO of a 126 M-parameter
# MoE (MegaBlocks experts, the StaticCacheSampler engine) on sums whose traces run 1,024-1,103 tokens.
#   bash scripts/gpu_long_reasoning.sh [OUTDIR]          # OUTDIR defaults to $OUT
# Writes to OUTDIR: long_sft_metrics.csv, long_grpo_metrics.csv (Lightning CSV logs), the GRPO
# evaluation reports (bench/), sampled completions, both logs, long_reasoning.png (reward, held-out
# accuracy, mean completion length), pick_checkpoint.json (the SFT checkpoint GRPO starts from) and summary.txt.
# Budget (configs/gpu/*.yaml): SFT <= 3 min 10 s of training, then the checkpoint pick (~2 min); GRPO <= 6.5 min
# of training. Extra CLI arguments per stage: SFT_ARGS="...", PICK_ARGS="...", GRPO_ARGS="...".
# The data and the exported models stay in WORK (default: runs/long_reasoning in the repository, git-
# ignored), not in OUTDIR. STAGES="sft" or STAGES="grpo" runs one stage (e.g. two calls of at most
# 10 minutes each; the GRPO stage needs the SFT export in the same WORK); default: both.
# Each stage fits one device call of 10 minutes (keep the machine warm between them):
#   STAGES=sft bash scripts/gpu_long_reasoning.sh $OUT;  STAGES=grpo bash scripts/gpu_long_reasoning.sh $OUT
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-/tmp/gpu_long_reasoning}}
work=${WORK:-$root/runs/long_reasoning}
stages=${STAGES:-sft grpo}
mkdir -p "$out" "$work"
cd "$work"
export R1L_LOG_LEVEL=${R1L_LOG_LEVEL:-INFO}

stage() {  # stage NAME CONFIG EXTRA_ARGS: run one `r1lightning fit`, time it, keep its CSV log
  local name=$1 config=$2 extra=$3 start end
  rm -rf "runs/gpu/$name"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of CLI arguments
  r1lightning fit -c "$root/configs/gpu/$config" $extra > "$out/$name.log" 2>&1 || {
    echo "$name failed; last lines of $out/$name.log:"; tail -n 30 "$out/$name.log"; return 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'$name wall {$end - $start:.1f} s')" | tee -a "$out/summary.txt"
  local log
  log=$(ls -d runs/gpu/$name/logs/version_* | tail -n 1)
  cp "$log/metrics.csv" "$out/${name}_metrics.csv"
  [ -f "$log/completions.csv" ] && cp "$log/completions.csv" "$out/${name}_completions.csv"
  [ -d "$log/bench" ] && cp -r "$log/bench" "$out/${name}_bench"
  return 0
}

: > "$out/summary.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$out/summary.txt" 2>/dev/null || true
if [[ " $stages " == *" sft "* ]]; then
  stage long_sft long_sft.yaml "${SFT_ARGS:-}"
  grep -o "policy: .*moe_backend=[a-z_]*" "$out/long_sft.log" | head -n 1 | tee -a "$out/summary.txt" || true
  # GRPO starts from a checkpoint inside SFT's accuracy jump (configs/gpu/long_sft.yaml says why)
  python3 "$root/scripts/pick_checkpoint.py" -c "$root/configs/gpu/long_sft.yaml" --checkpoints runs/gpu/long_sft/checkpoints \
    --export runs/gpu/long_sft/model --report "$out/pick_checkpoint.json" ${PICK_ARGS:-} 2>&1 | grep -v Warning | tee -a "$out/summary.txt"
fi
if [[ " $stages " != *" grpo "* ]]; then
  exit 0
fi
[ -f "$out/long_sft_metrics.csv" ] || cp "$(ls -d runs/gpu/long_sft/logs/version_* | tail -n 1)/metrics.csv" "$out/long_sft_metrics.csv"
stage long_grpo long_grpo.yaml "${GRPO_ARGS:-}"
grep -o "policy: .*moe_backend=[a-z_]*" "$out/long_grpo.log" | head -n 1 | tee -a "$out/summary.txt" || true

python3 - "$out" <<'PY' | tee -a "$out/summary.txt"
import csv, sys
out = sys.argv[1]
def rows(name):
    return list(csv.DictReader(open(f"{out}/{name}_metrics.csv")))
sft = [(int(r["step"]), float(r["val/accuracy"])) for r in rows("long_sft") if r.get("val/accuracy")]
print("SFT held-out accuracy (first 200 problems, greedy) by step:", ", ".join(f"{s}: {a:.3f}" for s, a in sft))
grpo = rows("long_grpo")
acc = [(int(r["step"]), float(r["bench/longsum/greedy"])) for r in grpo if r.get("bench/longsum/greedy")]
print("GRPO held-out accuracy (500 problems, greedy) by optimizer step (mu per batch):", ", ".join(f"{s}: {a:.3f}" for s, a in acc))
if len(acc) >= 2:
    print(f"GRPO change: {100 * (acc[-1][1] - acc[0][1]):+.1f} points ({acc[0][1]:.3f} -> {acc[-1][1]:.3f})")
def col(name):
    return [float(r[name]) for r in grpo if r.get(name)]
for name in ("train/reward", "train/completions/mean_length", "train/frac_reward_zero_std", "train/step_time",
             "train/time/rollout", "train/time/train"):
    v = col(name)
    if v:
        k = max(1, len(v) // 4)
        print(f"{name}: first quarter {sum(v[:k]) / k:.3f}, last quarter {sum(v[-k:]) / k:.3f} ({len(v)} values)")
PY
mu=$(python3 -c "import glob, sys, yaml; print(yaml.safe_load(open(sorted(glob.glob('runs/gpu/long_grpo/logs/version_*/hparams.yaml'))[-1]))['num_iterations'])" 2>/dev/null || echo 1)
python3 "$root/scripts/plot_long_reasoning.py" --sft "$out/long_sft_metrics.csv" --grpo "$out/long_grpo_metrics.csv" \
  --num-iterations "$mu" -o "$out/long_reasoning.png" || echo "plot failed (matplotlib missing?)"
