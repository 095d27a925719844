//! What several benchmarks share: a private PostgreSQL with a migrated template database, the
//! summary line, medians.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use baton_devdb::Cluster;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The migrated template every benchmark database is cloned from.
pub const TEMPLATE: &str = "baton_template";

/// A throwaway PostgreSQL (non-durable: fsync and synchronous commit off) holding the
/// migrated [`TEMPLATE`]. Stopped and deleted on drop, or when the process exits.
pub async fn cluster() -> anyhow::Result<Cluster> {
    let cluster = Cluster::throwaway()
        .await
        .context("starting a throwaway PostgreSQL")?;
    cluster
        .create_template(TEMPLATE, |url| async move {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await?;
            baton_api::MIGRATOR.run(&pool).await?;
            pool.close().await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await
        .context("migrating the template database")?;
    Ok(cluster)
}

/// A fresh database cloned from [`TEMPLATE`], and a pool of up to `connections` on it.
pub async fn database(cluster: &Cluster, name: &str, connections: u32) -> anyhow::Result<PgPool> {
    cluster
        .create_database(name, Some(TEMPLATE))
        .await
        .with_context(|| format!("creating database {name}"))?;
    PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(&cluster.url(name))
        .await
        .with_context(|| format!("connecting to database {name}"))
}

/// `SELECT version()`, shortened to "PostgreSQL 17.2".
pub async fn server_version(pool: &PgPool) -> anyhow::Result<String> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?;
    Ok(version
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// CPU time (user + system, all threads) a process used so far, from `/proc/PID/stat`; `pid`
/// may be `"self"`. `None` where that is unavailable.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    /// USER_HZ, the unit of utime and stime: 100 on every Linux architecture Baton runs on.
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": utime and stime are fields 14 and 15, counted from pid.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SECOND,
    ))
}

/// The 1-minute load average, to tell a quiet machine from a busy one in the output.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A benchmark's result, printed last as `NAME: key=value key=value ...`.
#[derive(Debug)]
pub struct Summary {
    name: &'static str,
    fields: Vec<(&'static str, String)>,
}

impl Summary {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            fields: Vec::new(),
        }
    }

    /// Adds `key=value`; values must not contain whitespace.
    pub fn field(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.fields.push((key, value.to_string()));
        self
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name)?;
        for (key, value) in &self.fields {
            write!(f, " {key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn own_cpu_time() {
        assert!(cpu_time("self").is_some());
        assert!(cpu_time("0").is_none());
    }

    #[test]
    fn summary_line() {
        let s = Summary::new("queue").field("a", 1).field("b", "2.50");
        assert_eq!(s.to_string(), "queue: a=1 b=2.50");
    }
}
