#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine (about 8 minutes on one H100/H200): the CUDA-marked
# tests, 3 epochs of bf16 training of the tiny model on the built-in data (CUDA + NCCL code path, with
# zero-shot validation), bench/gpu.py, and the train-step benchmark's CUDA rows. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out PY=python3 bash bench/device_check.sh
#
# The project's packages must be importable by $PY (on a bare machine: carry wheels, see the device tool).
set -uo pipefail
OUT=${OUT:-output/device_check}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
run() {  # name, command...: log to $OUT/name.log, record the exit code, keep going
    local name=$1; shift
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}
$PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$OUT/summary.txt"
run cuda_tests $PY -m pytest -q -m cuda tests/
run data $PY -m data.builtin --out /tmp/device_demo_data --scale small
run train $PY main.py --cfg configs/unicl_tiny_builtin.yaml --data-path /tmp/device_demo_data \
    --output "$OUT/train" --opts TRAIN.EPOCHS 3 AMP_OPT_LEVEL O1 DATA.NUM_WORKERS 8
run gpu_bench $PY bench/gpu.py
run train_step_bench $PY bench/train_step.py --quick
cp bench/results/gpu.json bench/results/train_step.json "$OUT/" 2>/dev/null
grep -h "zero-shot on\|epoch .* done" "$OUT/train.log" | tail -6 >> "$OUT/summary.txt"
tail -4 "$OUT/gpu_bench.log" >> "$OUT/summary.txt"
