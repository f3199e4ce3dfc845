#!/usr/bin/env bash
# tools/bench_mpi.sh [MPI_TRAIN] [STEPS]: a benchmark, not a test. The same
# run (global batch 4 per step: 2 micro-batches of 2) three ways on this
# machine, images per second of the training steps (./train's summary line):
#   2 ranks x 1 thread     mpirun -np 2 ./train --batch 2 --threads 1
#   1 process x 2 threads  ./train --batch 2 --accum 2 --threads 2   (the same bytes)
#   1 process x 2 threads  ./train --batch 4 --threads 2             (one micro-batch of 4)
# Give it an idle machine: the figures are only as good as the cores are free.
set -u
MT=${1:-build-mpi/train}
STEPS=${2:-60}
cd "$(dirname "$0")/.."
T=$(mktemp -d /tmp/sdlora_bench_mpi.XXXXXX)
trap 'rm -rf "$T"' EXIT
RUN="data/ --steps $STEPS --no-grid --seed 1"
export OMP_WAIT_POLICY=passive   # idle threads sleep (as make test has them): fairer to 2 threads on a busy machine
ips() {  # images per second from the summary line: 4 images per step
  awk -F's_per_step ' '/^summary:/ { split($2, a, ","); printf "%.2f", 4 / a[1] }' "$1"
}
OMP_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -np 2 $MT $RUN --batch 2 --threads 1 --out "$T/a" > "$T/a.log" 2>&1 || { tail -3 "$T/a.log"; exit 1; }
OMP_NUM_THREADS=2 $MT $RUN --batch 2 --accum 2 --threads 2 --out "$T/b" > "$T/b.log" 2>&1 || { tail -3 "$T/b.log"; exit 1; }
OMP_NUM_THREADS=2 $MT $RUN --batch 4 --threads 2 --out "$T/c" > "$T/c.log" 2>&1 || { tail -3 "$T/c.log"; exit 1; }
same=$(cmp -s "$T/a/lora.safetensors" "$T/b/lora.safetensors" && echo "same LoRA bytes" || echo "LoRA bytes DIFFER")
echo "bench_mpi: $STEPS steps of 4 images, tiny model, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg) at the end"
echo "  2 ranks x 1 thread, batch 2:            $(ips "$T/a.log") img/s"
echo "  1 process x 2 threads, batch 2 accum 2: $(ips "$T/b.log") img/s  ($same as the 2 ranks)"
echo "  1 process x 2 threads, batch 4:         $(ips "$T/c.log") img/s"
