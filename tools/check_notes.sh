#!/usr/bin/env bash
# tools/check_notes.sh: the code citations in NOTES.md and in the assignment
# READMEs still point at code that exists.
#
# A citation is `FILE:NAME` (FILE ends in .c or .h, relative to the
# repository root; NAME is a C identifier), e.g. `unet.c:unet_add_lora` or
# `tests/test_lora.c:test_merge_unmerge`. Each one must be DEFINED in FILE,
# not just mentioned there:
#   .c  a function definition at file level (`... NAME(...) {`), a
#       `#define NAME`, or a Check test `START_TEST(NAME)`;
#   .h  any of those, or a declaration: a prototype `NAME(...);`, a
#       `typedef ... NAME;` or `struct/enum/union NAME`.
# Comments and string literals are ignored when looking. Citations by line
# number (`lora.c:76`, "line 648") are rejected: they go stale silently.
#
# Usage: tools/check_notes.sh [FILE.md ...]   (default: NOTES.md,
# assignments/README.md and assignments/*/README.md). One line per broken
# citation, `FILE.md:LINE: ...`, saying where else the name is defined when
# it has moved; then a summary. Exit status 1 when any citation is broken.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
    set -- NOTES.md assignments/README.md assignments/*/README.md
fi

exec perl -e '
use strict; use warnings;

# the text of a C file with comments and string/char literals blanked out
# (newlines kept, so offsets still map to line numbers)
my %src;
sub code_of {
    my ($f) = @_;
    return $src{$f} if exists $src{$f};
    open(my $fh, "<", $f) or return $src{$f} = undef;
    local $/; my $t = <$fh>; close $fh;
    $t =~ s{(/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\x27(?:\\.|[^\x27\\\n])*\x27)}
           { my $m = $1; $m =~ s/[^\n]/ /g; $m }gse;
    return $src{$f} = $t;
}

# brace depth before each offset of a stripped text
my %depth;
sub depth_at {
    my ($f, $pos) = @_;
    my $d = $depth{$f} //= do {
        my $t = $src{$f}; my @v; my $k = 0;
        for my $i (0 .. length($t) - 1) {
            push @v, $k;
            my $c = substr($t, $i, 1);
            $k++ if $c eq "{"; $k-- if $c eq "}";
        }
        \@v;
    };
    return $d->[$pos] // 0;
}

sub line_of { my ($t, $pos) = @_; return 1 + (substr($t, 0, $pos) =~ tr/\n//); }

# the offset just past the ")" matching the "(" at $pos, or -1
sub close_paren {
    my ($t, $pos) = @_; my $k = 0;
    for my $i ($pos .. length($t) - 1) {
        my $c = substr($t, $i, 1);
        $k++ if $c eq "("; $k-- if $c eq ")";
        return $i + 1 if $k == 0;
    }
    return -1;
}

# 1 when $name is defined in $f (see the header comment)
sub defines {
    my ($f, $name) = @_;
    my $t = code_of($f); return 0 unless defined $t;
    my $header = $f =~ /\.h$/;
    return 1 if $t =~ /^[ \t]*#[ \t]*define[ \t]+\Q$name\E\b/m;
    return 1 if $t =~ /\bSTART_TEST[ \t]*\([ \t]*\Q$name\E[ \t]*\)/;
    if ($header) {
        return 1 if $t =~ /\b(?:struct|enum|union)[ \t\n]+\Q$name\E\b/;
        while ($t =~ /\}[ \t\n]*\Q$name\E[ \t\n]*;/g) {         # typedef struct {...} NAME;
            return 1 if depth_at($f, $-[0] + 1) == 0;
        }
        while ($t =~ /\btypedef\b[^;{}]*\b\Q$name\E[ \t\n]*[;\[)]/g) { return 1; }
    }
    while ($t =~ /\b\Q$name\E[ \t\n]*\(/g) {
        my $at = $-[0]; my $open = $+[0] - 1;
        next if depth_at($f, $at) != 0;
        my $end = close_paren($t, $open); next if $end < 0;
        my $rest = substr($t, $end, 200);
        return 1 if $rest =~ /^[ \t\n]*\{/;                        # a definition
        # a prototype in a header: a type before the name on the same statement
        if ($header && $rest =~ /^[ \t\n]*;/) {
            my $before = substr($t, 0, $at);
            $before =~ s/.*[;{}]//s;                               # this statement only
            return 1 if $before =~ /[A-Za-z_*][ \t\n*]*$/;
        }
    }
    return 0;
}

# where else the name is defined (a hint for a function that has moved)
my @all;
sub elsewhere {
    my ($name, $not) = @_;
    @all = (glob("*.c"), glob("*.h"), glob("tools/*.c"), glob("tools/*.h"), glob("tests/*.c"), glob("tests/*.h")) unless @all;
    return grep { $_ ne $not && defines($_, $name) } @all;
}

# the lines where the name is only mentioned (a hint for a deleted function)
sub mentions {
    my ($f, $name) = @_;
    my $t = code_of($f); my @l;
    while ($t =~ /\b\Q$name\E\b/g) { push @l, line_of($t, $-[0]); }
    my %s; @l = grep { !$s{$_}++ } @l;
    return @l;
}

my ($n, $bad) = (0, 0);
for my $md (@ARGV) {
    open(my $fh, "<", $md) or do { print "$md: cannot be read\n"; $bad++; next };
    my $ln = 0; my $fence = 0;
    while (my $line = <$fh>) {
        $ln++;
        $fence = !$fence if $line =~ /^\s*```/;
        # program output quoted in a code block ("tests/test_lora.c:126:F:...")
        # is not a citation
        my $code = $fence || $line =~ /^(?: {4}|\t)/;
        while ($line =~ /(?<![\w\/.-])((?:[\w.-]+\/)*[\w.-]+\.[ch]):(\d+|[A-Za-z_]\w*)/g) {
            my ($f, $name) = ($1, $2);
            $n++;
            if ($name =~ /^\d/) {
                next if $code;
                print "$md:$ln: $f:$name cites a line number; cite the function instead (`$f:FUNCTION`)\n";
                $bad++; next;
            }
            if (!-f $f) {
                my @o = elsewhere($name, "");
                print "$md:$ln: $f:$name: there is no file $f",
                      (@o ? " ($name is defined in " . join(", ", @o) . ")" : ""), "\n";
                $bad++; next;
            }
            next if defines($f, $name);
            my @o = elsewhere($name, $f);
            my @m = mentions($f, $name);
            my $kind = $f =~ /\.h$/ ? "declares or defines" : "defines";
            print "$md:$ln: $f:$name: $f $kind no $name",
                  (@o ? "; it is defined in " . join(", ", @o)
                      : @m ? " (only mentioned, at line" . (@m > 1 ? "s " : " ") . join(", ", @m[0 .. ($#m < 4 ? $#m : 4)]) . (@m > 5 ? ", ..." : "") . ")"
                      : "; no file defines it"), "\n";
            $bad++;
        }
        # "line 648", "lines 76-119": a line-number citation in prose
        # "`lora.c:lora_forward` (58-74)": a line range after a citation
        if (!$code && $line =~ /\.[ch](?::\w+)?`[,;]?[ \t]*\(?\d+(?:\xe2\x80\x93|-)\d+/) {
            print "$md:$ln: a line range after a citation (\"$&\"); cite `FILE:FUNCTION` alone\n";
            $bad++; $n++;
        }
        if (!$code && $line =~ /\blines? \d+/) {
            print "$md:$ln: a line-number citation (\"$&\"); cite `FILE:FUNCTION` instead\n";
            $bad++; $n++;
        }
    }
    close $fh;
}
printf "check_notes: %d citations, %d broken\n", $n, $bad;
exit($bad ? 1 : 0);
' "$@"
