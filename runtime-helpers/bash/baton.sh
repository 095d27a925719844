# baton.sh: Baton runtime helpers for bash and POSIX sh.
#
#   bash:          source baton.sh
#   sh/dash/ash:   . baton.sh
#
# The executor puts this file's directory on PATH, so neither form needs a path.
# (dash has no `source` builtin: use `.` there.) It is also in $BATON_HELPERS.
#
# The whole file is POSIX sh, so every function works the same in bash, dash,
# busybox sh and ksh (all four pass test.sh). Each public function runs in a
# subshell, so it never changes the caller's variables or shell options; it
# works the same whatever the caller's options (set -e, -u, -C), and its
# internals stay out of a `set -x` trace. Functions return a status and never
# exit the script: use `set -e` or `|| exit` to stop on an error.
#
#   baton_input                    print the run's input JSON ("{}" when there is none)
#   baton_output [JSON]            set the run's output JSON (reads stdin with no argument)
#   baton_get_variable KEY [DEF]   print a variable's value; status 1 if unset and no DEF
#   baton_set_variable KEY [VAL]   set a variable (reads the value from stdin with no VAL)
#   baton_set_condition BOOL       true/false, 1/0, yes/no (any case)
#   baton_event                    print the run's metadata JSON
#   baton_progress N               print "PROGRESS: N" (N an integer from 0 to 100)
#
# Return status: 0 success, 1 variable not set (baton_get_variable only),
# 2 bad argument (bad key, condition, progress, empty output, wrong usage),
# 3 environment error (BATON_DIR unset or not a directory, a file missing or
# unreadable/unwritable). Errors are reported on stderr, prefixed "baton: ".
#
# Protocol: docs/helpers.md in the Baton repository.

# ---- internal helpers (not part of the API) ---------------------------------

# Called only from inside the public functions' subshells: `exit` ends that
# subshell, i.e. returns from the public function with the given status.
_baton_fail() {
    printf 'baton: %s\n' "$1" >&2
    exit 3
}

_baton_usage() {
    printf 'baton: %s\n' "$1" >&2
    exit 2
}

_baton_need_dir() {
    if [ -z "${BATON_DIR:-}" ]; then
        _baton_fail "BATON_DIR is not set: run this script through Baton"
    fi
    if [ ! -d "$BATON_DIR" ]; then
        _baton_fail "BATON_DIR ($BATON_DIR) is not a directory"
    fi
}

# _baton_check_key FUNCTION KEY
# A key matches ^[A-Za-z0-9_.-]{1,128}$ and is not "." or "..". The character
# set is spelled out so that locale collation can never widen a range.
_baton_check_key() {
    case $2 in
        '' | . | .. | *[!ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-]*)
            _baton_usage "$1: invalid key '$2': a key is 1 to 128 characters from A-Z a-z 0-9 _ . - and is not '.' or '..'"
            ;;
    esac
    if [ "${#2}" -gt 128 ]; then
        _baton_usage "$1: invalid key '$2': a key is 1 to 128 characters from A-Z a-z 0-9 _ . - and is not '.' or '..'"
    fi
}

# _baton_write DIR NAME < CONTENT
# Atomic write: the content goes to a temporary file in DIR, which is then
# renamed over DIR/NAME. Temporary names contain "~", which no key may
# contain, so a left-over temporary file can never be taken for a variable.
# The file is created with the shell's umask, like any file the script writes.
_baton_write() {
    _baton_w_dir=$1
    _baton_w_dest=$1/$2
    if [ ! -d "$_baton_w_dir" ]; then
        mkdir -p "$_baton_w_dir" 2>/dev/null || [ -d "$_baton_w_dir" ] ||
            _baton_fail "cannot create directory $_baton_w_dir"
    fi
    if [ -d "$_baton_w_dest" ]; then
        _baton_fail "cannot write $_baton_w_dest: it is a directory"
    fi
    _baton_w_n=0
    while :; do
        _baton_w_tmp=$_baton_w_dir/.~baton-tmp.$$.$_baton_w_n
        # noclobber: create the file only if it does not exist yet, so two
        # writers (e.g. background subshells sharing $$) never share one.
        if (set -C && : >"$_baton_w_tmp") 2>/dev/null; then
            break
        fi
        if [ ! -e "$_baton_w_tmp" ] || [ "$_baton_w_n" -ge 1000 ]; then
            _baton_fail "cannot create a temporary file in $_baton_w_dir"
        fi
        _baton_w_n=$((_baton_w_n + 1))
    done
    if cat >|"$_baton_w_tmp" && mv -f "$_baton_w_tmp" "$_baton_w_dest"; then
        return 0
    fi
    rm -f "$_baton_w_tmp"
    _baton_fail "cannot write $_baton_w_dest"
}

# ---- public functions -------------------------------------------------------

# baton_input: print the input JSON exactly as stored; "{}" when absent.
baton_input() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    [ "$#" -eq 0 ] || _baton_usage "usage: baton_input"
    _baton_f=$BATON_DIR/input.json
    if [ -f "$_baton_f" ]; then
        cat "$_baton_f" || _baton_fail "cannot read $_baton_f"
    elif [ -e "$_baton_f" ]; then
        _baton_fail "cannot read $_baton_f: not a regular file"
    else
        printf '{}'
    fi
)

# baton_output [JSON]: write the output JSON (last write wins). With no
# argument the JSON is read from stdin. The text is not parsed here (that
# would need a JSON tool in every image): the worker validates it when the
# run ends and fails the run on malformed or oversized output. Empty or
# blank text is rejected here.
baton_output() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    case $# in
        0)
            # Keep trailing newlines: append a sentinel, then strip it.
            _baton_data=$(cat && printf x) || _baton_fail "baton_output: cannot read stdin"
            _baton_data=${_baton_data%x}
            ;;
        1) _baton_data=$1 ;;
        *) _baton_usage "usage: baton_output [JSON]  (quote the JSON: it must be one argument)" ;;
    esac
    # JSON whitespace: space, tab, CR, LF (LF not last: $(...) would strip it).
    _baton_ws=$(printf ' \t\n\r')
    case $_baton_data in
        *[!$_baton_ws]*) ;;
        *) _baton_usage "baton_output: the output is empty; pass a JSON text (e.g. '{}' or 'null')" ;;
    esac
    printf '%s' "$_baton_data" | _baton_write "$BATON_DIR/out" output.json
)

# baton_get_variable KEY [DEFAULT]: print the value, exactly as stored (no
# newline added). A value set earlier in this run wins over the run's
# starting value. Unset: print DEFAULT if given, else print nothing and
# return 1.
baton_get_variable() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    case $# in
        1 | 2) ;;
        *) _baton_usage "usage: baton_get_variable KEY [DEFAULT]" ;;
    esac
    _baton_check_key baton_get_variable "$1"
    for _baton_f in "$BATON_DIR/out/vars/$1" "$BATON_DIR/vars/$1"; do
        if [ -f "$_baton_f" ]; then
            cat "$_baton_f" || _baton_fail "cannot read $_baton_f"
            exit 0
        elif [ -e "$_baton_f" ]; then
            _baton_fail "cannot read $_baton_f: not a regular file"
        fi
    done
    if [ "$#" -eq 2 ]; then
        printf '%s' "$2"
        exit 0
    fi
    exit 1
)

# baton_set_variable KEY [VALUE]: set a variable to VALUE, stored exactly (no
# newline added). With no VALUE the value is read from stdin, byte for byte
# (the only way to store a value containing NUL bytes from a shell).
baton_set_variable() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    case $# in
        1)
            _baton_check_key baton_set_variable "$1"
            _baton_write "$BATON_DIR/out/vars" "$1"
            ;;
        2)
            _baton_check_key baton_set_variable "$1"
            printf '%s' "$2" | _baton_write "$BATON_DIR/out/vars" "$1"
            ;;
        *) _baton_usage "usage: baton_set_variable KEY [VALUE]" ;;
    esac
)

# baton_set_condition true|false: set the condition flag read by on_condition
# actions. Also accepts 1/0 and yes/no, in any case.
baton_set_condition() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    [ "$#" -eq 1 ] || _baton_usage "usage: baton_set_condition true|false"
    case $1 in
        [Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss]) _baton_v=true ;;
        [Ff][Aa][Ll][Ss][Ee] | 0 | [Nn][Oo]) _baton_v=false ;;
        *) _baton_usage "baton_set_condition: invalid condition '$1': use true or false (or 1/0, yes/no)" ;;
    esac
    printf '%s' "$_baton_v" | _baton_write "$BATON_DIR/out" condition
)

# baton_event: print the run metadata JSON (job_id, event_id, event_name,
# attempt, parent_job_id, root_job_id, runtime, executor).
baton_event() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    [ "$#" -eq 0 ] || _baton_usage "usage: baton_event"
    _baton_f=$BATON_DIR/event.json
    if [ -f "$_baton_f" ]; then
        cat "$_baton_f" || _baton_fail "cannot read $_baton_f"
    else
        _baton_fail "cannot read $_baton_f: the run metadata is missing"
    fi
)

# baton_progress N: report progress (an integer from 0 to 100) by printing
# the line "PROGRESS: N" on stdout. Leading zeros are accepted and dropped.
baton_progress() (
    { set +eux; } 2>/dev/null
    _baton_need_dir
    [ "$#" -eq 1 ] || _baton_usage "usage: baton_progress N  (an integer from 0 to 100)"
    case $1 in
        '' | *[!0123456789]*)
            _baton_usage "baton_progress: invalid progress '$1': use an integer from 0 to 100"
            ;;
    esac
    _baton_n=$1
    while :; do
        case $_baton_n in
            0?*) _baton_n=${_baton_n#0} ;;
            *) break ;;
        esac
    done
    if [ "${#_baton_n}" -gt 3 ] || [ "$_baton_n" -gt 100 ]; then
        _baton_usage "baton_progress: invalid progress '$1': use an integer from 0 to 100"
    fi
    printf 'PROGRESS: %s\n' "$_baton_n"
)
