//! The files a run shares with the runtime helpers (`docs/helpers.md`, "The protocol").
//!
//! * [`ScratchDir`]: `baton.sh`, `baton.py` and `baton.js`, embedded in the binary and written
//!   once per worker into a private directory, so the worker binary is self-contained.
//! * [`prepare`]: the per-run directory `$BATON_DIR` with `input.json`, `event.json` and
//!   `vars/KEY`.
//! * [`collect`]: what the script left in `out/` (`output.json`, `condition`, `vars/KEY`),
//!   checked against the limits.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// `runtime-helpers/bash/baton.sh`.
pub const BATON_SH: &str = include_str!("../../runtime-helpers/bash/baton.sh");
/// `runtime-helpers/python/baton.py`.
pub const BATON_PY: &str = include_str!("../../runtime-helpers/python/baton.py");
/// `runtime-helpers/node/baton.js`.
pub const BATON_JS: &str = include_str!("../../runtime-helpers/node/baton.js");

/// The worker's private scratch directory: `helpers/` (the runtime helpers) and `runs/` (one
/// directory per run). Removed when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    root: tempfile::TempDir,
}

impl ScratchDir {
    /// Creates the directory (mode 0700) under `parent` (the system temp dir when `None`) and
    /// writes the helpers into `helpers/`.
    pub fn create(parent: Option<&Path>) -> io::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("baton-worker-");
        let root = match parent {
            Some(p) => builder.tempdir_in(p)?,
            None => builder.tempdir()?,
        };
        fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let helpers = root.path().join("helpers");
        fs::DirBuilder::new().mode(0o755).create(&helpers)?;
        for (name, text) in [
            ("baton.sh", BATON_SH),
            ("baton.py", BATON_PY),
            ("baton.js", BATON_JS),
        ] {
            write_new(&helpers.join(name), text.as_bytes(), 0o644)?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(root.path().join("runs"))?;
        Ok(ScratchDir { root })
    }

    /// The directory holding `baton.sh`, `baton.py` and `baton.js`.
    pub fn helpers_dir(&self) -> PathBuf {
        self.root.path().join("helpers")
    }

    /// Where per-run directories are created.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.path().join("runs")
    }
}

/// Whether `key` is a valid variable key: `^[A-Za-z0-9_.-]{1,128}$`, and not `.` or `..`.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What goes into a fresh run directory.
#[derive(Debug, Clone, Default)]
pub struct RunFiles {
    /// `input.json` (JSON text); not written when empty.
    pub input_json: String,
    /// `event.json` (the run metadata object).
    pub event: Value,
    /// `vars/KEY`: the variables the run may read (key → raw value).
    pub variables: BTreeMap<String, Vec<u8>>,
}

/// Creates `dir` (mode 0700; it must not exist) and writes the run's files into it. Variables
/// whose key is invalid are skipped and returned, so the caller can report them.
pub fn prepare(dir: &Path, files: &RunFiles) -> io::Result<Vec<String>> {
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    if !files.input_json.trim().is_empty() {
        write_new(&dir.join("input.json"), files.input_json.as_bytes(), 0o600)?;
    }
    let event = serde_json::to_vec(&files.event).map_err(io::Error::other)?;
    write_new(&dir.join("event.json"), &event, 0o600)?;
    let vars = dir.join("vars");
    fs::DirBuilder::new().mode(0o700).create(&vars)?;
    let mut skipped = Vec::new();
    for (key, value) in &files.variables {
        if is_valid_key(key) {
            write_new(&vars.join(key), value, 0o600)?;
        } else {
            skipped.push(key.clone());
        }
    }
    Ok(skipped)
}

fn write_new(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content)
}

/// What a run left in `out/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// `out/output.json`, checked to be valid JSON within the limit (`None`: no output).
    pub output_json: Option<String>,
    /// `out/condition` (`None`: not set).
    pub condition: Option<bool>,
    /// `out/vars/KEY` with a valid key and a valid value.
    pub variables: BTreeMap<String, String>,
    /// What was wrong, one sentence each (the parts in error are left out above).
    pub problems: Vec<String>,
}

/// Reads `dir/out/`. `max_bytes` bounds `output.json` and, separately, the total size of the
/// variable values. Never fails: unreadable or invalid parts are described in
/// [`Collected::problems`].
pub fn collect(dir: &Path, max_bytes: usize) -> Collected {
    let out = dir.join("out");
    let mut collected = Collected::default();
    match read_output(&out.join("output.json"), max_bytes) {
        Ok(output) => collected.output_json = output,
        Err(problem) => collected.problems.push(problem),
    }
    match read_condition(&out.join("condition")) {
        Ok(condition) => collected.condition = condition,
        Err(problem) => collected.problems.push(problem),
    }
    read_variables(&out.join("vars"), max_bytes, &mut collected);
    collected
}

/// Reads at most `limit + 1` bytes of a regular file; `Ok(None)` when it does not exist.
fn read_bounded(path: &Path, name: &str, limit: usize) -> Result<Option<Vec<u8>>, String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {name}: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("{name} is not a regular file"));
    }
    let file = fs::File::open(path).map_err(|e| format!("cannot read {name}: {e}"))?;
    let mut data = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    Ok(Some(data))
}

fn read_output(path: &Path, max_bytes: usize) -> Result<Option<String>, String> {
    // The size from the metadata is reported when the file is too large (it may be far larger
    // than what is read).
    let size = fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
    let Some(data) = read_bounded(path, "output.json", max_bytes)? else {
        return Ok(None);
    };
    if data.len() > max_bytes {
        let size = size.max(data.len() as u64);
        return Err(format!(
            "output is {size} bytes, over the {max_bytes}-byte limit"
        ));
    }
    let text = String::from_utf8(data).map_err(|e| {
        format!(
            "output.json is not valid UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("output.json is not valid JSON: {e}"))?;
    if contains_nul(&value) {
        return Err(
            "output.json contains the character U+0000 (\\u0000), which cannot be stored"
                .to_owned(),
        );
    }
    Ok(Some(text))
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn read_condition(path: &Path) -> Result<Option<bool>, String> {
    let Some(data) = read_bounded(path, "condition", 64)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&data);
    // The helpers write exactly `true` or `false`; a trailing newline from a hand-written
    // `echo true > "$BATON_DIR/out/condition"` is tolerated.
    match text.trim_matches(|c: char| c.is_ascii_whitespace()) {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        _ => {
            let mut shown: String = text.chars().take(32).collect();
            if data.len() > shown.len() {
                shown.push('…');
            }
            Err(format!(
                "condition must be `true` or `false`, not `{}`",
                shown.escape_debug()
            ))
        }
    }
}

fn read_variables(dir: &Path, max_bytes: usize, collected: &mut Collected) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            collected
                .problems
                .push(format!("cannot read the variables directory: {e}"));
            return;
        }
    };
    let mut names: Vec<String> = Vec::new();
    for entry in entries {
        match entry {
            // Names that are not valid keys (temporary files `.~baton-tmp.*`, anything the
            // script put there by hand) are not variables.
            Ok(entry) => match entry.file_name().into_string() {
                Ok(name) if is_valid_key(&name) => names.push(name),
                _ => {}
            },
            Err(e) => {
                collected
                    .problems
                    .push(format!("cannot read the variables directory: {e}"));
                return;
            }
        }
    }
    names.sort();
    let mut total = 0usize;
    for name in names {
        let what = format!("variable `{name}`");
        let data = match read_bounded(&dir.join(&name), &what, max_bytes) {
            Ok(Some(data)) => data,
            Ok(None) => continue, // removed meanwhile
            Err(problem) => {
                collected.problems.push(problem);
                continue;
            }
        };
        total += data.len();
        if total > max_bytes {
            collected.problems.push(format!(
                "variables written by the run are over the {max_bytes}-byte limit (at `{name}`)"
            ));
            return;
        }
        match String::from_utf8(data) {
            Ok(value) => {
                collected.variables.insert(name, value);
            }
            Err(_) => collected
                .problems
                .push(format!("{what} is not valid UTF-8 text")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    fn out_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir_all(out.join("vars")).unwrap();
        (dir, out)
    }

    #[test]
    fn keys() {
        for ok in ["a", "A-b_c.d", "0", "...", "a..b", &"k".repeat(128)] {
            assert!(is_valid_key(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            ".~baton-tmp.1.0",
            &"k".repeat(129),
        ] {
            assert!(!is_valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn nothing_written_is_nothing_collected() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(collect(dir.path(), 100), Collected::default());
        let (dir, _out) = out_dir();
        assert_eq!(collect(dir.path(), 100), Collected::default());
    }

    #[test]
    fn valid_outputs() {
        let (dir, out) = out_dir();
        fs::write(out.join("output.json"), r#"{"rows": 3, "s": "é"}"#).unwrap();
        fs::write(out.join("condition"), "true").unwrap();
        fs::write(out.join("vars/last_id"), "42").unwrap();
        fs::write(out.join("vars/empty"), "").unwrap();
        fs::write(out.join("vars/multi"), "a\nb\n").unwrap();
        fs::write(out.join("vars/.~baton-tmp.123.0"), "partial").unwrap();
        let c = collect(dir.path(), 1024);
        assert_eq!(c.problems, Vec::<String>::new());
        assert_eq!(c.output_json.as_deref(), Some(r#"{"rows": 3, "s": "é"}"#));
        assert_eq!(c.condition, Some(true));
        let vars: Vec<(&str, &str)> = c
            .variables
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            vars,
            vec![("empty", ""), ("last_id", "42"), ("multi", "a\nb\n")]
        );
    }

    #[test]
    fn malformed_output() {
        let (dir, out) = out_dir();
        fs::write(out.join("output.json"), "not json").unwrap();
        let c = collect(dir.path(), 1024);
        assert_eq!(c.output_json, None);
        assert_eq!(
            c.problems,
            vec!["output.json is not valid JSON: expected ident at line 1 column 2"]
        );
        fs::write(out.join("output.json"), "").unwrap();
        let c = collect(dir.path(), 1024);
        assert!(
            c.problems[0].starts_with("output.json is not valid JSON: EOF while parsing"),
            "{:?}",
            c.problems
        );
        fs::write(out.join("output.json"), "{} {}").unwrap();
        assert!(collect(dir.path(), 1024).problems[0].contains("trailing characters"));
        fs::write(out.join("output.json"), b"\"\xff\"").unwrap();
        assert!(collect(dir.path(), 1024).problems[0].contains("not valid UTF-8"));
        fs::write(out.join("output.json"), r#"{"a": "\u0000"}"#).unwrap();
        assert!(collect(dir.path(), 1024).problems[0].contains("U+0000"));
        fs::write(out.join("output.json"), "NaN").unwrap();
        assert!(collect(dir.path(), 1024).problems[0].contains("not valid JSON"));
    }

    #[test]
    fn oversized_output() {
        let (dir, out) = out_dir();
        let big = format!("\"{}\"", "x".repeat(1998));
        fs::write(out.join("output.json"), &big).unwrap();
        let c = collect(dir.path(), 1000);
        assert_eq!(c.output_json, None);
        assert_eq!(
            c.problems,
            vec!["output is 2000 bytes, over the 1000-byte limit"]
        );
        // exactly at the limit is fine
        assert!(collect(dir.path(), 2000).problems.is_empty());
    }

    #[test]
    fn conditions() {
        let (dir, out) = out_dir();
        for (text, expected) in [("true", true), ("false", false), ("true\n", true)] {
            fs::write(out.join("condition"), text).unwrap();
            let c = collect(dir.path(), 100);
            assert_eq!(c.condition, Some(expected), "{text:?}");
            assert!(c.problems.is_empty());
        }
        for bad in ["yes", "TRUE", "", "1"] {
            fs::write(out.join("condition"), bad).unwrap();
            let c = collect(dir.path(), 100);
            assert_eq!(c.condition, None);
            assert_eq!(
                c.problems,
                vec![format!("condition must be `true` or `false`, not `{bad}`")]
            );
        }
    }

    #[test]
    fn bad_variables() {
        let (dir, out) = out_dir();
        fs::write(out.join("vars/bin"), b"\xff\x00").unwrap();
        fs::write(out.join("vars/ok"), "v").unwrap();
        fs::create_dir(out.join("vars/adir")).unwrap();
        let c = collect(dir.path(), 100);
        assert_eq!(c.variables.get("ok").map(String::as_str), Some("v"));
        assert!(!c.variables.contains_key("bin"));
        assert_eq!(
            c.problems,
            vec![
                "variable `adir` is not a regular file",
                "variable `bin` is not valid UTF-8 text"
            ]
        );

        let (dir, out) = out_dir();
        fs::write(out.join("vars/a"), "x".repeat(60)).unwrap();
        fs::write(out.join("vars/b"), "x".repeat(60)).unwrap();
        let c = collect(dir.path(), 100);
        assert_eq!(
            c.problems,
            vec!["variables written by the run are over the 100-byte limit (at `b`)"]
        );
    }

    #[test]
    fn prepare_writes_the_protocol_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        let files = RunFiles {
            input_json: r#"{"count": 3}"#.into(),
            event: serde_json::json!({"job_id": "j", "attempt": 1}),
            variables: BTreeMap::from([
                ("greeting".to_owned(), b"hello".to_vec()),
                ("..".to_owned(), b"x".to_vec()),
                ("a/b".to_owned(), b"x".to_vec()),
            ]),
        };
        let skipped = prepare(&dir, &files).unwrap();
        assert_eq!(skipped, vec!["..".to_owned(), "a/b".to_owned()]);
        assert_eq!(
            fs::read_to_string(dir.join("input.json")).unwrap(),
            r#"{"count": 3}"#
        );
        let event: Value =
            serde_json::from_slice(&fs::read(dir.join("event.json")).unwrap()).unwrap();
        assert_eq!(event["attempt"], 1);
        assert_eq!(fs::read(dir.join("vars/greeting")).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.join("vars")).unwrap().count(), 1);
        // a second prepare of the same directory fails rather than mixing two runs
        assert!(prepare(&dir, &files).is_err());

        let dir2 = root.path().join("run2");
        prepare(&dir2, &RunFiles::default()).unwrap();
        assert!(!dir2.join("input.json").exists());
    }

    #[test]
    fn helper_files() {
        let parent = tempfile::tempdir().unwrap();
        let files = ScratchDir::create(Some(parent.path())).unwrap();
        for name in ["baton.sh", "baton.py", "baton.js"] {
            assert!(files.helpers_dir().join(name).is_file());
        }
        assert!(files.runs_dir().is_dir());
        assert!(BATON_SH.contains("baton_output"));
        let root = files.helpers_dir().parent().unwrap().to_owned();
        drop(files);
        assert!(!root.exists());
    }
}
