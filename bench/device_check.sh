#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine (about 8 minutes on one H200), each logged under $WORK;
# the times are estimates (no GPU has run the whole script yet):
#   versions       torch, CUDA device, timm, transformers, pillow as the machine has them             ~10 s
#   cuda_tests     the tests marked `cuda` (features vs CPU, bf16 steps, the tiled loss vs dense)     ~45 s
#   data           the built-in data set, small scale                                                 ~20 s
#   train_nccl     3 epochs of the tiny model on the built-in data in bf16 through torchrun (NCCL,    ~75 s
#                  DDP, pinned memory, loader workers, zero-shot validation each epoch)
#   train_fp16     1 epoch in fp16 with the GradScaler                                                ~30 s
#   zeroshot       evaluate.py on the trained checkpoint (bf16 by default on CUDA)                    ~20 s
#   gpu_bench      bench/gpu.py: Swin-T at the largest batch that fits, images/s, peak memory, MFU    ~90 s
#   train_step     bench/train_step.py --quick --device cuda: the CUDA rows of the train-step table   ~60 s
#                  (bf16, fused AdamW where utils/optim.py builds it); the CPU rows are measured on the
#                  project's own machine, not here
#   train_compile  bench/train_step.py --compile --quick --device cuda: each config eager and with   ~120 s
#                  TRAIN.COMPILE (inductor), bf16: first step (the compilation) and steady images/s;
#                  stopped after COMPILE_LIMIT seconds, so a slow compilation cannot take the run's time
#   jpeg_region  python -m data.jpeg_region: builds the C helper (crop-region JPEG decode, resize, affine, lookup)  ~2 s
#   gpu_decode   bench/data_loading.py --jpeg --decode-device cpu cuda: loader images/s at 4 and 8 workers with
#                DATA.DECODE_DEVICE cpu vs cuda (nvJPEG batches, data/gpu_decode.py), to set against train_step
# All steps come to about 10-11 minutes by these estimates, past one device call's 600 s: run them as two
# calls on the same warm machine (the second keeps the first's data and logs; each returns its summary).
#
#   bash bench/device_wheels.sh                                        # here, once: wheels into .whl/
#   run(command="ONLY='cuda_tests data train_nccl train_fp16 zeroshot gpu_bench' bash bench/device_check.sh",
#       carry=[".whl"], timeout_s=540)
#   run(command="ONLY='train_step train_compile jpeg_region gpu_decode' bash bench/device_check.sh", carry=[".whl"],
#       timeout_s=540)
#
# Everything is written under WORK (default /tmp/device_check); OUT (default output/device_check) receives
# summary.txt and device_check.tar.gz (the logs, JSON results and tensorboard events, no checkpoints), as the
# device tool returns only a few files. PY defaults to python3. SMOKE=1 runs the same steps on a CPU in a few
# minutes (gpu.py on the tiny config), to check the script before spending device time. ONLY='data train_nccl'
# runs just the named steps, for a second try at what failed; train_* and zeroshot need the data, zeroshot
# the bf16 run's checkpoint, from this call or an earlier one on the same (still warm) machine.
set -uo pipefail
OUT=${OUT:-output/device_check}
PY=${PY:-python3}
WORK=${WORK:-/tmp/device_check}
export PYTHONUNBUFFERED=1 BENCH_RESULTS=$WORK
[ -z "${ONLY:-}" ] && rm -rf "$WORK"  # a retry of some steps keeps what the run before left (data, checkpoints)
mkdir -p "$OUT" "$WORK" && : > "$WORK/summary.txt"
DATA=$WORK/data
GPU_BENCH_ARGS=()
STEP_ARGS=(--device cuda)
COMPILE_LIMIT=240  # seconds; a compilation that takes longer is reported as a timeout (exit 124)
if [ "${SMOKE:-0}" = 1 ]; then
    GPU_BENCH_ARGS=(--device cpu --config unicl_tiny --batch 4 --steps 2)
    # The CPU rows of the tiny config only: inductor compiles Swin-T for many minutes on a small CPU.
    STEP_ARGS=(--device cpu --config unicl_tiny)
    COMPILE_LIMIT=900
fi

if [ -d .whl ] && compgen -G '.whl/*.whl' > /dev/null; then  # the requirements the machine's image lacks
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device_site \
        .whl/*.whl || { echo 'installing .whl/ failed' | tee "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH=/tmp/device_site${PYTHONPATH:+:$PYTHONPATH}
fi

run() {  # name, command...: log to $WORK/name.log, record the exit code and time, keep going
    local name=$1; shift
    [ -n "${ONLY:-}" ] && [ "$name" != versions ] && [[ " $ONLY " != *" $name "* ]] && return
    local start=$SECONDS
    "$@" > "$WORK/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$WORK/summary.txt"
}
run versions $PY -c '
import PIL, timm, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} ({gpu}), timm {timm.__version__}, transformers {transformers.__version__}, "
      f"pillow {PIL.__version__}")'
cat "$WORK/versions.log" >> "$WORK/summary.txt"
run cuda_tests $PY -m pytest -q -rs -p no:cacheprovider -m cuda tests/
run data $PY -m data.builtin --out $DATA --scale small
run train_nccl $PY -m torch.distributed.run --standalone --nproc_per_node 1 main.py \
    --cfg configs/unicl_tiny_builtin.yaml --data-path $DATA --output "$WORK/runs" --tag bf16 \
    --opts TRAIN.EPOCHS 3 AMP_OPT_LEVEL O1 DATA.NUM_WORKERS 8
run train_fp16 $PY main.py --cfg configs/unicl_tiny_builtin.yaml --data-path $DATA --output "$WORK/runs" --tag fp16 \
    --opts TRAIN.EPOCHS 1 AMP_OPT_LEVEL fp16 DATA.NUM_WORKERS 8
run zeroshot $PY evaluate.py zeroshot --cfg configs/unicl_tiny_builtin.yaml --data-path $DATA/zeroshot \
    --resume "$(ls "$WORK"/runs/unicl_tiny/bf16/checkpoint_*.pth 2>/dev/null | tail -n 1)" \
    --output "$WORK/zeroshot"
run gpu_bench $PY bench/gpu.py "${GPU_BENCH_ARGS[@]}"
run train_step $PY bench/train_step.py --quick "${STEP_ARGS[@]}"
run train_compile timeout $COMPILE_LIMIT $PY bench/train_step.py --compile --quick "${STEP_ARGS[@]}"
DECODE_ARGS=(--workers 4 8 --count 800 --samples 512 --repeats 1)  # ~15 s of it generating the JPEGs
[ "${SMOKE:-0}" = 1 ] && DECODE_ARGS=(--workers 1 --count 200 --samples 64 --batch 32 --repeats 1)
run jpeg_region $PY -m data.jpeg_region  # the C helper for the cpu rows; exit 1: Pillow decodes and resizes
run gpu_decode $PY bench/data_loading.py --jpeg --jpeg-data "$DATA/jpeg_bench" --decode-device cpu cuda "${DECODE_ARGS[@]}"
{  # steps that did not run leave no logs: their lines are left out
    grep -h "zero-shot on\|epoch .* done\|Traceback\|Error" "$WORK/train_nccl.log" "$WORK/train_fp16.log" 2>/dev/null | tail -12
    tail -n 3 "$WORK/zeroshot.log" 2>/dev/null
    grep -h -A 2 '^| config' "$WORK/gpu_bench.log" 2>/dev/null  # the MFU table
    grep -h '^|' "$WORK/train_step.log" "$WORK/train_compile.log" 2>/dev/null
    grep -h "^training JPEGs\|^| train" "$WORK/gpu_decode.log" 2>/dev/null
} >> "$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/"
tar -czf "$OUT/device_check.tar.gz" -C "$WORK" --exclude='*.pth' --exclude=data .
cat "$OUT/summary.txt"
