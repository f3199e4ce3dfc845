#!/usr/bin/env bash
# tools/gpu_check.sh: the GPU path, checked and timed on a machine with an
# NVIDIA GPU (README "GPU"). Needs nvcc, the driver and nothing from the
# network (no Python: the SD1.5-architecture model is made in memory by
# tools/gpu_check.c). About 5 minutes on an H100/H200-class machine; each
# part has its own time limit, and the whole is meant to stay under 8.
#
#   1. build with CUDA=1 into build-cuda/ (native code for the GPU at hand)
#   2. test_cuda_host: the kernels' arithmetic on the host, the whole UNet on a
#      host-emulated device, and, with a GPU, every *_cuda function against
#      the CPU (make CUDA=1 test-cuda)
#   3. --device errors (tests/test_programs.c:test_device, the CUDA build)
#   4. models/tiny's UNet, VAE and text encoder, cuda against cpu (fp32 and fp16-held weights):
#      eps, LoRA dA/dB, dx, dctx; VAE mean, logvar, decoded image; CLIP context,
#      rel err <= 1e-4
#   5. ./train data/ --steps 20 --batch 1 --clip-grad 1, cpu and cuda: the two LoRAs within 1e-2
#      (batch 1: the CPU trainer's mse_loss_backward call is wrong above
#      batch 1, NOTES.md GPU section; the device's loss, clip and AdamW run)
#      (max |a - b| / max |b|; 20 AdamW steps amplify the last bits of the
#      gradients, so this is looser than one step's 1e-4), and the times
#      then --compute bf16 (cuda vs cpu bf16) and fp16 (cuda vs cpu fp32): within 5e-2 (the
#      cascade of rounding flips, cuda/test_cuda_host.cu), the loss-scale lines and peak_device_mb
#   6. ./sample on models/tiny, cpu and cuda: the times, and whether the
#      images are the same bytes (not required: the GPU sums in another order)
#   7. SD1.5's architecture with random weights: one training step at 16x16
#      latents against the CPU (1e-4), then at 64x64 (512^2) on the GPU: a
#      LoRA training step, the same with gradient checkpointing, a batch-2
#      inference forward (one cfg step), the step in --compute bf16 and fp16,
#      and the device memory in use and sdlora's counted peak
#
# Usage: bash tools/gpu_check.sh [OUT.txt]   (the report also goes to OUT.txt,
# default build-cuda/gpu_check.txt). Exit status 1 when a part failed.
set -u
cd "$(dirname "$0")/.." || exit 1
B=build-cuda
mkdir -p "$B"
REPORT=${1:-$B/gpu_check.txt}
T=$(mktemp -d /tmp/gpu_check.XXXXXX)
t_start=$(date +%s)
fails=0
exec > >(tee "$REPORT") 2>&1

part() { echo; echo "== $* ($(( $(date +%s) - t_start )) s)"; }
# run LIMIT_S LOG CMD...: CMD under a time limit, its output to LOG (- : here),
# then its time, and a FAILED line when it fails (counted in fails)
run() {
    local limit=$1 log=$2 t0 rc ms
    shift 2
    t0=$(date +%s%N)
    if [ "$log" = - ]; then timeout "$limit" "$@"; else timeout "$limit" "$@" > "$log" 2>&1; fi
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "   ($1: $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s, exit $rc)"
    if [ "$rc" -ne 0 ]; then
        [ "$rc" -eq 124 ] && echo "FAILED: $* (over its limit of $limit s)" || echo "FAILED: $* (exit $rc)"
        [ "$log" != - ] && tail -n 5 "$log"
        fails=$((fails + 1))
    fi
    return "$rc"
}

part "machine"
date -u '+%Y-%m-%d %H:%M UTC'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
nvcc --version | tail -n 2
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"

part "1. build (make CUDA=1 BUILD=$B, native code)"
run 300 - make -s -j"$(nproc)" CUDA=1 BUILD="$B" CUDA_ARCH="-arch=native" \
    "$B/train" "$B/sample" "$B/test_cuda_host" "$B/gpu_check" "$B/test_programs" || {
    echo "gpu_check: the build failed; nothing else can run"; exit 1; }

part "2. test_cuda_host (kernels on the host, the UNet on an emulated device, the *_cuda functions on the GPU)"
run 120 "$T/test_cuda_host.log" "./$B/test_cuda_host"
grep -v '^ok  ' "$T/test_cuda_host.log"

part "3. --device errors (test_programs, test_device)"
CK_RUN_CASE=test_device run 60 - "./$B/test_programs"

part "4. models/tiny UNet, VAE and text encoder, cuda against cpu"
run 120 - "./$B/gpu_check" tiny models/tiny/unet
run 60 - "./$B/gpu_check" tiny-vae-clip models/tiny

part "5. ./train data/ --steps 20 --batch 1 --clip-grad 1: cpu, then cuda"
for dev in cpu cuda; do
    run 240 "$T/train-$dev.log" "./$B/train" data/ --steps 20 --batch 1 --clip-grad 1 --no-grid --device "$dev" --out "$T/train-$dev"
    grep -E '^(device|summary|error)' "$T/train-$dev.log"
done
run 30 - "./$B/gpu_check" cmp-lora "$T/train-cuda/lora.safetensors" "$T/train-cpu/lora.safetensors" 1e-2
# the text encoder (--te) and conv LoRA (--conv-rank) trained on the device too
for dev in cpu cuda; do
    run 240 "$T/train-te-$dev.log" "./$B/train" data/ --steps 10 --batch 1 --clip-grad 1 --te --conv-rank 2 --no-grid \
        --device "$dev" --out "$T/train-te-$dev"
    grep -E '^(device|summary|error)' "$T/train-te-$dev.log"
done
run 30 - "./$B/gpu_check" cmp-lora "$T/train-te-cuda/lora.safetensors" "$T/train-te-cpu/lora.safetensors" 1e-2
# mixed precision on the GPU: bf16 against the CPU's --compute bf16, fp16 (loss scaling) against fp32
for c in bf16 fp16; do
    d=cpu; [ "$c" = fp16 ] && d=none
    [ "$d" = cpu ] && run 240 "$T/train-cpu-$c.log" "./$B/train" data/ --steps 20 --batch 1 --clip-grad 1 --no-grid \
        --device cpu --compute "$c" --out "$T/train-cpu-$c"
    run 240 "$T/train-cuda-$c.log" "./$B/train" data/ --steps 20 --batch 1 --clip-grad 1 --no-grid --device cuda \
        --compute "$c" --out "$T/train-cuda-$c"
    grep -E '^(step .*overflowed|summary|error)' "$T/train-cuda-$c.log"
done
run 30 - "./$B/gpu_check" cmp-lora "$T/train-cuda-bf16/lora.safetensors" "$T/train-cpu-bf16/lora.safetensors" 5e-2
run 30 - "./$B/gpu_check" cmp-lora "$T/train-cuda-fp16/lora.safetensors" "$T/train-cpu/lora.safetensors" 5e-2

part "6. ./sample on models/tiny: cpu, then cuda"
for dev in cpu cuda; do
    run 120 "$T/sample-$dev.log" "./$B/sample" --model models/tiny --prompt "a red circle" --steps 20 --seed 3 \
        --device "$dev" --out "$T/sample-$dev.png"
    tail -n 2 "$T/sample-$dev.log"
done
if cmp -s "$T/sample-cpu.png" "$T/sample-cuda.png"; then echo "   the two images: the same bytes"
else echo "   the two images differ (in $T/sample-cpu.png, $T/sample-cuda.png)"; fi

part "7. SD1.5 architecture, random weights: 16x16 against the CPU, then 512^2 on the GPU"
run 240 - "./$B/gpu_check" sd15 16

part "8. CUDA + MPI: 2 ranks summing over NCCL (skips with fewer than 2 GPUs or no mpirun)"
run 300 - bash tools/gpu_check_mpi.sh

part "done"
echo "total $(( $(date +%s) - t_start )) s; $fails part(s) failed; report in $REPORT; outputs in $T"
[ "$fails" -eq 0 ]
