#!/bin/sh
# replay.sh: every input of the seed corpus (reproducers included) once
# through its harness, under gcc's AddressSanitizer + UBSan, no clang needed
# (what a CI run can afford; `make fuzz` is the search). The library is built
# as `make asan` builds it, in build-asan/, and shared with it.
#   sh tests/fuzz/replay.sh            all harnesses
#   sh tests/fuzz/replay.sh json png   some
set -e
cd "$(dirname "$0")/../.."
B=build-asan
SAN="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
CC=${CC:-cc}
NAMES=${*:-png jpeg inflate json safetensors lora config tokenizer captions dataset}
OBJS=""
for c in *.c; do
  case $c in train.c|sample.c) ;; *) OBJS="$OBJS $B/${c%.c}.o" ;; esac
done
${MAKE:-make} --no-print-directory $OBJS BUILD=$B OMP=0 OPT="$SAN" LDFLAGS="-fsanitize=address,undefined" >/dev/null
for t in $NAMES; do
  objs=$OBJS
  # fuzz_config includes model.c itself
  [ "$t" = config ] && objs=$(echo "$OBJS" | sed "s| $B/model.o||")
  $CC -std=c99 -D_POSIX_C_SOURCE=200809L $SAN -I. tests/fuzz/fuzz_$t.c tests/fuzz/replay.c $objs \
    -o $B/replay_$t -lm
  printf '%-12s ' "$t"
  ./$B/replay_$t tests/fuzz/corpus/$t
done
