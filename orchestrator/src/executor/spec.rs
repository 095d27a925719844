//! What to run: [`Runtime`], [`RunSpec`] and [`HttpRequestSpec`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Default timeout of a run when none is given (the design's per-event default, one hour).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Default grace between `SIGTERM` and `SIGKILL` when a run is stopped.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// How a run's payload is executed.
///
/// Serialized in lowercase (`"bash"`, `"sh"`, `"python"`, `"node"`, `"exec"`, `"http"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// [`RunSpec::content`] is a bash script.
    Bash,
    /// [`RunSpec::content`] is a POSIX sh script.
    Sh,
    /// [`RunSpec::content`] is a Python 3 script.
    Python,
    /// [`RunSpec::content`] is a Node.js (CommonJS) script.
    Node,
    /// [`RunSpec::command`] is an argv run directly, without a shell.
    Exec,
    /// [`RunSpec::request`] is an HTTP request made by the executor itself.
    Http,
}

impl Runtime {
    /// Every runtime, in declaration order.
    pub const ALL: [Runtime; 6] = [
        Runtime::Bash,
        Runtime::Sh,
        Runtime::Python,
        Runtime::Node,
        Runtime::Exec,
        Runtime::Http,
    ];

    /// The lowercase name used in JSON and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Bash => "bash",
            Runtime::Sh => "sh",
            Runtime::Python => "python",
            Runtime::Node => "node",
            Runtime::Exec => "exec",
            Runtime::Http => "http",
        }
    }

    /// True for the runtimes whose payload is script text run by an interpreter.
    pub fn is_script(self) -> bool {
        matches!(
            self,
            Runtime::Bash | Runtime::Sh | Runtime::Python | Runtime::Node
        )
    }

    /// File name the script is written to (the extension matters to some interpreters).
    pub fn script_file_name(self) -> Option<&'static str> {
        match self {
            Runtime::Bash => Some("script.bash"),
            Runtime::Sh => Some("script.sh"),
            Runtime::Python => Some("script.py"),
            Runtime::Node => Some("script.js"),
            Runtime::Exec | Runtime::Http => None,
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when parsing an unknown runtime name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown runtime `{0}` (expected bash, sh, python, node, exec or http)")]
pub struct UnknownRuntime(pub String);

impl FromStr for Runtime {
    type Err = UnknownRuntime;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownRuntime(s.to_owned()))
    }
}

/// The request of an `http` run.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpRequestSpec {
    /// HTTP method, e.g. `GET` (the default) or `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body: a JSON string is sent raw (as its text), any other JSON value is sent as
    /// JSON with `content-type: application/json` (unless a header overrides it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

fn default_method() -> String {
    "GET".to_owned()
}

impl HttpRequestSpec {
    /// A request with no headers and no body.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        HttpRequestSpec {
            method: method.into(),
            url: url.into(),
            headers: BTreeMap::new(),
            body: None,
        }
    }
}

impl fmt::Debug for HttpRequestSpec {
    // Header values and bodies may carry credentials: show names and sizes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequestSpec")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &self.body.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Everything an executor needs to run one job attempt.
///
/// Build one with [`RunSpec::script`], [`RunSpec::exec`] or [`RunSpec::http`] and adjust the
/// public fields. Which payload field is read depends on [`RunSpec::runtime`]; the others are
/// ignored.
#[derive(Clone)]
pub struct RunSpec {
    /// The job this run belongs to (exported to the process as `BATON_JOB_ID`, used in names).
    pub job_id: Uuid,
    /// How the payload is executed.
    pub runtime: Runtime,
    /// Script text for `bash`, `sh`, `python` and `node`.
    pub content: Option<String>,
    /// Program and arguments for `exec` (`command[0]` is looked up on `PATH` if it has no `/`).
    pub command: Option<Vec<String>>,
    /// The request for `http`.
    pub request: Option<HttpRequestSpec>,
    /// Environment variables of the run, applied on top of the executor's minimal base
    /// environment.
    pub env: BTreeMap<String, String>,
    /// Working directory. Local executor: must exist; when `None`, a fresh private temporary
    /// directory is created for the run and removed afterwards.
    pub workdir: Option<PathBuf>,
    /// Wall-clock limit of the run, from the moment it is started.
    pub timeout: Duration,
    /// Grace between `SIGTERM` and `SIGKILL` when the run is timed out or cancelled.
    pub kill_grace: Duration,
    /// Fired (before or with the cancellation token): the run is killed at once, `SIGKILL` to
    /// its whole tree without waiting out [`RunSpec::kill_grace`]; fired during the grace, it
    /// cuts the grace short. A forced cancel (`POST /jobs/{id}/cancel?force=true`).
    pub kill_now: CancellationToken,
    /// Per-run helper directory, exported as `BATON_DIR` (prepared by the caller).
    pub run_dir: Option<PathBuf>,
    /// Directory holding `baton.sh` / `baton.py` / `baton.js`; exported as `BATON_HELPERS` and
    /// prepended to `PATH`, `PYTHONPATH` and `NODE_PATH`.
    pub helpers_dir: Option<PathBuf>,
    /// Container executor: the image to run instead of the worker's default image for the
    /// runtime (the event's `image`). Other executors ignore it.
    pub image: Option<String>,
    /// Container executor: give the run a network (the event's `"network": true`). By default a
    /// container has network mode `none`. Other executors ignore it.
    pub network: bool,
    /// Container executor: resource limits asked for by the event; unset fields take the
    /// worker's defaults, and every value must be within the worker's maximums. Other executors
    /// ignore it.
    pub limits: Option<ResourceLimits>,
    /// Container executor: extra labels put on the container (e.g. `baton.event_id`). The keys
    /// `baton.worker_id`, `baton.job_id` and `baton.managed` are set by the executor and cannot
    /// be overridden. Other executors ignore it.
    pub labels: BTreeMap<String, String>,
    /// SSH executor: the server to run on (from the job's assignment). Other executors ignore
    /// it.
    pub ssh: Option<super::ssh::SshTarget>,
    /// The startup window of this run (the event's `startup_window_seconds`): a non-zero exit
    /// within it is a start failure (see [`startup`](super::startup)). `None`: the executor's
    /// configured default; zero: off.
    pub startup_window: Option<Duration>,
}

/// Resource limits of a container run. Every field is optional: in a [`RunSpec`] an unset
/// field means "the worker's default"; in the worker's maximums it means "no maximum".
///
/// Serialized as `{"memory_mib": 512, "cpus": 1.0, "pids": 256, "tmp_mib": 64, "work_mib": 256}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Memory limit in MiB. Swap is disabled (memory + swap = this limit), so a run that
    /// needs more is killed by the out-of-memory killer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// CPU limit in CPUs (fractional: `0.5` is half a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Size of the `/tmp` tmpfs in MiB (its pages count against the memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_mib: Option<u64>,
    /// Size in MiB of the run's files in `/baton` (the working directory `$HOME`, `$BATON_DIR`,
    /// the script and helpers): a tmpfs, so a script filling it gets "No space left on device"
    /// instead of filling the engine's disk. Its pages count against the memory limit too.
    /// (For an image without `cat`, only the working directory is bounded; see the container
    /// executor.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_mib: Option<u64>,
}

impl RunSpec {
    fn base(runtime: Runtime) -> Self {
        RunSpec {
            job_id: Uuid::now_v7(),
            runtime,
            content: None,
            command: None,
            request: None,
            env: BTreeMap::new(),
            workdir: None,
            timeout: DEFAULT_TIMEOUT,
            kill_grace: DEFAULT_KILL_GRACE,
            kill_now: CancellationToken::new(),
            run_dir: None,
            helpers_dir: None,
            image: None,
            network: false,
            limits: None,
            labels: BTreeMap::new(),
            ssh: None,
            startup_window: None,
        }
    }

    /// A script run (`runtime` should be one of bash, sh, python, node).
    pub fn script(runtime: Runtime, content: impl Into<String>) -> Self {
        RunSpec {
            content: Some(content.into()),
            ..RunSpec::base(runtime)
        }
    }

    /// An `exec` run of `argv` (no shell).
    pub fn exec<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RunSpec {
            command: Some(argv.into_iter().map(Into::into).collect()),
            ..RunSpec::base(Runtime::Exec)
        }
    }

    /// An `http` run of `request`.
    pub fn http(request: HttpRequestSpec) -> Self {
        RunSpec {
            request: Some(request),
            ..RunSpec::base(Runtime::Http)
        }
    }

    /// Sets the job id.
    pub fn with_job_id(mut self, job_id: Uuid) -> Self {
        self.job_id = job_id;
        self
    }

    /// Adds one environment variable.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the working directory.
    pub fn with_workdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the `SIGTERM` → `SIGKILL` grace.
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// Container executor: runs `image` instead of the worker's default for the runtime.
    pub fn with_image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// Container executor: gives the run a network (`true`) or none (`false`, the default).
    pub fn with_network(mut self, network: bool) -> Self {
        self.network = network;
        self
    }

    /// Container executor: asks for resource limits (bounded by the worker's maximums).
    pub fn with_limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Container executor: adds one container label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

impl fmt::Debug for RunSpec {
    // Environment values and script text may carry secrets: show names and sizes only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunSpec")
            .field("job_id", &self.job_id)
            .field("runtime", &self.runtime)
            .field("content_len", &self.content.as_ref().map(String::len))
            .field("command", &self.command)
            .field("request", &self.request)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .field("kill_now", &self.kill_now.is_cancelled())
            .field("run_dir", &self.run_dir)
            .field("helpers_dir", &self.helpers_dir)
            .field("image", &self.image)
            .field("network", &self.network)
            .field("limits", &self.limits)
            .field("labels", &self.labels)
            .field("ssh", &self.ssh)
            .field("startup_window", &self.startup_window)
            .finish()
    }
}
