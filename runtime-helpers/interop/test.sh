#!/usr/bin/env bash
# Cross-language tests: the three helpers must agree on the protocol. The
# three files are copied into one flat directory, as the executor does, which
# goes on PATH, PYTHONPATH and NODE_PATH and into BATON_HELPERS. What one
# language writes, the others must read back byte for byte.
#
#   bash runtime-helpers/interop/test.sh
#
# Prints "interop: N passed, M failed" last; exits 1 if anything failed.

set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/baton-interop-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

HELPERS=$TMP/helpers
mkdir -p "$HELPERS"
cp "$ROOT/bash/baton.sh" "$ROOT/python/baton.py" "$ROOT/node/baton.js" "$HELPERS/"

export PATH="$HELPERS:$PATH" PYTHONPATH="$HELPERS" NODE_PATH="$HELPERS" BATON_HELPERS="$HELPERS"
export PYTHONDONTWRITEBYTECODE=1

PYTHON=$(command -v python3 || true)
NODE=$(command -v node || true)

PASSED=0
FAILED=0
CASE_FAILED=0

fail() {
    printf '    FAIL: %s\n' "$*"
    CASE_FAILED=1
}

# A value with unicode (including a 4-byte character and a combining mark),
# a tab, CRLF, quotes, a backslash and trailing newlines.
VALUE=$'h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80 e\xcc\x81 "q" \\ tab\there\r\nline two\n\n'

# Writers and readers of variable $1. Readers print the value to stdout
# exactly; writers take the value from the file $TMP/value.
write_bash() { bash -c '. baton.sh && baton_set_variable "$1" < "$2"' _ "$1" "$TMP/value"; }
write_sh() { dash -c '. baton.sh && v=$(cat "$2" && printf x) && baton_set_variable "$1" "${v%x}"' _ "$1" "$TMP/value"; }
write_python() { "$PYTHON" -c 'import baton, sys; baton.set_variable(sys.argv[1], open(sys.argv[2], encoding="utf-8", newline="").read())' "$1" "$TMP/value"; }
write_node() { "$NODE" -e 'require("baton").setVariable(process.argv[1], require("fs").readFileSync(process.argv[2], "utf8"))' "$1" "$TMP/value"; }
read_bash() { bash -c '. baton.sh && baton_get_variable "$1"' _ "$1"; }
read_sh() { dash -c '. baton.sh && baton_get_variable "$1"' _ "$1"; }
read_python() { "$PYTHON" -c 'import baton, sys; sys.stdout.buffer.write(baton.get_variable(sys.argv[1]).encode("utf-8"))' "$1"; }
read_node() { "$NODE" -e 'process.stdout.write(require("baton").getVariable(process.argv[1]))' "$1"; }

LANGS=(bash)
command -v dash >/dev/null 2>&1 && LANGS+=(sh)
[ -n "$PYTHON" ] && LANGS+=(python)
[ -n "$NODE" ] && LANGS+=(node)

t_variables_cross_languages() {
    local w r
    printf '%s' "$VALUE" >"$TMP/value"
    for w in "${LANGS[@]}"; do
        "write_$w" "from_$w" || fail "$w could not write"
        cmp -s "$TMP/value" "$BATON_DIR/out/vars/from_$w" || fail "$w changed the value on write"
        for r in "${LANGS[@]}"; do
            "read_$r" "from_$w" >"$TMP/got" || fail "$r could not read what $w wrote"
            cmp -s "$TMP/value" "$TMP/got" || fail "$r read a different value than $w wrote"
        done
    done
}

t_starting_values_and_override() {
    local r
    mkdir -p "$BATON_DIR/vars"
    printf 'old' >"$BATON_DIR/vars/k"
    for r in "${LANGS[@]}"; do
        [ "$("read_$r" k)" = old ] || fail "$r did not read the starting value"
    done
    printf 'new' >"$TMP/value"
    write_bash k
    for r in "${LANGS[@]}"; do
        [ "$("read_$r" k)" = new ] || fail "$r did not see the value set in the run"
    done
}

t_output_readable_by_all() {
    # Each language writes output; python checks it parses to the same value.
    local expected='{"s": "h\u00e9 \ud83d\ude00", "n": [1, 2.5, null, true]}'
    bash -c '. baton.sh && baton_output' <<<"$expected" || fail "bash output failed"
    "$PYTHON" -c 'import json, sys; assert json.load(open(sys.argv[1] + "/out/output.json")) == {"s": "h\u00e9 \U0001F600", "n": [1, 2.5, None, True]}' "$BATON_DIR" ||
        fail "bash output does not parse as expected"
    "$PYTHON" -c 'import baton; baton.output({"s": "h\u00e9 \U0001F600", "n": [1, 2.5, None, True]})' || fail "python output failed"
    "$NODE" -e 'const a = JSON.parse(require("fs").readFileSync(process.env.BATON_DIR + "/out/output.json", "utf8")); require("assert").deepStrictEqual(a, {s: "h\u00e9 \u{1F600}", n: [1, 2.5, null, true]})' ||
        fail "python output does not parse in node"
    "$NODE" -e 'require("baton").output({s: "h\u00e9 \u{1F600}", n: [1, 2.5, null, true]})' || fail "node output failed"
    "$PYTHON" -c 'import json, sys; assert json.load(open(sys.argv[1] + "/out/output.json", encoding="utf-8")) == {"s": "h\u00e9 \U0001F600", "n": [1, 2.5, None, True]}' "$BATON_DIR" ||
        fail "node output does not parse in python"
}

t_input_and_event_agree() {
    printf '{"a": "h\\u00e9", "b": [1, {"c": null}]}' >"$BATON_DIR/input.json"
    printf '{"job_id":"j","event_id":"e","event_name":"n","attempt":1,"parent_job_id":null,"root_job_id":null,"runtime":"bash","executor":"local"}' >"$BATON_DIR/event.json"
    local py js
    py=$("$PYTHON" -c 'import baton, json, subprocess; print(json.dumps([baton.input(), baton.event(), json.loads(subprocess.check_output(["bash", "-c", ". baton.sh && baton_input"])), json.loads(subprocess.check_output(["bash", "-c", ". baton.sh && baton_event"]))], sort_keys=True))') ||
        fail "python failed"
    js=$("$NODE" -e 'const b = require("baton"); console.log(JSON.stringify([b.input(), b.event()]))') || fail "node failed"
    "$PYTHON" -c 'import json, sys; py = json.loads(sys.argv[1]); js = json.loads(sys.argv[2]); assert py[0] == py[2] == js[0], (py, js); assert py[1] == py[3] == js[1], (py, js)' "$py" "$js" ||
        fail "input/event differ between languages"
}

t_absent_input_is_empty_object_everywhere() {
    [ "$(bash -c '. baton.sh && baton_input')" = '{}' ] || fail "bash"
    [ "$("$PYTHON" -c 'import baton; print(baton.input() == {})')" = True ] || fail "python"
    [ "$("$NODE" -e 'const v = require("baton").input(); console.log(JSON.stringify(v))')" = '{}' ] || fail "node"
}

t_condition_files_identical() {
    local want
    for want in true false; do
        rm -f "$BATON_DIR/out/condition"
        bash -c '. baton.sh && baton_set_condition "$1"' _ "$want"
        cp "$BATON_DIR/out/condition" "$TMP/cond.bash"
        "$PYTHON" -c "import baton; baton.set_condition($([ $want = true ] && echo True || echo False))"
        cp "$BATON_DIR/out/condition" "$TMP/cond.python"
        "$NODE" -e "require('baton').setCondition($want)"
        cp "$BATON_DIR/out/condition" "$TMP/cond.node"
        printf '%s' "$want" >"$TMP/cond.want"
        for l in bash python node; do
            cmp -s "$TMP/cond.want" "$TMP/cond.$l" || fail "$l wrote a different condition file for $want"
        done
    done
}

t_progress_lines_identical() {
    local b p n
    b=$(bash -c '. baton.sh && baton_progress 0 && baton_progress 55 && baton_progress 100')
    p=$("$PYTHON" -c 'import baton; [baton.progress(n) for n in (0, 55, 100)]')
    n=$("$NODE" -e 'const b = require("baton"); for (const n of [0, 55, 100]) b.progress(n)')
    [ "$b" = $'PROGRESS: 0\nPROGRESS: 55\nPROGRESS: 100' ] || fail "bash: $b"
    [ "$p" = "$b" ] || fail "python differs: $p"
    [ "$n" = "$b" ] || fail "node differs: $n"
}

t_key_grammar_agrees() {
    # Every language accepts and rejects exactly the same keys.
    local key long ok128 b p n
    ok128=$(printf 'k%.0s' $(seq 128))
    long=$(printf 'k%.0s' $(seq 129))
    for key in a A-z_0.9 .hidden - _ a..b "$ok128" '' . .. a/b ../x 'a b' 'x~' 'caf'$'\xc3\xa9' "$long" 'a*' 'a$'; do
        bash -c '. baton.sh && baton_set_variable "$1" v' _ "$key" 2>/dev/null
        b=$?
        "$PYTHON" -c 'import baton, sys
try:
    baton.set_variable(sys.argv[1], "v")
except ValueError:
    sys.exit(2)' "$key" 2>/dev/null
        p=$?
        "$NODE" -e 'try { require("baton").setVariable(process.argv[1], "v") } catch (e) { process.exit(e.code === "BATON_INVALID_KEY" ? 2 : 1) }' "$key" 2>/dev/null
        n=$?
        [ "$b" = "$p" ] && [ "$p" = "$n" ] ||
            fail "key $(printf '%q' "$key"): bash=$b python=$p node=$n"
    done
}

t_missing_baton_dir_same_message() {
    local msg="BATON_DIR is not set: run this script through Baton"
    env -u BATON_DIR bash -c '. baton.sh && baton_input' 2>"$TMP/err.bash"
    env -u BATON_DIR "$PYTHON" -c 'import baton; baton.input()' 2>"$TMP/err.python"
    env -u BATON_DIR "$NODE" -e 'require("baton").input()' 2>"$TMP/err.node"
    for l in bash python node; do
        grep -qF "$msg" "$TMP/err.$l" || fail "$l: $(cat "$TMP/err.$l")"
    done
}

t_helpers_found_through_baton_helpers() {
    # An sh script can also name the file through $BATON_HELPERS.
    env PATH=/usr/bin:/bin dash -c '. "$BATON_HELPERS/baton.sh" && baton_set_variable viahelpers yes' ||
        fail "sourcing through BATON_HELPERS failed"
    [ "$(read_bash viahelpers)" = yes ] || fail "value not written"
}

# ---- driver -----------------------------------------------------------------

if [ -z "$PYTHON" ] || [ -z "$NODE" ]; then
    echo "interop: python3 and node are both required" >&2
    echo "interop: 0 passed, 1 failed"
    exit 1
fi

for CASE in $(declare -F | awk '{print $3}' | grep '^t_'); do
    export BATON_DIR
    BATON_DIR=$(mktemp -d "$TMP/run.XXXXXX")
    CASE_FAILED=0
    "$CASE"
    if [ "$CASE_FAILED" = 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'ok   %s\n' "${CASE#t_}"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL %s\n' "${CASE#t_}"
    fi
    rm -rf "$BATON_DIR"
done

echo "interop: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
