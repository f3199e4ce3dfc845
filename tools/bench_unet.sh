#!/bin/sh
# bench_unet.sh: one full-size SD1.5 UNet step, sdlora beside PyTorch, on
# the same inputs, the same weights and the same thread count (`make bench`).
#
#   tools/bench_unet.sh [BUILD_DIR]        (needs BUILD_DIR/bench_unet)
#
#   SDLORA_PY          python with torch, diffusers, transformers, peft
#                      (default /work/venv/bin/python, then python3); without
#                      one the benchmark is skipped with a message
#   SDLORA_BENCH_DIR   the random-weight SD1.5 model (default /tmp/sd15_random;
#                      tools/make_sd15_random.py makes it, about 2 GB, if absent)
#   SDLORA_BENCH_MODEL what the C side loads (default: the single file, and the
#                      diffusers folder if the single-file loader refuses it)
#   SDLORA_BENCH_REPS  timed runs after the warm-up (default 3; best is kept)
#   SDLORA_BENCH_TRAIN train (default) or train-ckpt (gradient checkpointing)
#   SDLORA_BENCH_TF    1 (default): also the LoRA training step with targets
#                      "transformer" at rank 16 (train-tf), both sides
#   SDLORA_BENCH_FP16  1 (default): also both steps with the UNet's weights
#                      held as fp16 (--weight-dtype fp16), beside the fp32 ones
#   SDLORA_BENCH_BF16  1 (default): also both steps with --compute bf16 (sdlora
#                      bf16 and fp32 alternating in one process) and PyTorch's
#                      CPU bf16 autocast, with each one's error against its fp32
#   OMP_NUM_THREADS    threads for both sides (default: every core)
#
# Each measurement runs in its own process, so each peak RSS is its own.
set -u
BUILD=${1:-build}
BIN=$BUILD/bench_unet
DIR=${SDLORA_BENCH_DIR:-/tmp/sd15_random}
TRAIN=${SDLORA_BENCH_TRAIN:-train}
export SDLORA_BENCH_REPS=${SDLORA_BENCH_REPS:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 1)}

PY=${SDLORA_PY:-}
if [ -z "$PY" ]; then
    if [ -x /work/venv/bin/python ]; then PY=/work/venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, diffusers, transformers, peft, safetensors" >/dev/null 2>&1; then
    echo "bench_unet: skipped: $PY cannot import torch, diffusers, transformers, peft and safetensors"
    echo "            (set SDLORA_PY=/path/to/python of a venv with tools/requirements.txt)"
    exit 0
fi
[ -x "$BIN" ] || { echo "error: $BIN: not built (run make bench)"; exit 1; }

if [ ! -f "$DIR/sd15_random.safetensors" ] || [ ! -f "$DIR/diffusers/unet/config.json" ]; then
    echo "== making the random-weight SD1.5 model in $DIR (once)"
    "$PY" tools/make_sd15_random.py "$DIR" || exit 1
fi
LOG=$DIR/bench
mkdir -p "$LOG"
rm -f "$LOG"/*.log
IN=$LOG/inputs.safetensors
"$PY" tools/bench_unet.py prepare "$DIR/diffusers" "$IN" 64 || exit 1

MODEL=${SDLORA_BENCH_MODEL:-$DIR/sd15_random.safetensors}

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')
load0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
echo "== UNet step: CPU $cpu, $OMP_NUM_THREADS threads, load average $load0 before"

run_c() {  # mode
    echo "-- sdlora $1 ($MODEL)"
    if ! "$BIN" "$MODEL" "$IN" "$LOG/c_$1.safetensors" "$1" "$SDLORA_BENCH_REPS" >"$LOG/c_$1.log" 2>&1; then
        cat "$LOG/c_$1.log"
        if [ -z "${SDLORA_BENCH_MODEL:-}" ] && [ "$MODEL" != "$DIR/diffusers" ] && grep -q "^error: $MODEL" "$LOG/c_$1.log"; then
            MODEL=$DIR/diffusers
            echo "   (the single file did not load: using the diffusers folder of the same weights)"
            run_c "$1"
            return
        fi
        return 1
    fi
    cat "$LOG/c_$1.log"
}
run_c16() {  # mode: the same with --weight-dtype fp16, compared with the fp32 run
    echo "-- sdlora $1, UNet weights held as fp16 ($MODEL)"
    if ! "$BIN" "$MODEL" "$IN" "$LOG/c16_$1.safetensors" "$1" "$SDLORA_BENCH_REPS" fp16 >"$LOG/c16_$1.log" 2>&1; then
        cat "$LOG/c16_$1.log"
        return 1
    fi
    cat "$LOG/c16_$1.log"
    "$PY" tools/bench_unet.py same "$LOG/c_$1.safetensors" "$LOG/c16_$1.safetensors" >"$LOG/same_$1.log" 2>&1
}
run_py() {  # mode
    echo "-- PyTorch $1"
    "$PY" tools/bench_unet.py "$1" "$DIR/diffusers" "$IN" "$LOG/py_$1.safetensors" >"$LOG/py_$1.log" 2>&1
    rc=$?
    grep -v -e 'it/s\]' -e '^$' "$LOG/py_$1.log"
    return $rc
}
run_cbf16() {  # mode: --compute bf16 and fp32, alternating in one process
    echo "-- sdlora $1, --compute bf16 beside fp32 ($MODEL)"
    "$BIN" "$MODEL" "$IN" "$LOG/cbf16_$1.safetensors" "$1" "$SDLORA_BENCH_REPS" fp32 bf16 >"$LOG/cbf16_$1.log" 2>&1
    rc=$?
    cat "$LOG/cbf16_$1.log"
    return $rc
}
run_pybf16() {  # mode: PyTorch under CPU bf16 autocast, and its error against its fp32 run
    echo "-- PyTorch $1, bf16 autocast"
    "$PY" tools/bench_unet.py "$1" "$DIR/diffusers" "$IN" "$LOG/pybf16_$1.safetensors" bf16 >"$LOG/pybf16_$1.log" 2>&1
    rc=$?
    grep -v -e 'it/s\]' -e '^$' "$LOG/pybf16_$1.log"
    [ -f "$LOG/py_$1.safetensors" ] && "$PY" tools/bench_unet.py l2 "$LOG/py_$1.safetensors" "$LOG/pybf16_$1.safetensors" "$1" >"$LOG/l2_$1.log" 2>&1
    return $rc
}

run_c infer
run_py infer
"$PY" tools/bench_unet.py compare "$LOG/c_infer.safetensors" "$LOG/py_infer.safetensors" >"$LOG/parity_infer.log" 2>&1
run_c "$TRAIN"
run_py train
"$PY" tools/bench_unet.py compare "$LOG/c_$TRAIN.safetensors" "$LOG/py_train.safetensors" >"$LOG/parity_train.log" 2>&1
if [ "${SDLORA_BENCH_TF:-1}" = 1 ]; then
    run_c train-tf
    run_py train-tf
    "$PY" tools/bench_unet.py compare "$LOG/c_train-tf.safetensors" "$LOG/py_train-tf.safetensors" train-tf >"$LOG/parity_train-tf.log" 2>&1
fi
if [ "${SDLORA_BENCH_FP16:-1}" = 1 ]; then
    run_c16 infer
    run_c16 "$TRAIN"
fi
if [ "${SDLORA_BENCH_BF16:-1}" = 1 ]; then
    run_cbf16 infer
    run_pybf16 infer
    run_cbf16 "$TRAIN"
    run_pybf16 train
    if [ "${SDLORA_BENCH_TF:-1}" = 1 ]; then
        run_cbf16 train-tf
        run_pybf16 train-tf
    fi
fi
load1=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)

echo
echo "== SD1.5 UNet, batch 1, 64x64 latents, t=500, context 77x768, float32 CPU"
echo "   CPU: $cpu; threads: $OMP_NUM_THREADS on both sides; best of $SDLORA_BENCH_REPS after a warm-up"
echo "   load average: $load0 before, $load1 after; sdlora loaded $MODEL"
"$PY" tools/bench_unet.py report "$LOG"/*.log
