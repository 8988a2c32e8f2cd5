#!/usr/bin/env bash
# Every stage-two GPU figure in one device call, written to $OUT (issue 11):
#   train.json   steps vs the Adam-only floor at batch 8..2048, before/after, CUDA graph vs eager parity,
#                the epoch profile (syncs, launches, top kernels), the released approach's step
#   zen_best.json  ZEN-sized job (15,780 spots, 3 folds x 200 epochs, validation every epoch, no early stop)
#                at the best batch, folds side by side as the scheduler decides and one at a time
#   zen_b8.json  the same job at batch 8, last, with whatever time is left (cut jobs keep their epoch logs)
#   logs/        every fold's run.json / log.json / metrics.json;  *.log: the printed tables
#
# Here, once per checkout:   bash ../shared/gpu/wheels.sh
# Device call (carry .whl):  bash benchmarks/gpu_all.sh
# CPU smoke test:            TINY=1 DEVICE=cpu ZEN_EPOCHS=2 ZEN_SPOTS=600 PYTHON=.venv/bin/python OUT=/tmp/gpu-all \
#                            bash benchmarks/gpu_all.sh
# Knobs: BUDGET_S (whole script, default 560), ZEN_EPOCHS (200), ZEN_SPOTS (15780), TINY=1, DEVICE (cuda), PYTHON.
set -u
PY=${PYTHON:-python3}
if ! $PY -c "import zarr, typer" 2>/dev/null && [ -f .whl/gpu-run.sh ] && [ -z "${NH2ST_GPU_ALL:-}" ]; then
  NH2ST_GPU_ALL=1 exec bash .whl/gpu-run.sh bash "$0" "$@"
fi
OUT=${OUT:-out}
DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-560}
ZEN_EPOCHS=${ZEN_EPOCHS:-200}
ZEN_SPOTS=${ZEN_SPOTS:-15780}
WORK=$(mktemp -d)
mkdir -p "$OUT/logs"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
if [ -n "${TINY:-}" ]; then
  SMALL=(--tiny --spots 300 --batch-sizes 8 32 --steps 12 --adam-steps 4 --legacy-steps 6 --profile-steps 6)
else
  SMALL=()
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/device.txt"

# 1. steps, parity, profile, released (about 2 minutes on an H100)
timeout -s INT -k 20 $(( $(left) - 30 )) $PY benchmarks/train.py --device "$DEVICE" --parts steps,parity,profile,released \
  "${SMALL[@]}" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"
BEST=$($PY -c "import json; print(json.load(open('$OUT/train.json')).get('steps', {}).get('best_batch', 512))" 2>/dev/null || echo 512)

# 2. the ZEN-sized job at the best batch: scheduler (folds side by side) and one fold at a time
zen() {  # zen <json> <seconds> <batch> [extra args]
  local json=$1 seconds=$2 batch=$3; shift 3
  [ "$seconds" -gt 20 ] || { echo "no time left for $json" | tee -a "$OUT/zen.log"; return; }
  timeout -s INT -k 20 "$seconds" $PY benchmarks/train.py --device "$DEVICE" --parts zen "${SMALL[@]}" --zen-spots "$ZEN_SPOTS" \
    --zen-epochs "$ZEN_EPOCHS" --zen-batch-sizes "$batch" --out-dir "$WORK" --json "$json" "$@" 2>&1 | tee -a "$OUT/zen.log"
}
zen "$OUT/zen_best.json" $(( $(left) / 3 )) "$BEST" --zen-compare-sequential

# 3. the ZEN-sized job at batch 8 with the rest of the time (unless 8 was the best batch)
[ "$BEST" = 8 ] || zen "$OUT/zen_b8.json" $(( $(left) - 15 )) 8

# fold logs of every job, finished or cut (checkpoints stay behind: they are large)
( cd "$WORK" && find . -path '*zen-runs*' \( -name log.json -o -name run.json -o -name metrics.json \) \
    -exec cp --parents {} "$OUT/logs/" \; ) 2>/dev/null
rm -rf "$WORK"
echo "gpu_all: $(( $(date +%s) - start )) s" | tee "$OUT/done.txt"
