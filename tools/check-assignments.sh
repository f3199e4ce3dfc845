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
# and the experiment drivers (assignments/NN-name/*.c) compile with -Werror.
# One line per assignment, then "N passed, M failed"; exit status 1 when any
# failed. `make check-assignments` runs it.
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
# a stub must fail by an assertion, not by hanging
TIMEOUT=""
command -v timeout >/dev/null 2>&1 && TIMEOUT="timeout 300"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sdlora-assignments.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pass=0
fail=0
for d in assignments/[0-9][0-9]-*/; do
    d=${d%/}
    n=${d#assignments/}; n=${n%%-*}
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
