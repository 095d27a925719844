//! `queue`: how fast no-op jobs go through enqueue → claim → complete, through Baton's queue
//! module and through the very same SQL issued by hand, on one private PostgreSQL.
//!
//! Both paths run the same loop on C clients (one connection each): reserve up to B jobs of
//! the N to do, enqueue them one `INSERT` per job (autocommit, as `POST /events/{id}/run`
//! does), claim up to B, and complete each claimed job (as the api does when a worker
//! reports); a client stops once it has nothing left to enqueue and its claim comes back
//! empty.
//!
//! - **module** calls [`queue::enqueue`] (one statement: the insert, with the audit row the
//!   REST call adds when there is one), [`queue::claim_batch`] and [`queue::complete`] (in its
//!   own transaction, BEGIN + one UPDATE for a success + COMMIT, as the api runs it beside the
//!   action engine).
//! - **raw** is the least a hand-written queue needs: a plain `INSERT` per job, the module's
//!   claim statement (the same text, checked against the module's source at start-up) and the
//!   module's success `UPDATE` sent alone, autocommitted. It binds JSON serialised once up
//!   front, decodes only the two claimed columns it needs, and skips the module's sorting and
//!   state decoding. Per job: 1 INSERT, 1/B of a claim, 1 UPDATE.
//!
//! Each path has its own database cloned from the migrated template, emptied (`TRUNCATE`)
//! before every phase. An unmeasured warm-up runs both paths first; then R rounds run both,
//! swapping which goes first every round. After every phase exactly N jobs must be
//! `succeeded` and none left anywhere else, or the benchmark fails.
//!
//! Besides the rates, each round reports the CPU time per job of this process (clients,
//! runtime, sqlx: where the module's extra Rust-side work would show) and of the clients'
//! PostgreSQL backends, read from `/proc`; the load average is printed at both ends, since
//! other work on the machine moves the rates more than anything measured here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_api::model::{Event, JobStatus, NewEvent};
use baton_api::storage::events;
use baton_api::storage::queue::{self, ClaimRequest, Completion, NewJob, Outcome};
use chrono::{DateTime, Utc};
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Map, Value, json};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgPool, Postgres, Row};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::support::{self, Summary, median};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent clients, each on a connection of its own.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    clients: u32,
    /// Jobs a client enqueues per iteration; also its claim limit.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// Jobs completed per measured phase.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    jobs: u64,
    /// Measured rounds; each runs both paths. Medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Jobs per path in the unmeasured warm-up (0: none).
    #[arg(long, default_value_t = 2_000)]
    warmup_jobs: u64,
}

/// Long enough that no lease expires during a run.
const LEASE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Module,
    Raw,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Module => "module",
            Path::Raw => "raw",
        }
    }
}

/// One path's database and what its clients need.
struct Target {
    path: Path,
    pool: PgPool,
    ctx: Arc<Ctx>,
}

/// Everything a client needs that does not change per job.
struct Ctx {
    event: Event,
    batch: u64,
    /// The worker's offer: executors and labels.
    executors: Vec<String>,
    labels: Map<String, Value>,
    /// The module path's job input.
    input: Value,
    /// The raw path's parameters, serialised once.
    raw: RawParams,
}

struct RawParams {
    executor: &'static str,
    job_labels: Box<RawValue>,
    spec: Box<RawValue>,
    input: Box<RawValue>,
    offer_labels: Box<RawValue>,
}

impl Ctx {
    fn new(event: Event, batch: u64) -> anyhow::Result<Self> {
        let labels = Map::new();
        let input = json!({});
        let raw = RawParams {
            executor: event.spec.executor.resolved().as_str(),
            job_labels: to_raw_value(&event.spec.labels)?,
            spec: to_raw_value(&event)?,
            input: to_raw_value(&input)?,
            offer_labels: to_raw_value(&labels)?,
        };
        Ok(Self {
            executors: vec![raw.executor.to_owned()],
            event,
            batch,
            labels,
            input,
            raw,
        })
    }
}

/// The jobs of a phase not yet handed to a client for enqueueing.
struct Budget(AtomicU64);

impl Budget {
    /// Takes up to `n` jobs to enqueue; 0 once all are taken.
    fn take(&self, n: u64) -> u64 {
        match self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left - left.min(n))
            }) {
            Ok(left) => left.min(n),
            Err(_) => 0,
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    check_sql_matches_module()?;
    let cluster = support::cluster().await?;
    let mut targets = Vec::new();
    for (path, name) in [
        (Path::Module, "bench_queue_module"),
        (Path::Raw, "bench_queue_raw"),
    ] {
        let pool = support::database(&cluster, name, args.clients).await?;
        let event = insert_event(&pool).await?;
        targets.push(Target {
            path,
            pool,
            ctx: Arc::new(Ctx::new(event, args.batch)?),
        });
    }
    let version = support::server_version(&targets[0].pool).await?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: no-op jobs, enqueue (1 INSERT/job) → claim_batch → complete (module: 1 tx/job, raw: 1 UPDATE/job); \
         clients={} batch={} jobs={} rounds={} warmup_jobs={}; {version} (throwaway, fsync=off); \
         {cpus} CPUs, load average {}",
        args.clients,
        args.batch,
        args.jobs,
        args.rounds,
        args.warmup_jobs,
        support::load_average()
    );
    if args.warmup_jobs > 0 {
        let mut rates = Vec::new();
        for target in &targets {
            let stats = phase(target, args.warmup_jobs, args.clients).await?;
            rates.push(format!("{}={:.0}/s", target.path.name(), stats.rate));
        }
        println!(
            "warm-up: {} jobs per path, {}",
            args.warmup_jobs,
            rates.join(" ")
        );
    }

    let mut module = Vec::new();
    let mut raw = Vec::new();
    for round in 0..args.rounds {
        let order: [&Target; 2] = if round % 2 == 0 {
            [&targets[0], &targets[1]]
        } else {
            [&targets[1], &targets[0]]
        };
        for target in order {
            let stats = phase(target, args.jobs, args.clients).await?;
            match target.path {
                Path::Module => module.push(stats),
                Path::Raw => raw.push(stats),
            }
        }
        let (m, r) = (&module[module.len() - 1], &raw[raw.len() - 1]);
        println!(
            "round {}/{} ({} first): jobs_per_s={:.0} raw_jobs_per_s={:.0} ratio={:.2} | \
             module {:.2} s, {} | raw {:.2} s, {}",
            round + 1,
            args.rounds,
            order[0].path.name(),
            m.rate,
            r.rate,
            m.rate / r.rate,
            m.elapsed.as_secs_f64(),
            m.cpu_per_job(),
            r.elapsed.as_secs_f64(),
            r.cpu_per_job(),
        );
    }

    for target in &targets {
        target.pool.close().await;
    }
    cluster.stop().context("stopping PostgreSQL")?;

    let rates = |stats: &[PhaseStats]| median(&stats.iter().map(|s| s.rate).collect::<Vec<_>>());
    let cpu = |stats: &[PhaseStats], pick: fn(&PhaseStats) -> Option<f64>| {
        let values: Option<Vec<f64>> = stats.iter().map(pick).collect();
        values.map_or_else(|| "?".to_owned(), |v| format!("{:.0}", median(&v)))
    };
    println!(
        "medians: per-round ratio={:.2}; CPU µs per job: module client={} server={}, \
         raw client={} server={}; load average {}",
        median(
            &module
                .iter()
                .zip(&raw)
                .map(|(m, r)| m.rate / r.rate)
                .collect::<Vec<_>>()
        ),
        cpu(&module, PhaseStats::client_us_per_job),
        cpu(&module, PhaseStats::server_us_per_job),
        cpu(&raw, PhaseStats::client_us_per_job),
        cpu(&raw, PhaseStats::server_us_per_job),
        support::load_average()
    );
    let jobs_per_s = rates(&module);
    let raw_jobs_per_s = rates(&raw);
    Ok(Summary::new("queue")
        .field("jobs_per_s", format!("{jobs_per_s:.0}"))
        .field("raw_jobs_per_s", format!("{raw_jobs_per_s:.0}"))
        .field("ratio", format!("{:.2}", jobs_per_s / raw_jobs_per_s)))
}

/// The raw path alone on a database of its own, `name`, cloned from the template: an
/// unmeasured warm-up of `warmup_jobs`, then one measured phase of `jobs` jobs on `clients`
/// clients with batch `batch`. Returns its jobs per second (the baseline other benchmarks
/// compare against, run beside them on the same PostgreSQL).
pub async fn raw_rate(
    cluster: &baton_devdb::Cluster,
    name: &str,
    jobs: u64,
    clients: u32,
    batch: u64,
    warmup_jobs: u64,
) -> anyhow::Result<f64> {
    check_sql_matches_module()?;
    let pool = support::database(cluster, name, clients).await?;
    let event = insert_event(&pool).await?;
    let target = Target {
        path: Path::Raw,
        pool,
        ctx: Arc::new(Ctx::new(event, batch)?),
    };
    if warmup_jobs > 0 {
        phase(&target, warmup_jobs, clients).await?;
    }
    let stats = phase(&target, jobs, clients).await?;
    target.pool.close().await;
    Ok(stats.rate)
}

/// What one phase measured.
struct PhaseStats {
    jobs: u64,
    elapsed: Duration,
    /// Jobs per second.
    rate: f64,
    /// CPU this process used during the phase (the clients, the runtime, sqlx).
    client_cpu: Option<Duration>,
    /// CPU the clients' PostgreSQL backends used during the phase.
    server_cpu: Option<Duration>,
}

impl PhaseStats {
    fn client_us_per_job(&self) -> Option<f64> {
        self.client_cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / self.jobs as f64)
    }

    fn server_us_per_job(&self) -> Option<f64> {
        self.server_cpu
            .map(|cpu| cpu.as_secs_f64() * 1e6 / self.jobs as f64)
    }

    fn cpu_per_job(&self) -> String {
        let show = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v:.0}"));
        format!(
            "CPU µs/job client={} server={}",
            show(self.client_us_per_job()),
            show(self.server_us_per_job())
        )
    }
}

/// The no-op event every job runs (never actually run: nothing here executes jobs).
async fn insert_event(pool: &PgPool) -> anyhow::Result<Event> {
    let mut spec: NewEvent = serde_json::from_value(json!({
        "name": "bench-noop", "runtime": "bash", "content": "true", "executor": "local"
    }))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("the benchmark's event is invalid: {e:?}"))?;
    Ok(events::insert_event(pool, &spec).await?)
}

/// One measured phase on `target`'s database: empties it, runs the clients until `jobs` jobs
/// are complete, and checks the result.
async fn phase(target: &Target, jobs: u64, clients: u32) -> anyhow::Result<PhaseStats> {
    sqlx::query("TRUNCATE jobs CASCADE")
        .execute(&target.pool)
        .await
        .context("emptying the jobs table")?;
    // Connect before the clock starts.
    let mut conns = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..clients {
        let mut conn = target.pool.acquire().await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await?;
        backends.push(pid.to_string());
        conns.push(conn);
    }
    let server_cpu =
        || -> Option<Duration> { backends.iter().map(|pid| support::cpu_time(pid)).sum() };
    let budget = Arc::new(Budget(AtomicU64::new(jobs)));
    let (client_before, server_before) = (support::cpu_time("self"), server_cpu());
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for conn in conns {
        let ctx = Arc::clone(&target.ctx);
        let budget = Arc::clone(&budget);
        match target.path {
            Path::Module => tasks.spawn(module_client(conn, ctx, budget)),
            Path::Raw => tasks.spawn(raw_client(conn, ctx, budget)),
        };
    }
    let mut completed = 0;
    while let Some(done) = tasks.join_next().await {
        completed += done.context("a client task panicked")??;
    }
    let elapsed = started.elapsed();
    let since =
        |before: Option<Duration>, after: Option<Duration>| Some(after?.saturating_sub(before?));
    let client_cpu = since(client_before, support::cpu_time("self"));
    let server_cpu = since(server_before, server_cpu());
    verify(&target.pool, target.path, jobs, completed).await?;
    Ok(PhaseStats {
        jobs,
        elapsed,
        rate: jobs as f64 / elapsed.as_secs_f64(),
        client_cpu,
        server_cpu,
    })
}

/// Fails unless exactly `jobs` jobs exist and all are `succeeded`.
async fn verify(pool: &PgPool, path: Path, jobs: u64, completed: u64) -> anyhow::Result<()> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
            .fetch_all(pool)
            .await?;
    let expected = i64::try_from(jobs)?;
    let ok = completed == jobs
        && counts.len() == 1
        && counts[0].0 == JobStatus::Succeeded.as_str()
        && counts[0].1 == expected;
    if !ok {
        bail!(
            "{} path: the clients completed {completed} jobs and the table holds {counts:?}; \
             expected exactly {jobs} jobs, all succeeded",
            path.name()
        );
    }
    Ok(())
}

/// A client through the queue module: what the api does for `POST /events/{id}/run`, a
/// dispatcher's claim, and a worker's report.
async fn module_client(
    mut conn: PoolConnection<Postgres>,
    ctx: Arc<Ctx>,
    budget: Arc<Budget>,
) -> anyhow::Result<u64> {
    let job = NewJob {
        event: &ctx.event,
        input: ctx.input.clone(),
        priority: ctx.event.spec.priority,
        run_at: None,
        idempotency_key: None,
        parent: None,
        created_by: None,
        trace_context: None,
    };
    let request = ClaimRequest {
        worker_id: Uuid::now_v7(),
        executors: &ctx.executors,
        labels: &ctx.labels,
        limit: i64::try_from(ctx.batch)?,
        lease: LEASE,
    };
    let success = Outcome::success();
    let finished = Completion::Finished {
        status: JobStatus::Succeeded,
        dead: false,
        has_actions: false,
    };
    let mut completed = 0;
    loop {
        let enqueue = budget.take(ctx.batch);
        for _ in 0..enqueue {
            queue::enqueue(&mut *conn, &job).await?;
        }
        let claimed = queue::claim_batch(&mut *conn, &request).await?;
        if enqueue == 0 && claimed.is_empty() {
            return Ok(completed);
        }
        for job in &claimed {
            let mut tx = conn.begin().await?;
            let completion = queue::complete(&mut tx, job.id, job.lease_token, &success).await?;
            ensure!(
                completion == finished,
                "job {} completed as {completion:?}",
                job.id
            );
            tx.commit().await?;
        }
        completed += claimed.len() as u64;
    }
}

/// A client sending the module's statements by hand, with as little work around them as
/// possible.
async fn raw_client(
    mut conn: PoolConnection<Postgres>,
    ctx: Arc<Ctx>,
    budget: Arc<Budget>,
) -> anyhow::Result<u64> {
    let raw = &ctx.raw;
    let event_id = ctx.event.id;
    let priority = ctx.event.spec.priority;
    let max_attempts = ctx.event.spec.max_attempts;
    let worker_id = Uuid::now_v7();
    let limit = i64::try_from(ctx.batch)?;
    let lease_ms = i64::try_from(LEASE.as_millis())?;
    let mut completed = 0;
    loop {
        let enqueue = budget.take(ctx.batch);
        for _ in 0..enqueue {
            let id = Uuid::now_v7();
            sqlx::query(INSERT_SQL)
                .bind(id)
                .bind(event_id)
                .bind(priority)
                .bind(None::<DateTime<Utc>>)
                .bind(max_attempts)
                .bind(None::<&str>)
                .bind(raw.executor)
                .bind(&*raw.job_labels)
                .bind(&*raw.spec)
                .bind(&*raw.input)
                .bind(None::<Uuid>)
                .bind(id)
                .bind(0_i32)
                .bind(None::<Uuid>)
                .execute(&mut *conn)
                .await?;
        }
        let claimed = sqlx::query(CLAIM_SQL)
            .bind(worker_id)
            .bind(ctx.executors.as_slice())
            .bind(&*raw.offer_labels)
            .bind(limit)
            .bind(lease_ms)
            .fetch_all(&mut *conn)
            .await?;
        if enqueue == 0 && claimed.is_empty() {
            return Ok(completed);
        }
        for row in &claimed {
            let id: Uuid = row.try_get(0)?;
            let token: i64 = row.try_get(5)?;
            // One autocommitted statement: the least a completion can cost by hand.
            let done = sqlx::query(COMPLETE_SUCCESS_SQL)
                .bind(id)
                .bind(token)
                .bind(Some(0_i32))
                .bind(None::<i32>)
                .bind(None::<&RawValue>)
                .bind(None::<bool>)
                .bind(0_i64)
                .execute(&mut *conn)
                .await?;
            ensure!(done.rows_affected() == 1, "job {id}: not completed");
        }
        completed += claimed.len() as u64;
    }
}

/// Fails if the raw path's claim no longer matches the queue module's (whitespace aside), so
/// the comparison cannot silently drift apart.
fn check_sql_matches_module() -> anyhow::Result<()> {
    const MODULE_SOURCE: &str = include_str!("../../api/src/storage/queue.rs");
    let squash = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let source = squash(MODULE_SOURCE);
    let statements = BTreeMap::from([("CLAIM_SQL", CLAIM_SQL)]);
    for (name, sql) in statements {
        let quoted = format!("\"{}\"", squash(sql));
        ensure!(
            source.contains(&quoted),
            "bench/src/queue.rs: {name} is no longer the statement api/src/storage/queue.rs sends; \
             copy it again"
        );
    }
    Ok(())
}

/// [`queue::enqueue`]'s insert without its audit part: the least an enqueue can cost by hand.
const INSERT_SQL: &str = "INSERT INTO jobs (id, event_id, status, priority, run_at, max_attempts, idempotency_key,
                           executor, labels, spec, input, parent_job_id, root_job_id, depth, created_by)
         VALUES ($1, $2, 'queued', $3, coalesce($4, now()), $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         ON CONFLICT (event_id, idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
         RETURNING id, (xmax = 0)";

/// [`queue::claim_batch`].
const CLAIM_SQL: &str =
    "SELECT id, event_id, attempt, priority, run_at, lease_token, lease_expires_at, spec, input,
                parent_job_id, root_job_id, last_log_seq, trace_context
         FROM claim_jobs($1, $2, $3, $4, $5)";

/// A success's completion as one plain autocommitted `UPDATE` (the module sets the same
/// columns, from arrays, in `queue::complete`'s one statement for a success).
const COMPLETE_SUCCESS_SQL: &str =
    "UPDATE jobs SET status = 'succeeded', dead = false, finished_at = now(),
             started_at = coalesce(started_at, now()),
             lease_token = NULL, lease_expires_at = NULL, completed_token = $2,
             exit_code = $3, exit_signal = $4, error_kind = NULL, error_message = NULL,
             output = $5, condition = $6, progress = 100
         WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now()
           AND status IN ('claimed', 'running') AND last_log_seq >= $7
         RETURNING EXISTS (SELECT 1 FROM event_actions a WHERE a.event_id = jobs.event_id)";
