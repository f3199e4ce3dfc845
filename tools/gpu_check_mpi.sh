#!/usr/bin/env bash
# tools/gpu_check_mpi.sh: on a machine with 2 or more GPUs, the CUDA + MPI
# build (make CUDA=1 MPI=1) sums the gradients over NCCL, one GPU per rank,
# and must write the same LoRA bytes as one process with --accum 2 (and as
# the same 2 ranks summing over MPI). Skips, saying so, with fewer GPUs:
# NCCL refuses two ranks on one GPU.
set -u
cd "$(dirname "$0")/.."
# the LoRA metadata records when a run began: fixed, so the files compare byte for byte
export SOURCE_DATE_EPOCH=1700000000
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$n" -lt 2 ]; then echo "gpu_check_mpi: skipped: $n GPU(s) here, NCCL needs one per rank (2 or more)"; exit 0; fi
command -v mpirun >/dev/null || { echo "gpu_check_mpi: skipped: no mpirun (install openmpi-bin libopenmpi-dev)"; exit 0; }
make --no-print-directory CUDA=1 MPI=1 BUILD=build-cuda-mpi build-cuda-mpi/train >/dev/null || exit 1
T=$(mktemp -d /tmp/sdlora_gpu_mpi.XXXXXX)
RUN="data/ --steps 20 --batch 1 --dropout 0.1 --no-grid --seed 7"
M="mpirun --allow-run-as-root --oversubscribe -np 2 build-cuda-mpi/train $RUN"
build-cuda-mpi/train $RUN --accum 2 --out "$T/one" > "$T/one.log" 2>&1 || { echo "FAIL one process ($T/one.log)"; exit 1; }
$M --out "$T/nccl" > "$T/nccl.log" 2>&1 || { echo "FAIL 2 ranks over NCCL ($T/nccl.log)"; exit 1; }
SDLORA_DIST_NCCL=0 $M --out "$T/mpi" > "$T/mpi.log" 2>&1 || { echo "FAIL 2 ranks over MPI ($T/mpi.log)"; exit 1; }
grep -q "summed on the GPUs with NCCL" "$T/nccl.log" || { echo "FAIL the 2-rank run did not use NCCL ($T/nccl.log)"; exit 1; }
fail=0
for r in nccl mpi; do
  if cmp -s "$T/one/lora.safetensors" "$T/$r/lora.safetensors"; then echo "ok   2 ranks over $r = 1 process --accum 2"
  else echo "FAIL 2 ranks over $r: other LoRA bytes than 1 process --accum 2"; fail=1; fi
done
[ $fail = 0 ] && rm -rf "$T"
exit $fail
