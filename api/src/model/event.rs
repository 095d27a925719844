//! Events: what to run (a script, a program with arguments or an HTTP request), where, and
//! with which limits. A job snapshots its event's spec when it is queued.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{FieldError, text_enum};

/// The language or kind of an event's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Bash,
    Sh,
    Python,
    Node,
    Exec,
    Http,
    /// Starts nothing and succeeds at once, its output being its input: a join or fan-out
    /// step in a chain, and a way to measure the orchestration alone.
    Noop,
}
text_enum!(Runtime { Bash => "bash", Sh => "sh", Python => "python", Node => "node", Exec => "exec", Http => "http", Noop => "noop" });

impl Runtime {
    /// Script runtimes carry their program in `content`.
    pub fn is_script(self) -> bool {
        matches!(self, Self::Bash | Self::Sh | Self::Python | Self::Node)
    }
}

/// Where a job runs: a fresh container, a registered server over SSH, or a process on the
/// worker host (only on workers started with `--allow-local`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    Container,
    Ssh,
    Local,
}
text_enum!(Executor { Container => "container", Ssh => "ssh", Local => "local" });

/// The request an `http` event makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestSpec {
    #[serde(default = "default_method")]
    pub method: String,
    pub url: String,
    /// Header values may reference secret variables as `{{secret.NAME}}` (substituted by the
    /// worker); non-admin callers see values other than bare references as `***`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A string is sent as is; any other JSON value is sent as JSON.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub body: Option<serde_json::Value>,
}

fn default_method() -> String {
    "GET".to_owned()
}

/// An event's definition: the body of `POST /api/v1/events`, and what `PATCH` merges into.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[sqlx(try_from = "String")]
    pub runtime: Runtime,
    /// The script, for `bash`, `sh`, `python` and `node`.
    #[serde(default)]
    pub content: Option<String>,
    /// The argv, for `exec` (no shell).
    #[serde(default)]
    #[sqlx(json(nullable))]
    pub command: Option<Vec<String>>,
    /// The request, for `http`.
    #[serde(default)]
    #[sqlx(json(nullable))]
    pub request: Option<HttpRequestSpec>,
    /// `container` unless `server_id` is set (then `ssh`).
    #[serde(default)]
    #[sqlx(try_from = "String")]
    #[schema(value_type = Option<Executor>)]
    pub executor: ExecutorChoice,
    #[serde(default)]
    pub server_id: Option<Uuid>,
    /// Container image, overriding the worker's default for the runtime.
    #[serde(default)]
    pub image: Option<String>,
    /// Environment of the run. A value may reference secret variables as `{{secret.NAME}}`:
    /// the worker substitutes them just before the run, so the definition holds no
    /// credential. Non-admin callers see values other than bare references as `***`.
    #[serde(default)]
    #[sqlx(json)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: i32,
    #[serde(default = "default_one")]
    pub max_attempts: i32,
    /// First retry delay; doubles per attempt (with jitter) up to the maximum.
    #[serde(default = "default_backoff")]
    pub retry_backoff_seconds: i32,
    #[serde(default = "default_backoff_max")]
    pub retry_backoff_max_seconds: i32,
    /// `any` (default): infrastructure errors, non-zero exits and timeouts are retried alike;
    /// `infrastructure`: only failures that were not the script's own.
    #[serde(default)]
    #[sqlx(try_from = "String")]
    pub retry_on: RetryOn,
    /// Container executor: give the container network access (default: none).
    #[serde(default)]
    pub network: bool,
    /// Container executor: resource limits for this event (unset fields: the worker's defaults).
    #[serde(default)]
    #[sqlx(json(nullable))]
    pub limits: Option<ContainerLimits>,
    #[serde(default)]
    pub priority: i32,
    /// A worker runs this event only if it carries all these labels.
    #[serde(default)]
    #[sqlx(json)]
    pub labels: BTreeMap<String, String>,
    /// Which variables this event's scripts may write back: `event` (default) only the
    /// event's own; `global` global ones too.
    #[serde(default)]
    #[sqlx(try_from = "String")]
    pub variables_write: VariablesWrite,
    /// At most `max` runs of one group (same rendered `key`) claimed or running at once,
    /// enforced by the database across all replicas and workers; absent: unlimited.
    #[serde(default)]
    #[sqlx(json(nullable))]
    pub concurrency: Option<Concurrency>,
    /// A running job with no log line, no progress update and no start for this long is
    /// flagged `stuck` (and its `on_stuck` actions fire once); absent: never.
    #[serde(default)]
    pub stuck_after_seconds: Option<i32>,
    /// A run that exits non-zero within this many seconds of its start is reported as a
    /// start failure (`error.start_failure`); 0 turns the rule off.
    #[serde(default = "default_startup_window")]
    pub startup_window_seconds: i32,
}

/// An event's concurrency policy (see `crate::policy::concurrency`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Runs of one group that may be claimed or running at once (at least 1).
    pub max: i32,
    /// A template over the run's input (`{{ input.host }}`) naming the run's group; absent
    /// or rendering empty: one group for all runs of the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What a new run does when its group is full (default `queue`).
    #[serde(default)]
    pub strategy: ConcurrencyStrategy,
}

/// What a new run does when its concurrency group is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyStrategy {
    /// It waits in the queue until a run of its group ends.
    #[default]
    Queue,
    /// It ends at once, `cancelled` with `error.kind = "concurrency"`.
    Skip,
    /// The group's earlier runs are cancelled (their processes killed); it runs once they
    /// are gone.
    CancelPrevious,
}
text_enum!(ConcurrencyStrategy { Queue => "queue", Skip => "skip", CancelPrevious => "cancel_previous" });

impl Concurrency {
    fn check(&self) -> Result<(), FieldError> {
        check_range("concurrency.max", self.max, 1, 10_000)?;
        if let Some(key) = &self.key {
            if key.len() > 1024 || key.contains('\0') {
                return Err(FieldError::new(
                    "concurrency.key",
                    "must be at most 1024 bytes, without NUL bytes",
                ));
            }
            crate::actions::check_template(key)
                .map_err(|e| FieldError::new("concurrency.key", e))?;
        }
        Ok(())
    }
}

/// The default startup window, in seconds.
pub const DEFAULT_STARTUP_WINDOW_SECONDS: i32 = 5;

fn default_startup_window() -> i32 {
    DEFAULT_STARTUP_WINDOW_SECONDS
}

/// The variables an event's scripts may write (`baton_set_variable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VariablesWrite {
    /// Only the event's own variables (a new key is created in the event's scope).
    #[default]
    Event,
    /// The event's own variables, else global ones (a new key is created global).
    Global,
}
text_enum!(VariablesWrite { Event => "event", Global => "global" });

/// Per-event container limits; each is bounded by [`ContainerLimits::MAXIMUMS`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ContainerLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_mib: Option<u64>,
    /// Size in MiB of the run's files (`$HOME` and `$BATON_DIR`, a tmpfs); its pages count
    /// against `memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_mib: Option<u64>,
}

impl ContainerLimits {
    /// The most an event may ask for: the container executor's default maximums
    /// (8 GiB, 4 CPUs, 4096 processes, 1 GiB of /tmp, 4 GiB of run files). A worker
    /// configured lower refuses the run with a clear error.
    pub const MAXIMUMS: ContainerLimits = ContainerLimits {
        memory_mib: Some(8192),
        cpus: Some(4.0),
        pids: Some(4096),
        tmp_mib: Some(1024),
        work_mib: Some(4096),
    };

    fn check(&self) -> Result<(), FieldError> {
        let max = Self::MAXIMUMS;
        let over = |field: &str, value: Option<u64>, max: Option<u64>, min: u64| match (value, max)
        {
            (Some(v), Some(m)) if v < min || v > m => Err(FieldError::new(
                format!("limits.{field}"),
                format!("must be between {min} and {m}"),
            )),
            _ => Ok(()),
        };
        over("memory_mib", self.memory_mib, max.memory_mib, 16)?;
        over("pids", self.pids, max.pids, 16)?;
        over("tmp_mib", self.tmp_mib, max.tmp_mib, 1)?;
        over("work_mib", self.work_mib, max.work_mib, 1)?;
        if let Some(cpus) = self.cpus
            && !(0.05..=max.cpus.unwrap_or(4.0)).contains(&cpus)
        {
            return Err(FieldError::new("limits.cpus", "must be between 0.05 and 4"));
        }
        Ok(())
    }
}

/// Which failures an event retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    #[default]
    Any,
    Infrastructure,
}
text_enum!(RetryOn { Any => "any", Infrastructure => "infrastructure" });

/// `executor` as sent: absent means "decide from `server_id`".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutorChoice(pub Option<Executor>);

impl ExecutorChoice {
    /// The executor after validation (validation always fills it in).
    pub fn resolved(self) -> Executor {
        self.0.unwrap_or(Executor::Container)
    }
}

impl TryFrom<String> for ExecutorChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(Self(Some(s.parse()?)))
    }
}

fn default_timeout() -> i32 {
    3600
}
fn default_one() -> i32 {
    1
}
fn default_backoff() -> i32 {
    10
}
fn default_backoff_max() -> i32 {
    3600
}

/// A stored event.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Event {
    pub id: Uuid,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub spec: NewEvent,
    /// Starts at 1 and grows with every change of the definition; a job's `spec` records the
    /// revision it ran.
    pub revision: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A JSON merge patch (RFC 7396) over an event's definition: fields present replace the
/// stored ones, `null` resets a field to its default. The result is validated like a new event.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
#[serde(transparent)]
pub struct EventPatch(pub serde_json::Map<String, serde_json::Value>);

const MAX_NAME: usize = 200;
const MAX_CONTENT: usize = 1024 * 1024;
const MAX_ENV: usize = 256;
const MAX_LABELS: usize = 64;

impl NewEvent {
    /// Checks what serde cannot and fills in derived defaults (`executor`).
    pub fn validate(&mut self) -> Result<(), FieldError> {
        check_name("name", &self.name)?;
        if self.description.len() > 10_000 {
            return Err(FieldError::new(
                "description",
                "must be at most 10000 bytes",
            ));
        }
        self.check_payload()?;
        self.check_placement()?;
        for (key, value) in &self.env {
            check_env_key(key)?;
            if value.contains('\0') {
                return Err(FieldError::new(
                    format!("env.{key}"),
                    "must not contain NUL bytes",
                ));
            }
            check_secret_refs(&format!("env.{key}"), value)?;
        }
        if self.env.len() > MAX_ENV {
            return Err(FieldError::new(
                "env",
                format!("at most {MAX_ENV} variables"),
            ));
        }
        for (key, value) in &self.labels {
            check_label(key, value)?;
        }
        if self.labels.len() > MAX_LABELS {
            return Err(FieldError::new(
                "labels",
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        check_range("timeout_seconds", self.timeout_seconds, 1, 604_800)?;
        check_range("max_attempts", self.max_attempts, 1, 100)?;
        check_range(
            "retry_backoff_seconds",
            self.retry_backoff_seconds,
            0,
            86_400,
        )?;
        check_range(
            "retry_backoff_max_seconds",
            self.retry_backoff_max_seconds,
            0,
            604_800,
        )?;
        check_range("priority", self.priority, -1000, 1000)?;
        if let Some(concurrency) = &self.concurrency {
            concurrency.check()?;
        }
        if let Some(stuck) = self.stuck_after_seconds {
            check_range("stuck_after_seconds", stuck, 1, 604_800)?;
        }
        check_range(
            "startup_window_seconds",
            self.startup_window_seconds,
            0,
            3600,
        )?;
        Ok(())
    }

    fn check_payload(&self) -> Result<(), FieldError> {
        let rt = self.runtime;
        if rt.is_script() {
            match &self.content {
                None => {
                    return Err(FieldError::new(
                        "content",
                        format!("is required for runtime {rt}"),
                    ));
                }
                Some(c) if c.trim().is_empty() => {
                    return Err(FieldError::new("content", "must not be empty"));
                }
                Some(c) if c.len() > MAX_CONTENT => {
                    return Err(FieldError::new(
                        "content",
                        format!("must be at most {MAX_CONTENT} bytes"),
                    ));
                }
                Some(c) if c.contains('\0') => {
                    return Err(FieldError::new("content", "must not contain NUL bytes"));
                }
                Some(_) => {}
            }
        } else if self.content.is_some() {
            return Err(FieldError::new(
                "content",
                format!("is not used by runtime {rt}; remove it"),
            ));
        }
        match (rt, &self.command) {
            (Runtime::Exec, None) => {
                return Err(FieldError::new("command", "is required for runtime exec"));
            }
            (Runtime::Exec, Some(argv)) => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(FieldError::new(
                        "command",
                        "must start with a non-empty program name",
                    ));
                }
                if argv.len() > 1000 || argv.iter().any(|a| a.contains('\0')) {
                    return Err(FieldError::new(
                        "command",
                        "at most 1000 arguments, without NUL bytes",
                    ));
                }
            }
            (_, Some(_)) => {
                return Err(FieldError::new(
                    "command",
                    format!("is not used by runtime {rt}; remove it"),
                ));
            }
            (_, None) => {}
        }
        match (rt, &self.request) {
            (Runtime::Http, None) => {
                return Err(FieldError::new("request", "is required for runtime http"));
            }
            (Runtime::Http, Some(req)) => check_request(req)?,
            (_, Some(_)) => {
                return Err(FieldError::new(
                    "request",
                    format!("is not used by runtime {rt}; remove it"),
                ));
            }
            (_, None) => {}
        }
        Ok(())
    }

    fn check_placement(&mut self) -> Result<(), FieldError> {
        let executor = match (self.executor.0, self.server_id) {
            (None, Some(_)) | (Some(Executor::Ssh), Some(_)) => Executor::Ssh,
            (None, None) => Executor::Container,
            (Some(Executor::Ssh), None) => {
                return Err(FieldError::new(
                    "server_id",
                    "is required when executor is ssh",
                ));
            }
            (Some(other), Some(_)) => {
                return Err(FieldError::new(
                    "server_id",
                    format!("implies executor ssh, but executor is {other}"),
                ));
            }
            (Some(other), None) => other,
        };
        self.executor = ExecutorChoice(Some(executor));
        if let Some(limits) = &self.limits {
            if executor != Executor::Container {
                return Err(FieldError::new(
                    "limits",
                    format!("only apply to the container executor, not {executor}"),
                ));
            }
            limits.check()?;
        }
        if self.network && executor != Executor::Container {
            return Err(FieldError::new(
                "network",
                format!("only applies to the container executor, not {executor}"),
            ));
        }
        if let Some(image) = &self.image {
            if image.is_empty()
                || image.len() > 255
                || image.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(FieldError::new(
                    "image",
                    "must be an image reference of 1 to 255 characters without spaces",
                ));
            }
            if executor != Executor::Container {
                return Err(FieldError::new(
                    "image",
                    format!("is only used by the container executor, not {executor}"),
                ));
            }
        }
        Ok(())
    }
}

fn check_request(req: &HttpRequestSpec) -> Result<(), FieldError> {
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    if !METHODS.contains(&req.method.as_str()) {
        return Err(FieldError::new(
            "request.method",
            format!("must be one of {}", METHODS.join(", ")),
        ));
    }
    let url = req.url.as_str();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| FieldError::new("request.url", "must be an http:// or https:// URL"))?;
    if rest.is_empty()
        || rest.starts_with('/')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(FieldError::new(
            "request.url",
            "must name a host and contain no spaces",
        ));
    }
    for (name, value) in &req.headers {
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name {
            return Err(FieldError::new(
                format!("request.headers.{name}"),
                "is not a valid header name",
            ));
        }
        if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
            return Err(FieldError::new(
                format!("request.headers.{name}"),
                "must not contain line breaks",
            ));
        }
        check_secret_refs(&format!("request.headers.{name}"), value)?;
    }
    Ok(())
}

/// A value that may reference secret variables (`{{secret.NAME}}`, resolved by the worker):
/// every reference must be well formed.
pub(crate) fn check_secret_refs(field: &str, value: &str) -> Result<(), FieldError> {
    baton_proto::secret_ref::parse(value)
        .map(|_| ())
        .map_err(|e| FieldError::new(field, e.to_string()))
}

pub(crate) fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if name.chars().count() > MAX_NAME {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_env_key(key: &str) -> Result<(), FieldError> {
    let valid = key.len() <= 128
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(FieldError::new(
            format!("env.{key}"),
            "is not a valid variable name (letters, digits and _, not starting with a digit)",
        ));
    }
    if key.starts_with("BATON_") {
        return Err(FieldError::new(
            format!("env.{key}"),
            "BATON_ variables are reserved for Baton",
        ));
    }
    Ok(())
}

pub(crate) fn check_label(key: &str, value: &str) -> Result<(), FieldError> {
    let ok = |s: &str, max: usize| {
        s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if key.is_empty() || !ok(key, 63) {
        return Err(FieldError::new(
            format!("labels.{key}"),
            "label keys are 1-63 of [A-Za-z0-9-_./]",
        ));
    }
    if !ok(value, 255) {
        return Err(FieldError::new(
            format!("labels.{key}"),
            "label values are 0-255 of [A-Za-z0-9-_./]",
        ));
    }
    Ok(())
}

pub(crate) fn check_range(field: &str, value: i32, min: i32, max: i32) -> Result<(), FieldError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be between {min} and {max}"),
        ))
    }
}
