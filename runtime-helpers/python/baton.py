"""Baton runtime helpers for Python (standard library only, Python 3.9+).

    import baton

    data = baton.input()                  # the input JSON, parsed ({} when there is none)
    baton.output({"rows": 42})            # the output JSON for the next run (last write wins)
    token = baton.get_variable("token")   # a variable's value (str) or None / the default
    baton.set_variable("cursor", "1234")  # set a variable (str or bytes)
    baton.set_condition(True)             # the flag read by on_condition actions
    meta = baton.event()                  # run metadata: job_id, event_id, attempt, ...
    baton.progress(50)                    # prints "PROGRESS: 50" on stdout, flushed

The executor puts this module on PYTHONPATH and sets BATON_DIR, the per-run
directory this module reads and writes. Every function raises BatonError when
BATON_DIR is not set (the script is not running under Baton) or a file cannot
be read or written, and ValueError / TypeError for a bad argument.

Use ``import baton`` and call ``baton.input()``: ``from baton import *`` does
not import ``input``, so that it cannot shadow the built-in.

Protocol: docs/helpers.md in the Baton repository.
"""

import json
import os
import re
import sys

__all__ = [
    "BatonError",
    "output",
    "get_variable",
    "set_variable",
    "set_condition",
    "event",
    "progress",
]

_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_TMP_PREFIX = ".~baton-tmp."
_MISSING = object()


class BatonError(RuntimeError):
    """The script is not running under Baton, or the run directory is unusable."""


def _dir():
    d = os.environ.get("BATON_DIR")
    if not d:
        raise BatonError("BATON_DIR is not set: run this script through Baton")
    if not os.path.isdir(d):
        raise BatonError(f"BATON_DIR ({d}) is not a directory")
    return d


def _check_key(func, key):
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key in (".", ".."):
        raise ValueError(
            f"baton.{func}: invalid key {key!r}: a key is a str of 1 to 128 characters "
            "from A-Z a-z 0-9 _ . - and is not '.' or '..'"
        )


def _read_bytes(path):
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BatonError(f"cannot read {path}: {e}") from e


def _read_json(path, what, default=_MISSING):
    data = _read_bytes(path)
    if data is None:
        if default is _MISSING:
            raise BatonError(f"cannot read {path}: the {what} is missing")
        return default
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BatonError(f"the {what} ({path}) is not valid JSON: {e}") from e


def _write_atomic(dirpath, name, data):
    """Write data to dirpath/name through a temporary file and a rename.

    A crash can leave a temporary file behind but never a partial dirpath/name.
    Temporary names contain "~", which no key may contain.
    """
    dest = os.path.join(dirpath, name)
    try:
        os.makedirs(dirpath, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(100):
            tmp = os.path.join(dirpath, f"{_TMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}")
            try:
                fd = os.open(tmp, flags, 0o666)  # the process umask applies
                break
            except FileExistsError:
                if attempt == 99:
                    raise
    except OSError as e:
        raise BatonError(f"cannot write {dest}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BatonError(f"cannot write {dest}: {e}") from e
        raise


def input():  # noqa: A001 (module attribute; does not replace the built-in for callers)
    """Return the run's input, parsed from JSON. {} when the run has no input."""
    d = _dir()
    return _read_json(os.path.join(d, "input.json"), "input", default={})


def output(obj):
    """Set the run's output to obj serialised as JSON (last write wins).

    Pass the object itself, not a JSON string (a str is stored as a JSON string).
    Raises TypeError / ValueError when obj cannot be represented in JSON
    (unsupported type, NaN or infinity, a str with a lone surrogate).
    """
    d = _dir()
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"baton.output: the output cannot be represented in JSON: {e}") from e
    except RecursionError as e:
        raise ValueError(f"baton.output: the output cannot be represented in JSON: {e}") from e
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"baton.output: the output contains a lone surrogate: {e}") from e
    _write_atomic(os.path.join(d, "out"), "output.json", data)


def get_variable(key, default=None):
    """Return the variable's value as a str, or default when it is not set.

    A value set earlier in this run wins over the run's starting value. Bytes
    that are not UTF-8 are kept as surrogate escapes, so set_variable(k,
    get_variable(k)) writes the same bytes back.
    """
    d = _dir()
    _check_key("get_variable", key)
    for path in (os.path.join(d, "out", "vars", key), os.path.join(d, "vars", key)):
        data = _read_bytes(path)
        if data is not None:
            return data.decode("utf-8", "surrogateescape")
    return default


def set_variable(key, value):
    """Set a variable. value is a str (stored as UTF-8) or bytes (stored as is).

    Other types raise TypeError: convert explicitly (str(n), json.dumps(obj)).
    """
    d = _dir()
    _check_key("set_variable", key)
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise TypeError(
            f"baton.set_variable: the value must be str or bytes, not {type(value).__name__}; "
            "convert it explicitly, e.g. str(n) or json.dumps(obj)"
        )
    _write_atomic(os.path.join(d, "out", "vars"), key, data)


def set_condition(value):
    """Set the condition flag read by on_condition actions. value is True or False."""
    d = _dir()
    if not isinstance(value, bool):
        raise ValueError(f"baton.set_condition: invalid condition {value!r}: use True or False")
    _write_atomic(os.path.join(d, "out"), "condition", b"true" if value else b"false")


def event():
    """Return the run metadata: a dict with job_id, event_id, event_name, attempt,
    parent_job_id, root_job_id, runtime and executor (ids may be None)."""
    d = _dir()
    return _read_json(os.path.join(d, "event.json"), "run metadata")


def progress(n):
    """Report progress: prints the line "PROGRESS: n" on stdout and flushes it.

    n is an int from 0 to 100.
    """
    _dir()
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 100:
        raise ValueError(f"baton.progress: invalid progress {n!r}: use an integer from 0 to 100")
    sys.stdout.write(f"PROGRESS: {int(n)}\n")
    sys.stdout.flush()
