#!/usr/bin/env bash
# tests/test_mpi.sh MPI_TRAIN PLAIN_TRAIN: the data-parallel trainer (make MPI=1)
# on 2 ranks of this machine, against the single-process one (make test-mpi).
#   1. 2 ranks x --batch 1 write the same bytes (LoRA, state, loss.csv) as one
#      process with --batch 1 --accum 2 (LoRA dropout and the text encoder on);
#      the MPI build alone (1 rank) as well
#   2. Ctrl-C (SIGINT to mpirun): every rank stops after the same step, rank 0
#      saves; that 2-rank state resumed by ONE process ends in the same bytes
#   3. a rank killed (SIGKILL): the job ends within 60 s, non-zero, and the last
#      checkpoint resumes
#   4. a rank that hangs (SIGSTOP): the other prints one error line within
#      SDLORA_DIST_TIMEOUT and the job ends; the last checkpoint resumes
set -u
MT=${1:-build-mpi/train}
PT=${2:-build/train}
cd "$(dirname "$0")/.."
T=$(mktemp -d /tmp/sdlora_mpi.XXXXXX)
trap 'rm -rf "$T"' EXIT
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
# the LoRA metadata records when a run began (modelspec.date): fixed, so files compare byte for byte
export SOURCE_DATE_EPOCH=1700000000
MPIRUN="mpirun --allow-run-as-root --oversubscribe -np 2"
RUN="data/ --steps 20 --batch 1 --dropout 0.1 --no-grid --seed 7"
fail=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*"; fail=1; }
same() {  # same A B what
  if cmp -s "$1" "$2"; then ok "$3"; else bad "$3 ($1 and $2 differ)"; fi
}
# the pid of rank $2 of the mpirun $1 (its children carry OMPI_COMM_WORLD_RANK)
rank_pid() {
  for p in $(pgrep -P "$1"); do
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2" && { echo $p; return; }
  done
}
# wait until file $1 exists (at most $2 s)
wait_file() { for _ in $(seq $(($2 * 10))); do [ -f "$1" ] && return 0; sleep 0.1; done; return 1; }
# wait for pid $1 to end (at most $2 s); prints the seconds waited
wait_gone() { local t0=$(date +%s); while kill -0 "$1" 2>/dev/null; do
  [ $(( $(date +%s) - t0 )) -ge "$2" ] && { echo -1; return; }; sleep 0.2; done; echo $(( $(date +%s) - t0 )); }

if ! command -v mpirun >/dev/null; then echo "test_mpi: mpirun not found (install openmpi-bin libopenmpi-dev)"; exit 1; fi

# 1. byte identity
$PT $RUN --accum 2 --out "$T/one" > "$T/one.log" 2>&1 || bad "single process run ($T/one.log)"
$MPIRUN $MT $RUN --out "$T/two" > "$T/two.log" 2>&1 || { bad "2-rank run"; tail -5 "$T/two.log"; }
grep -q "data parallel: 2 ranks" "$T/two.log" || bad "the 2-rank run does not say it runs on 2 ranks"
for f in lora.safetensors state.safetensors loss.csv; do same "$T/one/$f" "$T/two/$f" "2 ranks x batch 1 = 1 process x batch 1 x accum 2: $f"; done
[ "$(ls "$T/two" | grep -c tmp)" = 0 ] || bad "temporary files left in the 2-rank output"
mpirun --allow-run-as-root -np 1 $MT $RUN --accum 2 --out "$T/mone" > "$T/mone.log" 2>&1 || bad "MPI build, 1 rank"
same "$T/one/lora.safetensors" "$T/mone/lora.safetensors" "the MPI build on 1 rank = the plain build"

# 2. Ctrl-C on 2 ranks at step 10 (SDLORA_STOP_AFTER stops exactly as a signal would; a real SIGINT below)
SDLORA_STOP_AFTER=10 $MPIRUN $MT $RUN --out "$T/r" > "$T/r1.log" 2>&1
grep -q "stopped at step 10" "$T/r1.log" && ok "2 ranks stop together at step 10" || bad "2 ranks did not stop at step 10 ($(tail -2 "$T/r1.log"))"
$PT $RUN --accum 2 --out "$T/r" --resume "$T/r/state.safetensors" > "$T/r2.log" 2>&1 || bad "resume into 1 process ($(tail -1 "$T/r2.log"))"
same "$T/one/lora.safetensors" "$T/r/lora.safetensors" "2-rank state resumed by 1 process: the LoRA of the whole run"
same "$T/one/loss.csv" "$T/r/loss.csv" "2-rank state resumed by 1 process: loss.csv"
$MPIRUN $MT $RUN --steps 2000 --out "$T/c" > "$T/c.log" 2>&1 &
MP=$!
wait_file "$T/c/loss.csv" 60 || bad "the Ctrl-C run did not start"
kill -INT $MP
s=$(wait_gone $MP 60)
[ "$s" -ge 0 ] && grep -q "stopped at step" "$T/c.log" && [ -f "$T/c/state.safetensors" ] \
  && ok "Ctrl-C: both ranks stop, rank 0 saves ($(grep -o 'stopped at step [0-9]*' "$T/c.log"), ${s} s)" \
  || bad "Ctrl-C on mpirun ($(tail -2 "$T/c.log"))"

# resumes the state in $1 for one step (the flags of the run that wrote it)
resumes() { SDLORA_STOP_AFTER=1 $PT $RUN --accum 2 --steps 2000 --save-every 5 --out "$1" --resume "$1/state.safetensors" > "$1.resume.log" 2>&1
  [ $? = 130 ] && grep -q "resuming from" "$1.resume.log"; }

# 3. a rank killed
SDLORA_DIST_TIMEOUT=20 $MPIRUN $MT $RUN --steps 2000 --save-every 5 --out "$T/k" > "$T/k.log" 2>&1 &
MP=$!
wait_file "$T/k/lora-step000010.safetensors" 60 || bad "the kill run did not reach step 10"
R1=$(rank_pid $MP 1)
if [ -n "$R1" ]; then
  kill -9 "$R1"
  s=$(wait_gone $MP 60); wait $MP; rc=$?
  [ "$s" -ge 0 ] && [ $rc != 0 ] && ok "rank 1 killed: the job ends in ${s} s, status $rc: $(grep -m1 -o 'process rank 1.*' "$T/k.log")" \
    || bad "rank 1 killed: the job did not end within 60 s with an error (status $rc)"
  resumes "$T/k" && ok "after the kill the last checkpoint resumes" || bad "after the kill the checkpoint does not resume ($(tail -1 "$T/k.resume.log"))"
else bad "no rank 1 process found"; kill $MP; fi

# 4. a rank that hangs
SDLORA_DIST_TIMEOUT=5 $MPIRUN $MT $RUN --steps 2000 --save-every 5 --out "$T/h" > "$T/h.log" 2>&1 &
MP=$!
wait_file "$T/h/lora-step000010.safetensors" 60 || bad "the hang run did not reach step 10"
R1=$(rank_pid $MP 1)
if [ -n "$R1" ]; then
  kill -STOP "$R1"
  s=$(wait_gone $MP 60); wait $MP; rc=$?
  kill -CONT "$R1" 2>/dev/null
  n=$(grep -c '^error: rank 0 of 2: no answer from the other ranks for 5 s' "$T/h.log")
  [ "$s" -ge 0 ] && [ $rc != 0 ] && [ "$n" = 1 ] && ok "rank 1 hangs: rank 0 says so in one line and the job ends in ${s} s" \
    || bad "rank 1 hangs: ended in ${s} s, status $rc, $n error lines from rank 0 ($T/h.log)"
  resumes "$T/h" && ok "after the hang the last checkpoint resumes" || bad "after the hang the checkpoint does not resume ($(tail -1 "$T/h.resume.log"))"
else bad "no rank 1 process found"; kill $MP; fi

if [ $fail = 0 ]; then echo "test_mpi: all passed"; else echo "test_mpi: FAILED"; trap - EXIT; echo "outputs kept in $T"; exit 1; fi
