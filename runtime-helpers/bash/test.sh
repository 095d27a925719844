#!/usr/bin/env bash
# Tests for baton.sh. Plain bash, no dependencies beyond coreutils.
#
#   bash runtime-helpers/bash/test.sh            # bash, plus dash and busybox sh if installed
#   BATON_TEST_SHELLS="dash,busybox sh,ksh" bash runtime-helpers/bash/test.sh
#
# Every case runs a small script in a fresh shell (the way Baton runs a user's
# script) with BATON_DIR set to a fresh directory and the helper directory on
# PATH, then checks its status, stdout, stderr and the files it left.
# Prints "bash: N passed, M failed" last; exits 1 if anything failed.

set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-bash-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

if [ -n "${BATON_TEST_SHELLS:-}" ]; then
    IFS=, read -r -a SHELLS <<<"$BATON_TEST_SHELLS"
else
    SHELLS=(bash)
    command -v dash >/dev/null 2>&1 && SHELLS+=(dash)
    command -v busybox >/dev/null 2>&1 && SHELLS+=("busybox sh")
fi

PASSED=0
FAILED=0
CASE_FAILED=0
CASE=""
SH=""
EXTRA_ENV=()

fail() {
    printf '    FAIL: %s\n' "$*"
    CASE_FAILED=1
}

# run SCRIPT [STDIN]: run SCRIPT in $SH with baton.sh sourced; sets STATUS and
# writes $TMP/stdout, $TMP/stderr. BATON_DIR is $D unless NO_DIR=1.
run() {
    local script=". baton.sh
$1"
    local -a env=(env)
    if [ "${NO_DIR:-0}" = 1 ]; then
        env+=(-u BATON_DIR)
    else
        env+=("BATON_DIR=$D")
    fi
    env+=("PATH=$HERE:$PATH" "${EXTRA_ENV[@]}")
    if [ $# -ge 2 ]; then
        printf '%s' "$2" | "${env[@]}" $SH -c "$script" >"$TMP/stdout" 2>"$TMP/stderr"
        STATUS=$?
    else
        "${env[@]}" $SH -c "$script" </dev/null >"$TMP/stdout" 2>"$TMP/stderr"
        STATUS=$?
    fi
}

# CONTENT=the exact content of a file, trailing newlines kept (a command
# substitution would strip them).
read_content() {
    CONTENT=$(cat "$1" && printf x)
    CONTENT=${CONTENT%x}
}

# For messages only.
content() {
    cat "$1"
}

expect_status() {
    [ "$STATUS" = "$1" ] || fail "status $STATUS, expected $1 (stderr: $(content "$TMP/stderr"))"
}

expect_stdout() {
    local got
    read_content "$TMP/stdout"
    got=$CONTENT
    [ "$got" = "$1" ] || fail "stdout $(printf '%q' "$got"), expected $(printf '%q' "$1")"
}

expect_stderr_has() {
    grep -qF -- "$1" "$TMP/stderr" || fail "stderr lacks '$1': $(content "$TMP/stderr")"
}

expect_file() {
    if [ ! -f "$1" ]; then
        fail "missing file $1"
        return
    fi
    local got
    read_content "$1"
    got=$CONTENT
    [ "$got" = "$2" ] || fail "$1 holds $(printf '%q' "$got"), expected $(printf '%q' "$2")"
}

expect_no_file() {
    [ ! -e "$1" ] || fail "unexpected file $1"
}

# No temporary files anywhere under $D.
expect_no_temp() {
    local left
    left=$(find "$D" -name '*~*' -print | head -n 3)
    [ -z "$left" ] || fail "temporary files left behind: $left"
}

# ---- cases ------------------------------------------------------------------

t_missing_baton_dir() {
    local f
    for f in "baton_input" "baton_output '{}'" "baton_get_variable k" "baton_set_variable k v" \
        "baton_set_condition true" "baton_event" "baton_progress 5"; do
        NO_DIR=1 run "$f"
        [ "$STATUS" = 3 ] || fail "$f: status $STATUS, expected 3"
        grep -qF "BATON_DIR is not set: run this script through Baton" "$TMP/stderr" ||
            fail "$f: no clear message: $(content "$TMP/stderr")"
        [ ! -s "$TMP/stdout" ] || fail "$f printed something"
    done
    # Set but empty counts as unset.
    NO_DIR=1 run 'BATON_DIR= baton_input'
    expect_status 3
    expect_stderr_has "BATON_DIR is not set"
}

t_baton_dir_not_a_directory() {
    local d=$D
    D=$d/nope
    run 'baton_set_variable k v'
    expect_status 3
    expect_stderr_has "is not a directory"
    D=$d
}

t_input() {
    printf '{"a": [1, 2], "s": "h\\u00e9"}' >"$D/input.json"
    run 'baton_input'
    expect_status 0
    expect_stdout '{"a": [1, 2], "s": "h\u00e9"}'
    run 'x=$(baton_input); [ "$x" = "{\"a\": [1, 2], \"s\": \"h\\u00e9\"}" ]'
    expect_status 0
}

t_input_absent_is_empty_object() {
    run 'baton_input'
    expect_status 0
    expect_stdout '{}'
}

t_event() {
    local ev='{"job_id":"j1","event_id":"e1","event_name":"nightly","attempt":2,"parent_job_id":null,"root_job_id":null,"runtime":"bash","executor":"local"}'
    printf '%s' "$ev" >"$D/event.json"
    run 'baton_event'
    expect_status 0
    expect_stdout "$ev"
}

t_event_missing() {
    run 'baton_event'
    expect_status 3
    expect_stderr_has "event.json"
    expect_stdout ''
}

t_output_argument() {
    run 'baton_output "{\"rows\": 42}"'
    expect_status 0
    expect_file "$D/out/output.json" '{"rows": 42}'
    expect_no_temp
}

t_output_last_write_wins() {
    run 'baton_output "{\"n\": 1}"; baton_output "[1, 2, 3]"'
    expect_status 0
    expect_file "$D/out/output.json" '[1, 2, 3]'
}

t_output_stdin() {
    run 'baton_output' $'{\n  "multi": "line",\n  "u": "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"\n}\n\n'
    expect_status 0
    expect_file "$D/out/output.json" $'{\n  "multi": "line",\n  "u": "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"\n}\n\n'
    run 'printf "%s" "{\"piped\": true}" | baton_output'
    expect_status 0
    expect_file "$D/out/output.json" '{"piped": true}'
}

t_output_empty_rejected() {
    run 'baton_output "{\"keep\": 1}"'
    run 'baton_output ""'
    expect_status 2
    expect_stderr_has "empty"
    run $'baton_output " \t\r\n"'
    expect_status 2
    run 'baton_output' $'  \n'
    expect_status 2
    run 'baton_output "{}" "{}"'
    expect_status 2
    expect_stderr_has "usage"
    # The earlier output is untouched.
    expect_file "$D/out/output.json" '{"keep": 1}'
    expect_no_temp
}

t_get_variable() {
    mkdir -p "$D/vars"
    printf 'secret-value' >"$D/vars/token"
    run 'baton_get_variable token'
    expect_status 0
    expect_stdout 'secret-value'
}

t_get_variable_unset() {
    run 'baton_get_variable nothing'
    expect_status 1
    expect_stdout ''
    [ ! -s "$TMP/stderr" ] || fail "unset variable wrote to stderr: $(content "$TMP/stderr")"
    run 'baton_get_variable nothing fallback'
    expect_status 0
    expect_stdout 'fallback'
    run 'v=$(baton_get_variable nothing) || v=dflt; printf %s "$v"'
    expect_status 0
    expect_stdout 'dflt'
}

t_get_variable_empty_value() {
    mkdir -p "$D/vars"
    : >"$D/vars/empty"
    run 'baton_get_variable empty fallback'
    expect_status 0
    expect_stdout ''
}

t_set_then_get_round_trip() {
    run 'baton_set_variable cursor 1234 && baton_get_variable cursor'
    expect_status 0
    expect_stdout '1234'
    expect_file "$D/out/vars/cursor" '1234'
    expect_no_temp
}

t_set_overrides_starting_value() {
    mkdir -p "$D/vars"
    printf 'old' >"$D/vars/k"
    run 'baton_get_variable k; echo; baton_set_variable k new; baton_get_variable k'
    expect_status 0
    expect_stdout $'old\nnew'
    expect_file "$D/vars/k" 'old'
    expect_file "$D/out/vars/k" 'new'
}

t_set_last_write_wins() {
    run 'baton_set_variable k one; baton_set_variable k two; baton_set_variable k three'
    expect_status 0
    expect_file "$D/out/vars/k" 'three'
    expect_no_temp
}

t_unicode_value() {
    local v=$'h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80 \xe4\xb8\xad\xe6\x96\x87'
    run "baton_set_variable uni '$v' && baton_get_variable uni"
    expect_status 0
    expect_stdout "$v"
    expect_file "$D/out/vars/uni" "$v"
}

t_newline_value() {
    run 'baton_set_variable multi "line one
line two

" && baton_get_variable multi'
    expect_status 0
    expect_stdout $'line one\nline two\n\n'
    expect_file "$D/out/vars/multi" $'line one\nline two\n\n'
}

t_empty_value() {
    run 'baton_set_variable e "" && baton_get_variable e; echo "status=$?"'
    expect_stdout $'status=0\n'
    expect_file "$D/out/vars/e" ''
}

t_set_variable_from_stdin() {
    run 'baton_set_variable blob' $'from\nstdin\n'
    expect_status 0
    expect_file "$D/out/vars/blob" $'from\nstdin\n'
    # Bytes a shell variable cannot hold (NUL) go through stdin untouched.
    run 'printf "a\000b\377" | baton_set_variable bin'
    expect_status 0
    printf 'a\000b\377' >"$TMP/expected"
    cmp -s "$TMP/expected" "$D/out/vars/bin" || fail "binary value changed: $(od -c "$D/out/vars/bin")"
}

t_valid_keys() {
    local long
    long=$(printf 'k%.0s' $(seq 128))
    run "baton_set_variable A-z_0.9 v && baton_set_variable .hidden v && baton_set_variable - v && baton_set_variable $long v && baton_get_variable $long"
    expect_status 0
    expect_stdout 'v'
    expect_file "$D/out/vars/A-z_0.9" 'v'
    expect_file "$D/out/vars/.hidden" 'v'
    expect_file "$D/out/vars/-" 'v'
}

t_bad_keys() {
    local long key f
    long=$(printf 'k%.0s' $(seq 129))
    for key in '' '.' '..' 'a/b' '../escape' '/abs' 'a b' $'tab\tx' $'nl\nx' 'star*' 'q?' 'br[a]' \
        $'caf\xc3\xa9' 'dollar$' 'tilde~' 'semi;colon' "$long"; do
        for f in baton_set_variable baton_get_variable; do
            EXTRA_ENV=("K=$key")
            run "$f \"\$K\" value"
            EXTRA_ENV=()
            [ "$STATUS" = 2 ] || fail "$f key $(printf '%q' "$key"): status $STATUS, expected 2"
            grep -qF "invalid key" "$TMP/stderr" || fail "$f key $(printf '%q' "$key"): no clear message"
        done
    done
    [ -z "$(ls -A "$D/out/vars" 2>/dev/null)" ] || fail "a bad key wrote something: $(ls -A "$D/out/vars")"
    expect_no_file "$D/out/escape"
    expect_no_file "$D/escape"
}

t_set_variable_usage() {
    run 'baton_set_variable'
    expect_status 2
    run 'baton_set_variable a b c'
    expect_status 2
    run 'baton_get_variable'
    expect_status 2
}

t_condition_values() {
    local pair
    for pair in true:true false:false TRUE:true False:false 1:true 0:false yes:true no:false YES:true No:false; do
        run "baton_set_condition ${pair%%:*}"
        expect_status 0
        expect_file "$D/out/condition" "${pair#*:}"
    done
    expect_no_temp
}

t_bad_condition() {
    run 'baton_set_condition true'
    local v
    for v in '' maybe 2 -1 truee 'true ' ' false' y n on off null; do
        run "baton_set_condition '$v'"
        [ "$STATUS" = 2 ] || fail "condition '$v': status $STATUS, expected 2"
        grep -qF "invalid condition" "$TMP/stderr" || fail "condition '$v': no clear message"
    done
    run 'baton_set_condition'
    expect_status 2
    run 'baton_set_condition true false'
    expect_status 2
    expect_file "$D/out/condition" 'true'
}

t_progress() {
    run 'baton_progress 0; baton_progress 50; baton_progress 100; baton_progress 007; baton_progress 000'
    expect_status 0
    expect_stdout $'PROGRESS: 0\nPROGRESS: 50\nPROGRESS: 100\nPROGRESS: 7\nPROGRESS: 0\n'
}

t_progress_interleaves_with_output() {
    run 'echo start; baton_progress 10; echo middle; baton_progress 90; echo end'
    expect_stdout $'start\nPROGRESS: 10\nmiddle\nPROGRESS: 90\nend\n'
}

t_bad_progress() {
    local v
    for v in '' -1 101 1000 0101 5.5 abc ' 5' '5 ' +5 1e2 0x10 9999999999999999999999; do
        run "baton_progress '$v'"
        [ "$STATUS" = 2 ] || fail "progress '$v': status $STATUS, expected 2"
        [ ! -s "$TMP/stdout" ] || fail "progress '$v' printed $(content "$TMP/stdout")"
        grep -qF "invalid progress" "$TMP/stderr" || fail "progress '$v': no clear message"
    done
    run 'baton_progress'
    expect_status 2
    run 'baton_progress 1 2'
    expect_status 2
}

t_atomic_write_no_temp_files() {
    run 'i=0; while [ $i -lt 20 ]; do baton_set_variable "k$i" "v$i" || exit 1; baton_output "[$i]" || exit 1; baton_set_condition true || exit 1; i=$((i+1)); done'
    expect_status 0
    [ "$(ls -A "$D/out" | tr '\n' ' ')" = "condition output.json vars " ] ||
        fail "unexpected files in out/: $(ls -A "$D/out" | head -n 5 | tr '\n' ' ')"
    [ "$(ls -A "$D/out/vars" | wc -l)" -eq 20 ] || fail "unexpected files in out/vars: $(ls -A "$D/out/vars" | head -n 5 | tr '\n' ' ')"
    expect_file "$D/out/output.json" '[19]'
    expect_no_temp
}

t_atomic_write_skips_stale_temp_file() {
    # A temporary file left by a killed writer with the very name this shell
    # would pick first: the write must pick another name and leave it alone.
    run 'mkdir -p "$BATON_DIR/out/vars" && printf stale >"$BATON_DIR/out/vars/.~baton-tmp.$$.0" && baton_set_variable k fresh'
    expect_status 0
    expect_file "$D/out/vars/k" 'fresh'
    [ "$(find "$D/out/vars" -name '*~*' | wc -l)" -eq 1 ] || fail "expected only the stale temp file"
    grep -qx stale "$D"/out/vars/.~baton-tmp.* || fail "the stale temp file was modified"
}

t_concurrent_writers() {
    run 'i=0; while [ $i -lt 8 ]; do (baton_set_variable same "writer$i") & i=$((i+1)); done; wait; baton_get_variable same'
    expect_status 0
    grep -qE '^writer[0-7]$' "$TMP/stdout" || fail "value is not one whole write: $(content "$TMP/stdout")"
    expect_no_temp
}

t_strict_mode_and_no_leaks() {
    # set -euC in the caller; the helpers must work under it and must not
    # change the caller's variables or options.
    run 'set -euC
f=keep; n=keep; v=keep; d=keep; tmp=keep
baton_set_variable k v
baton_output "{}"
baton_set_condition no
baton_progress 1 >/dev/null
baton_get_variable k >/dev/null
baton_input >/dev/null
v2=$(baton_get_variable unset-key || true)
[ "$f$n$v$d$tmp" = keepkeepkeepkeepkeep ] || { echo clobbered; exit 1; }
case $- in *C*) ;; *) echo noclobber lost; exit 1;; esac
case $- in *e*) ;; *) echo errexit lost; exit 1;; esac
echo ok'
    expect_status 0
    expect_stdout $'ok\n'
}

t_internals_stay_out_of_xtrace() {
    run 'set -x; baton_set_variable k v; baton_get_variable k >/dev/null'
    expect_status 0
    expect_file "$D/out/vars/k" 'v'
    if grep -q '_baton' "$TMP/stderr"; then
        fail "internals traced: $(head -n 3 "$TMP/stderr")"
    fi
}

t_errors_do_not_exit_the_script() {
    run 'baton_progress 500 2>/dev/null; echo "still running $?"'
    expect_status 0
    expect_stdout $'still running 2\n'
}

t_source_by_name_via_path() {
    # `source baton.sh` in bash / `. baton.sh` in sh must find the file on PATH
    # from any working directory.
    run 'cd / && . baton.sh && baton_set_variable k v'
    expect_status 0
    if [ "$SH" = bash ]; then
        run 'cd / && source baton.sh && baton_get_variable k'
        expect_status 0
        expect_stdout 'v'
    fi
}

# ---- driver -----------------------------------------------------------------

CASES=$(declare -F | awk '{print $3}' | grep '^t_')

for SH in "${SHELLS[@]}"; do
    if ! command -v "${SH%% *}" >/dev/null 2>&1; then
        echo "skip $SH: not installed"
        continue
    fi
    for CASE in $CASES; do
        D=$(mktemp -d "$TMP/run.XXXXXX")
        CASE_FAILED=0
        "$CASE"
        if [ "$CASE_FAILED" = 0 ]; then
            PASSED=$((PASSED + 1))
            printf 'ok   [%s] %s\n' "$SH" "${CASE#t_}"
        else
            FAILED=$((FAILED + 1))
            printf 'FAIL [%s] %s\n' "$SH" "${CASE#t_}"
        fi
        rm -rf "$D"
    done
done

echo "bash: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
