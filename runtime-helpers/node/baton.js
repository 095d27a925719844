"use strict";
/**
 * Baton runtime helpers for Node.js (CommonJS, no packages; tested on Node 20).
 *
 *   const baton = require("baton");
 *
 *   const data = baton.input();               // the input JSON, parsed ({} when there is none)
 *   baton.output({ rows: 42 });               // the output JSON for the next run (last write wins)
 *   const token = baton.getVariable("token"); // a variable's value (string) or null / the default
 *   baton.setVariable("cursor", "1234");      // set a variable (string or Buffer/Uint8Array)
 *   baton.setCondition(true);                 // the flag read by on_condition actions
 *   const meta = baton.event();               // run metadata: job_id, event_id, attempt, ...
 *   baton.progress(50);                       // prints "PROGRESS: 50" on stdout
 *
 * The executor puts this file's directory on NODE_PATH (and in BATON_HELPERS)
 * and sets BATON_DIR, the per-run directory read and written here. All
 * functions are synchronous. Every failure throws a BatonError (a subclass of
 * Error) with a `code`:
 *   BATON_DIR_UNSET     BATON_DIR is not set / not a directory
 *   BATON_IO            a file cannot be read or written, or holds invalid JSON
 *   BATON_INVALID_KEY, BATON_INVALID_VALUE, BATON_INVALID_OUTPUT,
 *   BATON_INVALID_CONDITION, BATON_INVALID_PROGRESS   a bad argument
 *
 * From an ES module, NODE_PATH is not used: write
 *   import { createRequire } from "node:module";
 *   const baton = createRequire(import.meta.url)("baton");
 *
 * Protocol: docs/helpers.md in the Baton repository.
 */

const fs = require("fs");
const path = require("path");
const crypto = require("crypto");

const KEY_RE = /^[A-Za-z0-9_.-]{1,128}$/;
const TMP_PREFIX = ".~baton-tmp.";
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

class BatonError extends Error {
  constructor(message, code) {
    super(message);
    this.name = "BatonError";
    this.code = code;
  }
}

/** A short description of a bad argument, for error messages. Never throws. */
function describe(v) {
  try {
    if (typeof v === "string") return JSON.stringify(v);
    if (typeof v === "bigint") return `${v}n`;
    if (v !== null && typeof v === "object") return JSON.stringify(v) ?? typeof v;
    return String(v);
  } catch (_) {
    return typeof v;
  }
}

function dir() {
  const d = process.env.BATON_DIR;
  if (!d) {
    throw new BatonError("BATON_DIR is not set: run this script through Baton", "BATON_DIR_UNSET");
  }
  let st;
  try {
    st = fs.statSync(d);
  } catch (_) {
    st = null;
  }
  if (!st || !st.isDirectory()) {
    throw new BatonError(`BATON_DIR (${d}) is not a directory`, "BATON_DIR_UNSET");
  }
  return d;
}

function checkKey(func, key) {
  if (typeof key !== "string" || !KEY_RE.test(key) || key === "." || key === "..") {
    throw new BatonError(
      `baton.${func}: invalid key ${describe(key)}: a key is a string of 1 to 128 ` +
        "characters from A-Z a-z 0-9 _ . - and is not '.' or '..'",
      "BATON_INVALID_KEY",
    );
  }
}

/** The file's bytes, or null when it does not exist. */
function readBytes(file) {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    if (e.code === "ENOENT") return null;
    throw new BatonError(`cannot read ${file}: ${e.message}`, "BATON_IO");
  }
}

function readJson(file, what, missingOk, fallback) {
  const data = readBytes(file);
  if (data === null) {
    if (missingOk) return fallback;
    throw new BatonError(`cannot read ${file}: the ${what} is missing`, "BATON_IO");
  }
  try {
    return JSON.parse(data.toString("utf8"));
  } catch (e) {
    throw new BatonError(`the ${what} (${file}) is not valid JSON: ${e.message}`, "BATON_IO");
  }
}

/**
 * Write data to dirpath/name through a temporary file and a rename: a crash
 * can leave a temporary file behind but never a partial dirpath/name.
 * Temporary names contain "~", which no key may contain.
 */
function writeAtomic(dirpath, name, data) {
  const dest = path.join(dirpath, name);
  let tmp;
  let fd;
  try {
    fs.mkdirSync(dirpath, { recursive: true });
    for (let attempt = 0; ; attempt++) {
      tmp = path.join(dirpath, `${TMP_PREFIX}${process.pid}.${crypto.randomBytes(4).toString("hex")}`);
      try {
        fd = fs.openSync(tmp, "wx", 0o666); // the process umask applies
        break;
      } catch (e) {
        if (e.code !== "EEXIST" || attempt >= 99) throw e;
      }
    }
  } catch (e) {
    throw new BatonError(`cannot write ${dest}: ${e.message}`, "BATON_IO");
  }
  try {
    fs.writeFileSync(fd, data);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, dest);
  } catch (e) {
    if (fd !== undefined) {
      try {
        fs.closeSync(fd);
      } catch (_) {
        /* already reporting an error */
      }
    }
    try {
      fs.unlinkSync(tmp);
    } catch (_) {
      /* already reporting an error */
    }
    throw new BatonError(`cannot write ${dest}: ${e.message}`, "BATON_IO");
  }
}

/** The run's input, parsed from JSON; {} when the run has no input. */
function input() {
  const d = dir();
  return readJson(path.join(d, "input.json"), "input", true, {});
}

/**
 * Set the run's output to value serialised as JSON (last write wins). Pass the
 * value itself, not a JSON string (a string is stored as a JSON string).
 * Follows JSON.stringify (toJSON is honoured, NaN becomes null); throws when
 * the value has no JSON form (undefined, a function, a symbol, a BigInt, a
 * cycle) or contains a string with a lone surrogate.
 */
function output(value) {
  const d = dir();
  let text;
  try {
    text = JSON.stringify(value, function (key, v) {
      if (LONE_SURROGATE.test(key) || (typeof v === "string" && LONE_SURROGATE.test(v))) {
        throw new Error("a string contains a lone surrogate");
      }
      return v;
    });
  } catch (e) {
    throw new BatonError(
      `baton.output: the output cannot be represented in JSON: ${e.message}`,
      "BATON_INVALID_OUTPUT",
    );
  }
  if (text === undefined) {
    throw new BatonError(
      `baton.output: the output cannot be represented in JSON: ${typeof value} has no JSON form`,
      "BATON_INVALID_OUTPUT",
    );
  }
  writeAtomic(path.join(d, "out"), "output.json", Buffer.from(text, "utf8"));
}

/**
 * The variable's value as a string (decoded as UTF-8), or defaultValue when it
 * is not set. A value set earlier in this run wins over the run's starting value.
 */
function getVariable(key, defaultValue = null) {
  const d = dir();
  checkKey("getVariable", key);
  for (const file of [path.join(d, "out", "vars", key), path.join(d, "vars", key)]) {
    const data = readBytes(file);
    if (data !== null) return data.toString("utf8");
  }
  return defaultValue;
}

/**
 * Set a variable. value is a string (stored as UTF-8) or a Buffer/Uint8Array
 * (stored as is). Other types throw: convert explicitly (String(n), JSON.stringify(obj)).
 */
function setVariable(key, value) {
  const d = dir();
  checkKey("setVariable", key);
  let data;
  if (typeof value === "string") {
    data = Buffer.from(value, "utf8");
  } else if (value instanceof Uint8Array) {
    data = value;
  } else {
    throw new BatonError(
      `baton.setVariable: the value must be a string or a Buffer, not ${value === null ? "null" : typeof value}; ` +
        "convert it explicitly, e.g. String(n) or JSON.stringify(obj)",
      "BATON_INVALID_VALUE",
    );
  }
  writeAtomic(path.join(d, "out", "vars"), key, data);
}

/** Set the condition flag read by on_condition actions: true or false. */
function setCondition(value) {
  const d = dir();
  if (typeof value !== "boolean") {
    throw new BatonError(
      `baton.setCondition: invalid condition ${describe(value)}: use true or false`,
      "BATON_INVALID_CONDITION",
    );
  }
  writeAtomic(path.join(d, "out"), "condition", value ? "true" : "false");
}

/**
 * The run metadata: an object with job_id, event_id, event_name, attempt,
 * parent_job_id, root_job_id, runtime and executor (ids may be null).
 */
function event() {
  const d = dir();
  return readJson(path.join(d, "event.json"), "run metadata", false);
}

/**
 * Report progress: prints the line "PROGRESS: n" on stdout. n is an integer
 * from 0 to 100. (On Linux, writes to a pipe or file are synchronous, so the
 * line is out before progress() returns.)
 */
function progress(n) {
  dir();
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > 100) {
    throw new BatonError(
      `baton.progress: invalid progress ${describe(n)}: ` +
        "use an integer from 0 to 100",
      "BATON_INVALID_PROGRESS",
    );
  }
  process.stdout.write(`PROGRESS: ${n}\n`);
}

module.exports = {
  BatonError,
  input,
  output,
  getVariable,
  setVariable,
  setCondition,
  event,
  progress,
};
