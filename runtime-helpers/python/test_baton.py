"""Tests for baton.py (unittest, standard library only).

    python3 runtime-helpers/python/test_baton.py
    python3 -m unittest discover -s runtime-helpers/python
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep the source tree clean

import baton  # noqa: E402

NO_DIR_MESSAGE = "BATON_DIR is not set: run this script through Baton"
UNICODE = "héllo € 😀 中文 \u0301"
BAD_KEYS = [
    "", ".", "..", "a/b", "../escape", "/abs", "a b", "tab\tx", "nl\nx", "star*", "q?",
    "br[a]", "café", "dollar$", "tilde~", "semi;colon", "k" * 129, "\u0660", "ａ",
]


class BatonTestCase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="baton-py-test.")
        self.dir = self._tmp.name
        patcher = mock.patch.dict(os.environ, {"BATON_DIR": self.dir})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(self._tmp.cleanup)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, rel, data):
        p = self.path(*rel.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))

    def read(self, rel):
        with open(self.path(*rel.split("/")), "rb") as f:
            return f.read()

    def temp_files(self):
        return [
            os.path.join(root, name)
            for root, _, names in os.walk(self.dir)
            for name in names
            if "~" in name
        ]

    def assertNoTempFiles(self):
        self.assertEqual(self.temp_files(), [])

    def run_script(self, code, env_extra=None):
        """Run code in a fresh interpreter that finds baton through PYTHONPATH."""
        env = dict(os.environ)
        env["PYTHONPATH"] = HERE
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(env_extra or {})
        return subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=tempfile.gettempdir(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
        )


class MissingBatonDir(BatonTestCase):
    CALLS = [
        ("input", lambda: baton.input()),
        ("output", lambda: baton.output({})),
        ("get_variable", lambda: baton.get_variable("k")),
        ("set_variable", lambda: baton.set_variable("k", "v")),
        ("set_condition", lambda: baton.set_condition(True)),
        ("event", lambda: baton.event()),
        ("progress", lambda: baton.progress(5)),
    ]

    def test_every_function_fails_clearly_when_unset(self):
        del os.environ["BATON_DIR"]
        for name, call in self.CALLS:
            with self.subTest(name):
                with self.assertRaises(baton.BatonError) as cm:
                    call()
                self.assertIn(NO_DIR_MESSAGE, str(cm.exception))

    def test_empty_counts_as_unset(self):
        os.environ["BATON_DIR"] = ""
        with self.assertRaisesRegex(baton.BatonError, "BATON_DIR is not set"):
            baton.input()

    def test_not_a_directory(self):
        os.environ["BATON_DIR"] = self.path("nope")
        for name, call in self.CALLS:
            with self.subTest(name):
                with self.assertRaisesRegex(baton.BatonError, "is not a directory"):
                    call()

    def test_is_a_runtime_error(self):
        self.assertTrue(issubclass(baton.BatonError, RuntimeError))

    def test_import_works_without_baton_dir(self):
        r = self.run_script("import baton; print('imported')", {"BATON_DIR": ""})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, b"imported\n")


class Input(BatonTestCase):
    def test_parsed(self):
        self.write("input.json", '{"a": [1, 2.5, null, true], "s": "h\\u00e9 😀"}')
        self.assertEqual(baton.input(), {"a": [1, 2.5, None, True], "s": "hé 😀"})

    def test_any_json_value(self):
        for text, value in [("[1, 2]", [1, 2]), ('"s"', "s"), ("null", None), ("42", 42)]:
            with self.subTest(text):
                self.write("input.json", text)
                self.assertEqual(baton.input(), value)

    def test_absent_is_empty_object(self):
        self.assertEqual(baton.input(), {})
        # A fresh object each time: mutating one result does not leak.
        baton.input()["x"] = 1
        self.assertEqual(baton.input(), {})

    def test_invalid_json(self):
        self.write("input.json", "{not json")
        with self.assertRaisesRegex(baton.BatonError, "not valid JSON"):
            baton.input()

    def test_builtin_input_not_shadowed_by_star_import(self):
        ns = {}
        exec("from baton import *", ns)
        self.assertNotIn("input", ns)
        self.assertIn("get_variable", ns)


class Event(BatonTestCase):
    META = {
        "job_id": "0190a0b4-0000-7000-8000-000000000001",
        "event_id": "0190a0b4-0000-7000-8000-000000000002",
        "event_name": "nightly report",
        "attempt": 2,
        "parent_job_id": None,
        "root_job_id": None,
        "runtime": "python",
        "executor": "container",
    }

    def test_parsed(self):
        self.write("event.json", json.dumps(self.META))
        self.assertEqual(baton.event(), self.META)

    def test_missing(self):
        with self.assertRaisesRegex(baton.BatonError, "event.json"):
            baton.event()


class Output(BatonTestCase):
    def test_written_as_json(self):
        baton.output({"rows": 42, "names": ["a", "b"], "ok": True, "none": None})
        self.assertEqual(
            json.loads(self.read("out/output.json")),
            {"rows": 42, "names": ["a", "b"], "ok": True, "none": None},
        )
        self.assertNoTempFiles()

    def test_last_write_wins(self):
        baton.output({"n": 1})
        baton.output([1, 2, 3])
        self.assertEqual(json.loads(self.read("out/output.json")), [1, 2, 3])

    def test_unicode_is_utf8(self):
        baton.output({"s": UNICODE, UNICODE: "key"})
        data = self.read("out/output.json")
        self.assertEqual(json.loads(data.decode("utf-8")), {"s": UNICODE, UNICODE: "key"})
        self.assertIn("😀".encode("utf-8"), data)

    def test_string_is_a_json_string(self):
        baton.output('{"a": 1}')
        self.assertEqual(json.loads(self.read("out/output.json")), '{"a": 1}')

    def test_unserialisable(self):
        baton.output({"keep": 1})
        for bad, exc in [({"s": {1, 2}}, TypeError), (float("nan"), ValueError),
                         ([float("inf")], ValueError), ("\ud800", ValueError),
                         (object(), TypeError)]:
            with self.subTest(repr(bad)):
                with self.assertRaisesRegex(exc, "cannot be represented in JSON|lone surrogate"):
                    baton.output(bad)
        self.assertEqual(json.loads(self.read("out/output.json")), {"keep": 1})
        self.assertNoTempFiles()

    def test_cycle(self):
        a = []
        a.append(a)
        with self.assertRaises(ValueError):
            baton.output(a)


class Variables(BatonTestCase):
    def test_get_from_starting_values(self):
        self.write("vars/token", "secret-value")
        self.assertEqual(baton.get_variable("token"), "secret-value")

    def test_get_unset_returns_default(self):
        self.assertIsNone(baton.get_variable("missing"))
        self.assertEqual(baton.get_variable("missing", "fallback"), "fallback")
        self.assertEqual(baton.get_variable("missing", default=0), 0)

    def test_empty_value_is_not_unset(self):
        self.write("vars/empty", "")
        self.assertEqual(baton.get_variable("empty", "fallback"), "")

    def test_round_trip(self):
        baton.set_variable("cursor", "1234")
        self.assertEqual(baton.get_variable("cursor"), "1234")
        self.assertEqual(self.read("out/vars/cursor"), b"1234")
        self.assertNoTempFiles()

    def test_set_overrides_starting_value(self):
        self.write("vars/k", "old")
        self.assertEqual(baton.get_variable("k"), "old")
        baton.set_variable("k", "new")
        self.assertEqual(baton.get_variable("k"), "new")
        self.assertEqual(self.read("vars/k"), b"old")

    def test_last_write_wins(self):
        for v in ("one", "two", "three"):
            baton.set_variable("k", v)
        self.assertEqual(self.read("out/vars/k"), b"three")
        self.assertNoTempFiles()

    def test_unicode_value(self):
        baton.set_variable("uni", UNICODE)
        self.assertEqual(self.read("out/vars/uni"), UNICODE.encode("utf-8"))
        self.assertEqual(baton.get_variable("uni"), UNICODE)

    def test_newline_values_stored_exactly(self):
        for v in ("line one\nline two\n\n", "\n", "crlf\r\n", " padded "):
            with self.subTest(repr(v)):
                baton.set_variable("multi", v)
                self.assertEqual(self.read("out/vars/multi"), v.encode("utf-8"))
                self.assertEqual(baton.get_variable("multi"), v)

    def test_empty_value(self):
        baton.set_variable("e", "")
        self.assertEqual(self.read("out/vars/e"), b"")
        self.assertEqual(baton.get_variable("e", "fallback"), "")

    def test_bytes_value(self):
        baton.set_variable("bin", b"a\x00b\xff")
        self.assertEqual(self.read("out/vars/bin"), b"a\x00b\xff")
        baton.set_variable("ba", bytearray(b"xy"))
        self.assertEqual(self.read("out/vars/ba"), b"xy")

    def test_non_utf8_round_trips(self):
        self.write("vars/raw", b"\xff\xfeok")
        v = baton.get_variable("raw")
        self.assertTrue(v.endswith("ok"))
        baton.set_variable("raw", v)
        self.assertEqual(self.read("out/vars/raw"), b"\xff\xfeok")

    def test_other_value_types_rejected(self):
        for bad in (5, 1.5, True, None, ["a"], {"a": 1}):
            with self.subTest(repr(bad)):
                with self.assertRaisesRegex(TypeError, "str or bytes"):
                    baton.set_variable("k", bad)
        self.assertFalse(os.path.exists(self.path("out", "vars", "k")))

    def test_valid_keys(self):
        for key in ("A-z_0.9", ".hidden", "-", "_", "k" * 128, "a..b"):
            with self.subTest(key):
                baton.set_variable(key, "v")
                self.assertEqual(baton.get_variable(key), "v")
                self.assertEqual(self.read("out/vars/" + key), b"v")

    def test_bad_keys(self):
        for key in BAD_KEYS + [None, 5, b"bytes"]:
            with self.subTest(repr(key)):
                with self.assertRaisesRegex(ValueError, "invalid key"):
                    baton.set_variable(key, "v")
                with self.assertRaisesRegex(ValueError, "invalid key"):
                    baton.get_variable(key)
        self.assertFalse(os.path.exists(self.path("out", "vars")) and os.listdir(self.path("out", "vars")))
        self.assertFalse(os.path.exists(self.path("escape")))
        self.assertFalse(os.path.exists(self.path("out", "escape")))

    def test_concurrent_writers(self):
        errors = []

        def writer(i):
            try:
                for _ in range(20):
                    baton.set_variable("same", f"writer{i}")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertRegex(baton.get_variable("same"), r"^writer[0-7]$")
        self.assertNoTempFiles()


class Condition(BatonTestCase):
    def test_true_and_false(self):
        baton.set_condition(True)
        self.assertEqual(self.read("out/condition"), b"true")
        baton.set_condition(False)
        self.assertEqual(self.read("out/condition"), b"false")
        self.assertNoTempFiles()

    def test_bad_values(self):
        baton.set_condition(True)
        for bad in ("true", "false", 1, 0, None, "yes", [], 1.0):
            with self.subTest(repr(bad)):
                with self.assertRaisesRegex(ValueError, "invalid condition"):
                    baton.set_condition(bad)
        self.assertEqual(self.read("out/condition"), b"true")


class Progress(BatonTestCase):
    def test_prints_progress_lines(self):
        r = self.run_script(
            "import baton\nprint('start')\nbaton.progress(0)\nbaton.progress(50)\n"
            "print('middle')\nbaton.progress(100)\n",
            {"BATON_DIR": self.dir},
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, b"start\nPROGRESS: 0\nPROGRESS: 50\nmiddle\nPROGRESS: 100\n")

    def test_flushed_immediately(self):
        # os._exit skips the interpreter's final flush: the line must already be out.
        r = self.run_script("import baton, os\nbaton.progress(42)\nos._exit(0)\n", {"BATON_DIR": self.dir})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, b"PROGRESS: 42\n")

    def test_writes_to_sys_stdout(self):
        with mock.patch("sys.stdout") as out:
            baton.progress(7)
        out.write.assert_called_once_with("PROGRESS: 7\n")
        out.flush.assert_called_once_with()

    def test_bad_values(self):
        for bad in (-1, 101, 1000, 5.5, 50.0, "50", None, True, False, [50]):
            with self.subTest(repr(bad)):
                with mock.patch("sys.stdout") as out:
                    with self.assertRaisesRegex(ValueError, "invalid progress"):
                        baton.progress(bad)
                out.write.assert_not_called()


class AtomicWrites(BatonTestCase):
    def test_no_temp_files_left(self):
        for i in range(20):
            baton.set_variable(f"k{i}", f"v{i}")
            baton.output([i])
            baton.set_condition(i % 2 == 0)
        self.assertEqual(sorted(os.listdir(self.path("out"))), ["condition", "output.json", "vars"])
        self.assertEqual(len(os.listdir(self.path("out", "vars"))), 20)
        self.assertNoTempFiles()

    def test_failed_write_leaves_old_file_and_no_temp(self):
        baton.set_variable("k", "old")
        with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")):
            with self.assertRaisesRegex(baton.BatonError, "cannot write .*No space left"):
                baton.set_variable("k", "new")
        self.assertEqual(self.read("out/vars/k"), b"old")
        self.assertNoTempFiles()

    def test_interrupted_write_leaves_no_temp(self):
        real_fdopen = os.fdopen

        class Boom(BaseException):
            pass

        def fdopen(fd, *a, **kw):
            f = real_fdopen(fd, *a, **kw)
            f.write = mock.Mock(side_effect=Boom())
            return f

        with mock.patch("os.fdopen", fdopen):
            with self.assertRaises(Boom):
                baton.output({"a": 1})
        self.assertFalse(os.path.exists(self.path("out", "output.json")))
        self.assertNoTempFiles()

    def test_temp_names_are_never_valid_keys(self):
        created = []
        real_open = os.open

        def spy(path, *a, **kw):
            created.append(os.path.basename(path))
            return real_open(path, *a, **kw)

        with mock.patch("os.open", spy):
            baton.set_variable("k", "v")
        self.assertEqual(len(created), 1)
        self.assertIn("~", created[0])
        self.assertIsNone(baton._KEY_RE.fullmatch(created[0]))

    def test_umask_respected(self):
        old = os.umask(0o022)
        try:
            baton.set_variable("k", "v")
        finally:
            os.umask(old)
        self.assertEqual(os.stat(self.path("out", "vars", "k")).st_mode & 0o777, 0o644)


class ScriptThroughPythonPath(BatonTestCase):
    def test_full_script(self):
        self.write("input.json", '{"n": 20}')
        self.write("vars/base", "1")
        r = self.run_script(
            "import baton\n"
            "n = baton.input()['n']\n"
            "base = int(baton.get_variable('base', '0'))\n"
            "baton.set_variable('total', str(n + base))\n"
            "baton.output({'total': int(baton.get_variable('total'))})\n"
            "baton.set_condition(n > 10)\n",
            {"BATON_DIR": self.dir},
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(self.read("out/output.json")), {"total": 21})
        self.assertEqual(self.read("out/vars/total"), b"21")
        self.assertEqual(self.read("out/condition"), b"true")

    def test_uncaught_error_fails_the_script(self):
        r = self.run_script("import baton\nbaton.progress(500)\n", {"BATON_DIR": self.dir})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"invalid progress", r.stderr)


if __name__ == "__main__":
    unittest.main()
