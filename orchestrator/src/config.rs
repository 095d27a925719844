//! The worker's settings: [`WorkerConfig`] (command-line flags and `BATON_WORKER_*` variables).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Default gRPC endpoint of the api.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8081";
/// Default number of job slots.
pub const DEFAULT_SLOTS: u32 = 4;
/// Default number of pre-started containers per container configuration (`--container-spares`).
pub const DEFAULT_CONTAINER_SPARES: u32 = 1;
/// Default time running jobs get to finish on shutdown before they are cancelled.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit of a run's `output.json` (and of the total size of its variable writes).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Default limit of log bytes per job sent but not yet acknowledged by the api.
pub const DEFAULT_MAX_UNACKED_LOG_BYTES: usize = 16 * 1024 * 1024;

/// Settings of a worker process.
///
/// Parsed by clap from flags and environment variables (embed it with
/// `#[command(flatten)]`), or built with [`WorkerConfig::new`] and adjusted field by field
/// (tests, embedding).
#[derive(Clone, clap::Args)]
// Keep the embedding command's description: without this, clap shows this doc comment.
#[command(about = None, long_about = None)]
pub struct WorkerConfig {
    /// gRPC endpoint of a baton-api replica (`http://` or `https://`), or several,
    /// comma-separated (`http://api-a:8081,http://api-b:8081`). The worker holds one session
    /// at a time, to the first URL; when that session breaks or cannot be opened, it tries the
    /// next URL (round robin) after the usual reconnection backoff (at most 100 ms for the
    /// first retry), keeping its running jobs.
    #[arg(long, env = "BATON_API_URL", default_value = DEFAULT_API_URL,
          value_parser = check_api_urls)]
    pub api_url: String,

    /// Worker token (an API token with role `worker`), sent as `authorization: Bearer ...`.
    #[arg(long, env = "BATON_WORKER_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Name shown in the api and the dashboard [default: the host name].
    #[arg(long, env = "BATON_WORKER_NAME")]
    pub name: Option<String>,

    /// Number of jobs run at the same time.
    #[arg(long, env = "BATON_WORKER_SLOTS", default_value_t = DEFAULT_SLOTS,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slots: u32,

    /// Labels matched against events' labels, as `key=value,key=value`.
    #[arg(long, env = "BATON_WORKER_LABELS", default_value = "", value_parser = parse_labels)]
    pub labels: Labels,

    /// Offer the `local` executor: jobs run as processes on this host, as this user, without a
    /// sandbox. Also enabled by `BATON_WORKER_ALLOW_LOCAL=true`.
    #[arg(long, env = "BATON_WORKER_ALLOW_LOCAL",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_local: bool,

    /// Do not offer the `container` executor, even when a Docker engine answers (by default it
    /// is offered when one does). Also `BATON_WORKER_NO_CONTAINER=true`.
    #[arg(long, env = "BATON_WORKER_NO_CONTAINER",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_container: bool,

    /// Pre-started ("spare") containers kept for each recently used container configuration
    /// (image, network, limits) and, at start, for each default image; a run takes one instead
    /// of creating and starting its own (each is used by one run only, then removed). `0`
    /// turns spares off. See docs/containers.md.
    #[arg(long, env = "BATON_WORKER_CONTAINER_SPARES", default_value_t = DEFAULT_CONTAINER_SPARES,
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub container_spares: u32,

    /// This worker's id (a UUID) [default: a new one at each start]. Give a restarted worker
    /// the same id so it keeps its identity and removes the containers its previous run left.
    #[arg(long, env = "BATON_WORKER_ID")]
    pub worker_id: Option<uuid::Uuid>,

    /// On shutdown, how long running jobs may go on before they are cancelled (`30s`, `2m`,
    /// `500ms`; a bare number is seconds).
    #[arg(long, env = "BATON_WORKER_DRAIN_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Largest accepted `output.json` of a run, in bytes (`1048576`, `512KiB`, `2MiB`); the same
    /// limit bounds the total size of a run's variable writes.
    #[arg(long, env = "BATON_WORKER_MAX_OUTPUT_BYTES", default_value = "1MiB",
          value_parser = parse_size)]
    pub max_output_bytes: usize,

    /// Log bytes per job that may be sent and not yet acknowledged by the api; past it the
    /// worker stops reading the job's output (the process is slowed down by its pipe).
    #[arg(long, env = "BATON_WORKER_MAX_UNACKED_LOG_BYTES", default_value = "16MiB",
          value_parser = parse_size)]
    pub max_unacked_log_bytes: usize,

    /// Where the worker keeps its per-run files (`$BATON_DIR`, and for local runs the script
    /// and the working directory) [default: the system temp dir]. A tmpfs such as `/dev/shm`
    /// makes starting a run faster when the disk is busy; scripts that write large files into
    /// their working directory then use memory.
    #[arg(long, env = "BATON_WORKER_SCRATCH_DIR")]
    pub scratch_dir: Option<std::path::PathBuf>,

    /// Networks `http` runs may reach although they are internal, as comma-separated CIDRs
    /// (`10.0.0.0/8,fd00::/8`). By default loopback, private, link-local (cloud metadata),
    /// shared (CGNAT), unspecified, multicast and reserved addresses are refused, after DNS
    /// resolution and on every redirect. The api reads the same variable for its outbox.
    #[arg(long, env = "BATON_HTTP_ALLOW_CIDRS", default_value = "", value_parser = parse_http_allow)]
    pub http_allow_cidrs: baton_egress::AddressPolicy,

    /// Give runs no network: container runs whose event asks for one and `http` jobs are
    /// refused with a reason. Also `BATON_WORKER_NO_NETWORK=true`.
    #[arg(long, env = "BATON_WORKER_NO_NETWORK",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_network: bool,

    /// PEM file of the certificate authority that signed the api's TLS certificate (for
    /// `https://` api URLs whose certificate is not signed by a system-trusted authority).
    /// Without it, the system's trusted roots are used.
    #[arg(long, env = "BATON_API_CA")]
    pub api_ca: Option<std::path::PathBuf>,

    /// Address of this worker's Prometheus metrics (`GET /metrics`: slots, runs, spare
    /// containers, ssh connections, circuit breakers), e.g. `0.0.0.0:9101`. Off by default.
    #[arg(long, env = "BATON_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// The worker protocol version announced in `Hello` (for upgrade tests only).
    #[arg(long, hide = true, default_value_t = baton_proto::PROTOCOL_VERSION)]
    pub protocol_version: u32,
}

impl WorkerConfig {
    /// A configuration with every default: name = host name, a new worker id, 4 slots, no
    /// labels, `ssh` offered, `container` offered when a Docker engine answers (unless
    /// [`WorkerConfig::no_container`]), `local` not offered (set [`WorkerConfig::allow_local`]),
    /// 30 s drain, 1 MiB outputs.
    pub fn new(api_url: impl Into<String>, token: impl Into<String>) -> Self {
        WorkerConfig {
            api_url: api_url.into(),
            token: token.into(),
            name: None,
            slots: DEFAULT_SLOTS,
            labels: Labels::default(),
            allow_local: false,
            no_container: false,
            container_spares: DEFAULT_CONTAINER_SPARES,
            worker_id: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_unacked_log_bytes: DEFAULT_MAX_UNACKED_LOG_BYTES,
            scratch_dir: None,
            http_allow_cidrs: baton_egress::AddressPolicy::default(),
            no_network: false,
            api_ca: None,
            metrics_listen: None,
            protocol_version: baton_proto::PROTOCOL_VERSION,
        }
    }
}

impl fmt::Debug for WorkerConfig {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .field("slots", &self.slots)
            .field("labels", &self.labels)
            .field("allow_local", &self.allow_local)
            .field("no_container", &self.no_container)
            .field("container_spares", &self.container_spares)
            .field("worker_id", &self.worker_id)
            .field("drain_timeout", &self.drain_timeout)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_unacked_log_bytes", &self.max_unacked_log_bytes)
            .field("scratch_dir", &self.scratch_dir)
            .field("http_allow_cidrs", &self.http_allow_cidrs)
            .field("no_network", &self.no_network)
            .field("api_ca", &self.api_ca)
            .field("metrics_listen", &self.metrics_listen)
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

/// Worker labels (`key=value` pairs), matched by the api against events' `labels`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(pub BTreeMap<String, String>);

impl Labels {
    /// Builds labels from pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Labels(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Parses `key=value,key=value` (spaces around entries, keys and values are trimmed; an empty
/// text means no labels). Every entry needs a `=` and a non-empty key; a key may appear once.
pub fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = BTreeMap::new();
    if text.trim().is_empty() {
        return Ok(Labels(labels));
    }
    for (index, entry) in text.split(',').enumerate() {
        let entry = entry.trim();
        let position = index + 1;
        if entry.is_empty() {
            return Err(format!(
                "label entry {position} is empty (expected key=value,key=value)"
            ));
        }
        let Some((key, value)) = entry.split_once('=') else {
            return Err(format!(
                "label entry {position} `{entry}` has no `=` (expected key=value)"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(format!(
                "label entry {position} `{entry}` has an empty key (expected key=value)"
            ));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("label `{key}` is given twice"));
        }
    }
    Ok(Labels(labels))
}

/// Splits and checks `--api-url`: one or more `http://HOST:PORT` or `https://HOST:PORT` URLs,
/// comma-separated (spaces around entries are trimmed). Every entry must be such a URL and
/// appear once; an error names the entry.
pub fn parse_api_urls(text: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for (index, entry) in text.split(',').enumerate() {
        let url = entry.trim();
        let position = index + 1;
        if url.is_empty() {
            return Err(format!(
                "api URL entry {position} is empty (expected http://HOST:PORT,http://HOST:PORT)"
            ));
        }
        let uri: tonic::codegen::http::Uri = url
            .parse()
            .map_err(|e| format!("invalid api URL `{url}` (entry {position}): {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "invalid api URL `{url}` (entry {position}): expected http://HOST:PORT or https://HOST:PORT"
            ));
        }
        if urls.iter().any(|u| u == url) {
            return Err(format!("api URL `{url}` is given twice"));
        }
        urls.push(url.to_owned());
    }
    Ok(urls)
}

/// The clap check of `--api-url`: the text as given, once [`parse_api_urls`] accepts it.
fn check_api_urls(text: &str) -> Result<String, String> {
    parse_api_urls(text).map(|_| text.to_owned())
}

/// Parses `BATON_HTTP_ALLOW_CIDRS` (comma-separated CIDRs; empty: none).
pub fn parse_http_allow(text: &str) -> Result<baton_egress::AddressPolicy, String> {
    text.parse()
        .map_err(|e: baton_egress::CidrError| e.to_string())
}

/// Parses a duration: `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration `{text}` (expected e.g. 30s, 500ms, 2m)"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "invalid duration `{text}`: unknown unit `{other}` (use ms, s, m or h)"
            ));
        }
    };
    Ok(d)
}

/// Parses a byte size: `1048576`, `512KiB`, `2MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`,
/// `GB`, all binary multiples).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("invalid size `{text}` (expected e.g. 1048576, 512KiB, 2MiB)"))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size `{text}`: unknown unit (use KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: WorkerConfig,
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_labels("").unwrap(), Labels::default());
        assert_eq!(parse_labels("  ").unwrap(), Labels::default());
        assert_eq!(
            parse_labels("region=eu, gpu = yes ,empty=,eq=a=b").unwrap(),
            Labels::from_pairs([
                ("region", "eu"),
                ("gpu", "yes"),
                ("empty", ""),
                ("eq", "a=b")
            ])
        );
    }

    #[test]
    fn bad_labels_name_the_entry() {
        let e = parse_labels("a=1,oops").unwrap_err();
        assert!(e.contains("entry 2") && e.contains("`oops`"), "{e}");
        let e = parse_labels("a=1,,b=2").unwrap_err();
        assert!(e.contains("entry 2 is empty"), "{e}");
        let e = parse_labels("=x").unwrap_err();
        assert!(e.contains("empty key") && e.contains("`=x`"), "{e}");
        let e = parse_labels("a=1,a=2").unwrap_err();
        assert!(e.contains("`a` is given twice"), "{e}");
    }

    #[test]
    fn api_urls_parse() {
        assert_eq!(
            parse_api_urls("http://127.0.0.1:8081").unwrap(),
            vec!["http://127.0.0.1:8081"]
        );
        assert_eq!(
            parse_api_urls("http://a:8081, https://b.example:443 ,http://[::1]:9").unwrap(),
            vec!["http://a:8081", "https://b.example:443", "http://[::1]:9"]
        );
    }

    #[test]
    fn bad_api_urls_name_the_entry() {
        let e = parse_api_urls("http://a:1,ftp://b:2").unwrap_err();
        assert!(
            e.contains("`ftp://b:2`") && e.contains("entry 2") && e.contains("http://HOST:PORT"),
            "{e}"
        );
        let e = parse_api_urls("http://a:1,,http://b:2").unwrap_err();
        assert!(e.contains("entry 2 is empty"), "{e}");
        let e = parse_api_urls("").unwrap_err();
        assert!(e.contains("entry 1 is empty"), "{e}");
        let e = parse_api_urls("http://a:1,not a url").unwrap_err();
        assert!(e.contains("`not a url`") && e.contains("entry 2"), "{e}");
        let e = parse_api_urls("a:8081").unwrap_err();
        assert!(e.contains("`a:8081`") && e.contains("entry 1"), "{e}");
        let e = parse_api_urls("http://a:1, http://a:1").unwrap_err();
        assert!(e.contains("`http://a:1` is given twice"), "{e}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1TiB").is_err());
    }

    #[test]
    fn cli_defaults_and_errors() {
        let cli = Cli::try_parse_from(["w", "--token", "t"]).unwrap();
        let c = cli.config;
        assert_eq!(c.api_url, DEFAULT_API_URL);
        assert_eq!(c.slots, 4);
        assert!(!c.allow_local);
        assert!(!c.no_container);
        assert_eq!(c.container_spares, 1);
        assert_eq!(c.worker_id, None);
        assert_eq!(c.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(c.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
        assert!(c.labels.0.is_empty());
        assert!(!format!("{c:?}").contains("\"t\""));

        let cli = Cli::try_parse_from([
            "w",
            "--token",
            "t",
            "--labels",
            "a=1,b=2",
            "--allow-local",
            "--slots",
            "8",
            "--drain-timeout",
            "5s",
            "--max-output-bytes",
            "2MiB",
            "--no-container",
            "--container-spares",
            "0",
            "--worker-id",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        ])
        .unwrap();
        assert!(cli.config.no_container);
        assert_eq!(cli.config.container_spares, 0);
        assert_eq!(
            cli.config.worker_id.map(|id| id.to_string()).as_deref(),
            Some("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
        );
        assert!(Cli::try_parse_from(["w", "--token", "t", "--worker-id", "nope"]).is_err());
        assert_eq!(
            cli.config.labels,
            Labels::from_pairs([("a", "1"), ("b", "2")])
        );
        assert!(cli.config.allow_local);
        assert_eq!(cli.config.slots, 8);
        assert_eq!(cli.config.drain_timeout, Duration::from_secs(5));
        assert_eq!(cli.config.max_output_bytes, 2 << 20);

        let two = Cli::try_parse_from(["w", "--token", "t", "--api-url", "http://a:1,http://b:2"])
            .unwrap();
        assert_eq!(two.config.api_url, "http://a:1,http://b:2");
        let err = Cli::try_parse_from(["w", "--token", "t", "--api-url", "http://a:1,b"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--api-url") && err.contains("`b`"), "{err}");

        let err = Cli::try_parse_from(["w", "--token", "t", "--labels", "a=1,nope"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--labels") && err.contains("`nope`"), "{err}");
        assert!(Cli::try_parse_from(["w", "--token", "t", "--slots", "0"]).is_err());
        let allowing =
            Cli::try_parse_from(["w", "--token", "t", "--http-allow-cidrs", "127.0.0.0/8"])
                .unwrap();
        assert_eq!(allowing.config.http_allow_cidrs.allow.len(), 1);
        assert!(!allowing.config.no_network);
        let closed = Cli::try_parse_from(["w", "--token", "t", "--no-network"]).unwrap();
        assert!(closed.config.no_network);
        let err = Cli::try_parse_from(["w", "--token", "t", "--http-allow-cidrs", "10.0.0.0/99"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--http-allow-cidrs") && err.contains("prefix"),
            "{err}"
        );
    }
}
