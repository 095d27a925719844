"use strict";
// Tests for baton.js: node --test runtime-helpers/node/test.js (node:test, no packages).

const { describe, it, beforeEach, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { spawnSync } = require("node:child_process");

const HERE = __dirname;
const baton = require(path.join(HERE, "baton.js"));

const NO_DIR_MESSAGE = "BATON_DIR is not set: run this script through Baton";
const UNICODE = "héllo € 😀 中文 \u0301";
const BAD_KEYS = [
  "", ".", "..", "a/b", "../escape", "/abs", "a b", "tab\tx", "nl\nx", "star*", "q?",
  "br[a]", "café", "dollar$", "tilde~", "semi;colon", "k".repeat(129), "\u0660", "ａ",
];

let dir;
let savedDir;

function p(...parts) {
  return path.join(dir, ...parts);
}

function write(rel, data) {
  const file = p(...rel.split("/"));
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, data);
}

function read(rel) {
  return fs.readFileSync(p(...rel.split("/")));
}

function tempFiles(root = dir) {
  const found = [];
  for (const entry of fs.readdirSync(root, { withFileTypes: true })) {
    const full = path.join(root, entry.name);
    if (entry.isDirectory()) found.push(...tempFiles(full));
    else if (entry.name.includes("~")) found.push(full);
  }
  return found;
}

function assertNoTempFiles() {
  assert.deepEqual(tempFiles(), []);
}

// Run code in a fresh node that finds the helper through NODE_PATH.
function runScript(code, { esm = false, env = {} } = {}) {
  const args = esm ? ["--input-type=module", "-e", code] : ["-e", code];
  return spawnSync(process.execPath, args, {
    cwd: os.tmpdir(),
    env: { ...process.env, NODE_PATH: HERE, BATON_HELPERS: HERE, BATON_DIR: dir, ...env },
    encoding: "utf8",
    timeout: 60_000,
  });
}

beforeEach(() => {
  savedDir = process.env.BATON_DIR;
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "baton-node-test."));
  process.env.BATON_DIR = dir;
});

afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
  if (savedDir === undefined) delete process.env.BATON_DIR;
  else process.env.BATON_DIR = savedDir;
});

const CALLS = {
  input: () => baton.input(),
  output: () => baton.output({}),
  getVariable: () => baton.getVariable("k"),
  setVariable: () => baton.setVariable("k", "v"),
  setCondition: () => baton.setCondition(true),
  event: () => baton.event(),
  progress: () => baton.progress(5),
};

describe("missing BATON_DIR", () => {
  it("every function fails with a clear message", () => {
    delete process.env.BATON_DIR;
    for (const [name, call] of Object.entries(CALLS)) {
      assert.throws(call, (e) => {
        assert.ok(e instanceof baton.BatonError, name);
        assert.ok(e instanceof Error, name);
        assert.equal(e.code, "BATON_DIR_UNSET", name);
        assert.ok(e.message.includes(NO_DIR_MESSAGE), `${name}: ${e.message}`);
        return true;
      });
    }
  });

  it("empty counts as unset", () => {
    process.env.BATON_DIR = "";
    assert.throws(() => baton.input(), /BATON_DIR is not set/);
  });

  it("a path that is not a directory fails", () => {
    process.env.BATON_DIR = p("nope");
    for (const call of Object.values(CALLS)) {
      assert.throws(call, /is not a directory/);
    }
  });

  it("require works without BATON_DIR", () => {
    const r = runScript('require("baton"); console.log("loaded")', { env: { BATON_DIR: "" } });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "loaded\n");
  });
});

describe("input", () => {
  it("returns the parsed input", () => {
    write("input.json", '{"a": [1, 2.5, null, true], "s": "h\\u00e9 😀"}');
    assert.deepEqual(baton.input(), { a: [1, 2.5, null, true], s: "hé 😀" });
  });

  it("accepts any JSON value", () => {
    for (const [text, value] of [["[1, 2]", [1, 2]], ['"s"', "s"], ["null", null], ["42", 42]]) {
      write("input.json", text);
      assert.deepEqual(baton.input(), value);
    }
  });

  it("absent input is {}", () => {
    assert.deepEqual(baton.input(), {});
    baton.input().x = 1;
    assert.deepEqual(baton.input(), {});
  });

  it("invalid JSON is an error", () => {
    write("input.json", "{not json");
    assert.throws(() => baton.input(), (e) => e.code === "BATON_IO" && /not valid JSON/.test(e.message));
  });
});

describe("event", () => {
  const META = {
    job_id: "0190a0b4-0000-7000-8000-000000000001",
    event_id: "0190a0b4-0000-7000-8000-000000000002",
    event_name: "nightly report",
    attempt: 2,
    parent_job_id: null,
    root_job_id: null,
    runtime: "node",
    executor: "ssh",
  };

  it("returns the parsed metadata", () => {
    write("event.json", JSON.stringify(META));
    assert.deepEqual(baton.event(), META);
  });

  it("missing metadata is an error", () => {
    assert.throws(() => baton.event(), /event\.json/);
  });
});

describe("output", () => {
  it("writes JSON", () => {
    baton.output({ rows: 42, names: ["a", "b"], ok: true, none: null });
    assert.deepEqual(JSON.parse(read("out/output.json")), { rows: 42, names: ["a", "b"], ok: true, none: null });
    assertNoTempFiles();
  });

  it("last write wins", () => {
    baton.output({ n: 1 });
    baton.output([1, 2, 3]);
    assert.deepEqual(JSON.parse(read("out/output.json")), [1, 2, 3]);
  });

  it("unicode is written as UTF-8", () => {
    baton.output({ s: UNICODE, [UNICODE]: "key" });
    const data = read("out/output.json");
    assert.deepEqual(JSON.parse(data.toString("utf8")), { s: UNICODE, [UNICODE]: "key" });
    assert.ok(data.includes(Buffer.from("😀", "utf8")));
  });

  it("a string is stored as a JSON string", () => {
    baton.output('{"a": 1}');
    assert.equal(JSON.parse(read("out/output.json")), '{"a": 1}');
  });

  it("values without a JSON form are rejected", () => {
    baton.output({ keep: 1 });
    const cyclic = [];
    cyclic.push(cyclic);
    for (const bad of [undefined, () => 1, Symbol("s"), 10n, cyclic, "\ud800", { ["k\udc00"]: 1 }, ["\udbff"]]) {
      assert.throws(
        () => baton.output(bad),
        (e) => e.code === "BATON_INVALID_OUTPUT" && /cannot be represented in JSON/.test(e.message),
      );
    }
    assert.deepEqual(JSON.parse(read("out/output.json")), { keep: 1 });
    assertNoTempFiles();
  });

  it("follows JSON.stringify for toJSON and dates", () => {
    baton.output({ when: new Date(0), custom: { toJSON: () => "x" } });
    assert.deepEqual(JSON.parse(read("out/output.json")), { when: "1970-01-01T00:00:00.000Z", custom: "x" });
  });
});

describe("variables", () => {
  it("reads starting values", () => {
    write("vars/token", "secret-value");
    assert.equal(baton.getVariable("token"), "secret-value");
  });

  it("unset returns null or the default", () => {
    assert.equal(baton.getVariable("missing"), null);
    assert.equal(baton.getVariable("missing", "fallback"), "fallback");
    assert.equal(baton.getVariable("missing", 0), 0);
  });

  it("an empty value is not unset", () => {
    write("vars/empty", "");
    assert.equal(baton.getVariable("empty", "fallback"), "");
  });

  it("round trip", () => {
    baton.setVariable("cursor", "1234");
    assert.equal(baton.getVariable("cursor"), "1234");
    assert.equal(read("out/vars/cursor").toString(), "1234");
    assertNoTempFiles();
  });

  it("a value set in the run overrides the starting value", () => {
    write("vars/k", "old");
    assert.equal(baton.getVariable("k"), "old");
    baton.setVariable("k", "new");
    assert.equal(baton.getVariable("k"), "new");
    assert.equal(read("vars/k").toString(), "old");
  });

  it("last write wins", () => {
    for (const v of ["one", "two", "three"]) baton.setVariable("k", v);
    assert.equal(read("out/vars/k").toString(), "three");
    assertNoTempFiles();
  });

  it("unicode values", () => {
    baton.setVariable("uni", UNICODE);
    assert.deepEqual(read("out/vars/uni"), Buffer.from(UNICODE, "utf8"));
    assert.equal(baton.getVariable("uni"), UNICODE);
  });

  it("values with newlines are stored exactly", () => {
    for (const v of ["line one\nline two\n\n", "\n", "crlf\r\n", " padded "]) {
      baton.setVariable("multi", v);
      assert.deepEqual(read("out/vars/multi"), Buffer.from(v, "utf8"));
      assert.equal(baton.getVariable("multi"), v);
    }
  });

  it("empty value", () => {
    baton.setVariable("e", "");
    assert.equal(read("out/vars/e").length, 0);
    assert.equal(baton.getVariable("e", "fallback"), "");
  });

  it("Buffer and Uint8Array values are stored as is", () => {
    baton.setVariable("bin", Buffer.from([0x61, 0x00, 0x62, 0xff]));
    assert.deepEqual(read("out/vars/bin"), Buffer.from([0x61, 0x00, 0x62, 0xff]));
    baton.setVariable("u8", new Uint8Array([120, 121]));
    assert.equal(read("out/vars/u8").toString(), "xy");
  });

  it("other value types are rejected", () => {
    for (const bad of [5, 1.5, true, null, undefined, ["a"], { a: 1 }]) {
      assert.throws(
        () => baton.setVariable("k", bad),
        (e) => e.code === "BATON_INVALID_VALUE" && /string or a Buffer/.test(e.message),
      );
    }
    assert.ok(!fs.existsSync(p("out", "vars", "k")));
  });

  it("valid keys", () => {
    for (const key of ["A-z_0.9", ".hidden", "-", "_", "k".repeat(128), "a..b"]) {
      baton.setVariable(key, "v");
      assert.equal(baton.getVariable(key), "v");
      assert.equal(read(`out/vars/${key}`).toString(), "v");
    }
  });

  it("bad keys", () => {
    for (const key of [...BAD_KEYS, null, undefined, 5, ["a"]]) {
      for (const call of [() => baton.setVariable(key, "v"), () => baton.getVariable(key)]) {
        assert.throws(call, (e) => e.code === "BATON_INVALID_KEY" && /invalid key/.test(e.message));
      }
    }
    const vars = p("out", "vars");
    assert.ok(!fs.existsSync(vars) || fs.readdirSync(vars).length === 0);
    assert.ok(!fs.existsSync(p("escape")));
    assert.ok(!fs.existsSync(p("out", "escape")));
  });
});

describe("setCondition", () => {
  it("writes true and false", () => {
    baton.setCondition(true);
    assert.equal(read("out/condition").toString(), "true");
    baton.setCondition(false);
    assert.equal(read("out/condition").toString(), "false");
    assertNoTempFiles();
  });

  it("rejects anything but a boolean", () => {
    baton.setCondition(true);
    for (const bad of ["true", "false", 1, 0, null, undefined, "yes", [], {}, Object.create(null)]) {
      assert.throws(
        () => baton.setCondition(bad),
        (e) => e.code === "BATON_INVALID_CONDITION" && /invalid condition/.test(e.message),
      );
    }
    assert.equal(read("out/condition").toString(), "true");
  });
});

describe("progress", () => {
  it("prints PROGRESS lines in order with other output", () => {
    const r = runScript(
      'const b = require("baton"); console.log("start"); b.progress(0); b.progress(50);' +
        ' console.log("middle"); b.progress(100);',
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "start\nPROGRESS: 0\nPROGRESS: 50\nmiddle\nPROGRESS: 100\n");
  });

  it("is written out before an immediate exit", () => {
    const r = runScript('require("baton").progress(42); process.exit(0);');
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "PROGRESS: 42\n");
  });

  it("rejects values that are not integers from 0 to 100", () => {
    const original = process.stdout.write;
    let written = "";
    process.stdout.write = (chunk) => {
      written += chunk;
      return true;
    };
    try {
      for (const bad of [-1, 101, 1000, 5.5, "50", null, undefined, true, NaN, Infinity, 50n, [50]]) {
        assert.throws(
          () => baton.progress(bad),
          (e) => e.code === "BATON_INVALID_PROGRESS" && /invalid progress/.test(e.message),
        );
      }
    } finally {
      process.stdout.write = original;
    }
    assert.equal(written, "");
  });
});

describe("atomic writes", () => {
  it("leave no temporary files", () => {
    for (let i = 0; i < 20; i++) {
      baton.setVariable(`k${i}`, `v${i}`);
      baton.output([i]);
      baton.setCondition(i % 2 === 0);
    }
    assert.deepEqual(fs.readdirSync(p("out")).sort(), ["condition", "output.json", "vars"]);
    assert.equal(fs.readdirSync(p("out", "vars")).length, 20);
    assertNoTempFiles();
  });

  it("a failed write keeps the old file and removes the temporary file", () => {
    baton.setVariable("k", "old");
    const original = fs.renameSync;
    fs.renameSync = () => {
      const e = new Error("ENOSPC: no space left on device");
      e.code = "ENOSPC";
      throw e;
    };
    try {
      assert.throws(
        () => baton.setVariable("k", "new"),
        (e) => e.code === "BATON_IO" && /cannot write .*no space left/.test(e.message),
      );
    } finally {
      fs.renameSync = original;
    }
    assert.equal(read("out/vars/k").toString(), "old");
    assertNoTempFiles();
  });

  it("temporary names are never valid keys, and skip existing files", () => {
    const created = [];
    const original = fs.openSync;
    let first = true;
    fs.openSync = (file, ...rest) => {
      created.push(path.basename(file));
      if (first) {
        // Pretend the first name is taken by a stale temporary file.
        first = false;
        const e = new Error("EEXIST: file already exists");
        e.code = "EEXIST";
        throw e;
      }
      return original(file, ...rest);
    };
    try {
      baton.setVariable("k", "v");
    } finally {
      fs.openSync = original;
    }
    assert.equal(created.length, 2);
    for (const name of created) {
      assert.ok(name.includes("~"), name);
      assert.ok(!/^[A-Za-z0-9_.-]{1,128}$/.test(name), name);
    }
    assert.equal(read("out/vars/k").toString(), "v");
    assertNoTempFiles();
  });

  it("files get the usual permissions (umask applies)", () => {
    const old = process.umask(0o022);
    try {
      baton.setVariable("k", "v");
    } finally {
      process.umask(old);
    }
    assert.equal(fs.statSync(p("out", "vars", "k")).mode & 0o777, 0o644);
  });
});

describe("scripts through NODE_PATH", () => {
  it("a full CommonJS script", () => {
    write("input.json", '{"n": 20}');
    write("vars/base", "1");
    const r = runScript(
      'const baton = require("baton");' +
        "const n = baton.input().n;" +
        'const base = Number(baton.getVariable("base", "0"));' +
        'baton.setVariable("total", String(n + base));' +
        'baton.output({ total: Number(baton.getVariable("total")) });' +
        "baton.setCondition(n > 10);",
    );
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(read("out/output.json")), { total: 21 });
    assert.equal(read("out/vars/total").toString(), "21");
    assert.equal(read("out/condition").toString(), "true");
  });

  it("an ES module through createRequire", () => {
    const r = runScript(
      'import { createRequire } from "node:module";' +
        'const baton = createRequire(import.meta.url)("baton");' +
        'baton.setVariable("esm", "yes");',
      { esm: true },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(read("out/vars/esm").toString(), "yes");
  });

  it("an uncaught error fails the script", () => {
    const r = runScript('require("baton").progress(500);');
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /invalid progress/);
  });
});
