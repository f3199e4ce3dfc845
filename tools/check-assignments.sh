#!/usr/bin/env bash
# tools/check-assignments.sh: every assignment in assignments/NN-name/ is
# checked end to end:
#   1. in this repository its test binaries PASS (the reference is right);
#   2. tools/make-assignment NN writes a student copy into a temporary folder;
#   3. in the copy, `make build/test_X` builds with -Werror added to the
#      project's flags (the stubs compile cleanly);
#   4. in the copy, each test binary FAILS, and each test named in the
#      README's "<!-- check: test_X:test_name ... -->" line is among the
#      failures Check reports (the stub is caught by the test it claims);
#   5. every command the README gives RUNS: each fenced ```sh block is run
#      with bash -e -o pipefail, in order, in a scratch copy of this
#      repository (the files git tracks, plus ./train and ./sample), so the
#      runs/ and out/ folders they write go nowhere. A block must exit 0,
#      except a block fenced ```sh fails (the student's "build and run the
#      tests" on the stubbed copy), which must end in a Check test failure
#      (":F:"/":E:" in its output, not a build error). A block fenced
#      ```sh needs=PATH is skipped, and said so, when PATH (absolute, or
#      relative to the repository, e.g. the fetched CLIP vocabulary) is not
#      there; a relative PATH is copied into the scratch copy when it is.
#      A command left in an indented (unfenced) code block is an error: it
#      would never be checked.
#   and the experiment drivers (assignments/NN-name/*.c) compile with -Werror.
# What is changed in a block before it runs, to keep the check private and
# short: "/tmp/" becomes a private temporary folder; `--steps N` becomes
# `--steps $CHECK_STEPS` when N is larger (default 5; CHECK_STEPS=0 keeps
# every N as written); `tools/make-assignment N DEST` runs this repository's
# tool and then seeds DEST/build with this repository's object files (times
# kept) so that make there recompiles only what the stub changed. Each block
# has $CHECK_BLOCK_TIMEOUT seconds (default 900).
# One line per assignment, then "N passed, M failed"; exit status 1 when any
# failed. `make check-assignments` runs it; `tools/check-assignments.sh 01 05`
# checks only those.
#
# Speed: the copy reuses this repository's up-to-date object files (copied
# with their times kept), so make recompiles only the stripped sources and the
# test's main file. Each copy gets its own folder; nothing else is shared.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
MAKE=${MAKE:-make}
CC=${CC:-cc}
BUILD=${BUILD:-build}
export CK_DEFAULT_TIMEOUT=${CK_DEFAULT_TIMEOUT:-600}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
CHECK_STEPS=${CHECK_STEPS:-5}
CHECK_BLOCK_TIMEOUT=${CHECK_BLOCK_TIMEOUT:-900}
# a stub must fail by an assertion, not by hanging
TIMEOUT=""
command -v timeout >/dev/null 2>&1 && TIMEOUT="timeout 300"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sdlora-assignments.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# the README's ```sh blocks, one file each: $2/K.sh (the commands, fence
# indentation removed) and $2/K.attr (the words after "sh" on the fence);
# prints "LINE: text" for each command left in an indented code block
extract_blocks() {
    awk -v out="$2" '
        function flush() { close(out "/" k ".sh"); close(out "/" k ".attr") }
        BEGIN { k = 0; inb = 0; other = 0 }
        {
            line = $0
            if (!inb && !other && match(line, /^[ \t]*```/)) {
                ind = RLENGTH - 3
                info = substr(line, RLENGTH + 1)
                sub(/^[ \t]+/, "", info); sub(/[ \t\r]+$/, "", info)
                if (info == "sh" || substr(info, 1, 3) == "sh ") {
                    inb = 1; k++
                    printf "%s\n", substr(info, 4) > (out "/" k ".attr")
                    printf "" > (out "/" k ".sh")
                    printf "%d\n", NR > (out "/" k ".line")
                    close(out "/" k ".line")
                } else other = 1
                next
            }
            if ((inb || other) && line ~ /^[ \t]*```[ \t]*$/) {
                if (inb) flush()
                inb = 0; other = 0; next
            }
            if (inb) {
                t = line
                for (i = 0; i < ind && substr(t, 1, 1) == " "; i++) t = substr(t, 2)
                print t > (out "/" k ".sh")
                next
            }
            if (!other && line ~ /^(    |\t)[ \t]*(\.\/|cc |make |tools\/|cd |for |cat |time |\/usr\/bin\/|echo .*\|)/)
                printf "%d: %s\n", NR, line
        }
        END { if (inb) printf "%d: an unclosed ```sh block\n", NR }
    ' "$1"
}

# a scratch copy of this repository for the README commands: the files git
# tracks (times kept), ./train and ./sample
make_scratch() {
    mkdir -p "$1"
    git ls-files -z | while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done | tar --null -T - -cf - | tar -xf - -C "$1"
    cp -p train sample "$1/"
}

# run the ```sh blocks of README $1 (scratch folder $2, temp folder $3);
# sets why (empty when all ran as they should) and ran (a summary)
run_blocks() {
    local readme=$1 scratch=$2 t=$3 k nb=0 attr need rc line blocks
    blocks=$t/blocks
    ran=""
    mkdir -p "$blocks" "$t/tmp"
    local stray
    stray=$(extract_blocks "$readme" "$blocks")
    if [ -n "$stray" ]; then
        why="$readme:$(echo "$stray" | head -n 1 | sed 's/  */ /g') is a command outside a \`\`\`sh block (put it in one, so that it is run)"
        return
    fi
    for k in $(ls "$blocks" | sed -n 's/\.sh$//p' | sort -n); do
        attr=$(cat "$blocks/$k.attr"); line=$(cat "$blocks/$k.line")
        need=""
        for a in $attr; do
            case $a in
                fails) ;;
                needs=*) need=${a#needs=};;
                *) why="$readme:$line: unknown word '$a' after \`\`\`sh (known: fails, needs=PATH)"; return;;
            esac
        done
        if [ -n "$need" ]; then
            case $need in
                /*) [ -e "$need" ] || { ran="$ran; skipped the block at line $line ($need is not here)"; continue; };;
                *)  if [ ! -e "$root/$need" ]; then
                        ran="$ran; skipped the block at line $line ($need is not here)"; continue
                    fi
                    mkdir -p "$scratch/$(dirname "$need")"
                    cp -pR "$root/$need" "$scratch/$(dirname "$need")/";;
            esac
        fi
        # /tmp/ -> a private folder; --steps N capped
        perl -pe 'BEGIN { ($t, $c) = splice(@ARGV, 0, 2) } s{/tmp/}{$t/}g; s/(--steps[ =])(\d+)/$1 . ($c > 0 && $2 > $c ? $c : $2)/ge' \
            "$t/tmp" "$CHECK_STEPS" "$blocks/$k.sh" > "$blocks/$k.run"
        {
            # tools/make-assignment N DEST: this repository's tool, then DEST/build seeded
            printf 'tools/make-assignment() { "%s/tools/make-assignment" "$@" || return; if [ -d "%s/%s" ]; then mkdir -p "$2/build"; cp -p "%s/%s"/*.o "$2/build/" 2>/dev/null || true; fi; }\n' \
                "$root" "$root" "$BUILD" "$root" "$BUILD"
            cat "$blocks/$k.run"
        } > "$blocks/$k.bash"
        (cd "$scratch" && $BTIMEOUT bash -e -o pipefail "$blocks/$k.bash") >"$t/block.log" 2>&1
        rc=$?
        nb=$((nb + 1))
        if [[ " $attr " == *" fails "* ]]; then
            if [ $rc -eq 0 ]; then
                why="$readme:$line: the block passes, but it should fail in the stub's tests (\`\`\`sh fails)"; return
            fi
            if ! grep -qE ':[FE]:' "$t/block.log"; then
                why="$readme:$line: the block fails, but not in a Check test (exit $rc): $(grep -m1 -E 'error|rror:' "$t/block.log" || tail -n 1 "$t/block.log")"; return
            fi
        elif [ $rc -ne 0 ]; then
            why="$readme:$line: the block fails (exit $rc$([ $rc -eq 124 ] && echo ", over ${CHECK_BLOCK_TIMEOUT} s")): $(grep -m1 'undefined reference' "$t/block.log" || grep -m1 -iE '^error|error:' "$t/block.log" || tail -n 1 "$t/block.log")"
            return
        fi
    done
    ran=" $nb command block(s) ran$ran."
}

if ! $MAKE -s BUILD="$BUILD" train sample >"$tmp/build.log" 2>&1; then
    echo "FAIL: make train sample failed: $(tail -n 3 "$tmp/build.log" | tr '\n' ' ')"
    echo "0 passed, 1 failed"
    exit 1
fi
BTIMEOUT=""
command -v timeout >/dev/null 2>&1 && BTIMEOUT="timeout $CHECK_BLOCK_TIMEOUT"

pass=0
fail=0
only=" $* "
for d in assignments/[0-9][0-9]-*/; do
    d=${d%/}
    n=${d#assignments/}; n=${n%%-*}
    if [ $# -gt 0 ] && [[ "$only" != *" $n "* ]]; then continue; fi
    name=${d#assignments/}
    readme=$d/README.md
    check=$(sed -n 's/^<!-- *check: *\(.*[^ ]\) *-->.*/\1/p' "$readme" 2>/dev/null | head -n 1)
    if [ -z "$check" ]; then
        echo "FAIL $name: $readme has no '<!-- check: test_X:test_name ... -->' line"
        fail=$((fail + 1)); continue
    fi
    bins=""
    for tok in $check; do
        b=${tok%%:*}
        case " $bins " in *" $b "*) ;; *) bins="$bins $b";; esac
    done
    why=""
    # 1. the reference passes
    for b in $bins; do
        if ! $MAKE -s BUILD="$BUILD" "$BUILD/$b" >"$tmp/build.log" 2>&1; then
            why="repository: make $BUILD/$b failed: $(tail -n 3 "$tmp/build.log" | tr '\n' ' ')"; break
        fi
        if ! $TIMEOUT "./$BUILD/$b" >"$tmp/ref.log" 2>&1; then
            why="repository: $b fails with the reference code: $(grep -m1 -E ':[FE]:' "$tmp/ref.log" || tail -n 1 "$tmp/ref.log")"; break
        fi
    done
    # the experiment drivers beside the README still compile against the API
    for f in "$d"/*.c; do
        [ -z "$why" ] && [ -f "$f" ] || continue
        if ! $CC -std=c99 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Wshadow -Werror -I. -fsyntax-only "$f" >"$tmp/build.log" 2>&1; then
            why="$f does not compile: $(grep -m1 -E 'error' "$tmp/build.log")"
        fi
    done
    # 2. the student copy
    copy=$tmp/$n
    if [ -z "$why" ] && ! tools/make-assignment "$n" "$copy" >"$tmp/make.log" 2>&1; then
        why="make-assignment: $(tail -n 1 "$tmp/make.log")"
    fi
    if [ -z "$why" ] && [ -d "$BUILD" ]; then
        mkdir -p "$copy/build"
        cp -p "$BUILD"/*.o "$copy/build/" 2>/dev/null || true
    fi
    summary=""
    for b in $bins; do
        [ -z "$why" ] || break
        # 3. builds without warnings
        if ! (cd "$copy" && $MAKE -s BUILD=build CC="$CC -Werror" "build/$b") >"$tmp/build.log" 2>&1; then
            why="student copy: make build/$b failed: $(grep -m1 -E 'error|warning' "$tmp/build.log" || tail -n 1 "$tmp/build.log")"; break
        fi
        # 4. fails, in the named tests
        if (cd "$copy" && $TIMEOUT "./build/$b") >"$tmp/run.log" 2>&1; then
            why="student copy: $b passes with the stub (the tests do not catch it)"; break
        fi
        for tok in $check; do
            [ "${tok%%:*}" = "$b" ] || continue
            t=${tok#*:}
            [ "$t" = "$tok" ] && continue
            if ! grep -qE ":[FE]:[^:]*:$t:" "$tmp/run.log"; then
                why="student copy: $b fails, but not in $t: $(grep -m1 -E ':[FE]:' "$tmp/run.log" || tail -n 1 "$tmp/run.log")"; break 2
            fi
        done
        summary="$summary $b: $(grep -m1 -E '^[0-9]+%: Checks' "$tmp/run.log" || echo 'crashed')."
    done
    rm -rf "$copy"
    # 5. the README's commands run
    if [ -z "$why" ]; then
        make_scratch "$tmp/scratch$n"
        run_blocks "$readme" "$tmp/scratch$n" "$tmp/run$n"
        summary="$summary$ran"
        rm -rf "$tmp/scratch$n" "$tmp/run$n"
    fi
    if [ -z "$why" ]; then
        echo "ok   $name:$summary"
        pass=$((pass + 1))
    else
        echo "FAIL $name: $why"
        fail=$((fail + 1))
    fi
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
