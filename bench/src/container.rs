//! `container`: wall time of a trivial run (`true`) in a fresh container through Baton's
//! container executor, beside `docker run --rm IMAGE true` on the same image and engine.
//!
//! **What "through Baton" is.** The executor's whole path for one job, at library level: a
//! `ContainerExecutor` (as a worker builds it: default configuration, hardened, labelled, one
//! pre-started spare container per configuration) runs `RunSpec::exec(["true"])` with a run
//! directory prepared as the worker prepares one (`input.json`, `event.json`, `vars/`), so it
//! does everything a job's run does. `baton` is the warm path, as a worker with spares (the
//! default) runs a job: take the spare, upload the run's files into it and create the exec
//! (overlapped), start the exec attached, observe its exit, download `out/`, remove the
//! container. The spare's creation and start are *not* on that path: they happen before the
//! job (a replacement is started in the background after each run). The benchmark waits,
//! unmeasured, until the replacement is ready after every `baton` run, so each run finds a
//! spare and no refill overlaps another kind's measurement. `cold` is the same run with spares
//! off: image check, create (volume, tmpfs, limits), upload, attach, start, wait, output
//! drain, exit inspection, download of `out/`, remove. The clock runs from the call to the
//! returned outcome (the container is removed by then). What it leaves out is the queue and the gRPC stream, measured by
//! `dispatch`; with `--api` a third kind adds them: the same job through an api replica and an
//! in-process worker (REST enqueue → observed `succeeded` row).
//!
//! **The reference** is `docker run --rm IMAGE true` as a child process, waited for; it
//! includes the CLI's own start-up, which is what a user of the CLI pays.
//!
//! **The engine's floor** (`engine`) is what any container run costs the engine, whoever asks:
//! create (a bare body: image, command, network `none` as Baton's runs), start, wait, remove,
//! straight through the Engine API with no files, no attach and no hardening. Neither Baton nor the CLI can go below it, so
//! it bounds the ratio: `engine / docker_cli` is the best any client could reach.
//!
//! The kinds alternate run by run (so a change of machine load hits them alike) after an
//! unmeasured warm-up of each. `ratio` = median(baton) / median(docker CLI); target ≤ 0.7;
//! `cold_ratio` = median(cold) / median(docker CLI).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use baton_worker::executor::{ContainerConfig, ContainerExecutor, RunSpec, run_collect};
use baton_worker::rundir::{self, RunFiles};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{self, Summary, median, quantile};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measured runs of each kind (alternating).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Unmeasured runs of each kind first.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// The image both run (the `exec` runtime's default image).
    #[arg(long, default_value = "baton/runtime:exec")]
    image: String,
    /// Also measure the job through an api replica and an in-process worker.
    #[arg(long)]
    api: bool,
}

/// The kinds of run, in the order they alternate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Baton,
    Cold,
    DockerCli,
    Engine,
    Api,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Baton => "baton",
            Kind::Cold => "cold",
            Kind::DockerCli => "docker_cli",
            Kind::Engine => "engine",
            Kind::Api => "api",
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<Summary> {
    check_image(&args.image).await?;
    let worker_id = format!("bench-{}", Uuid::now_v7());
    let mut config = ContainerConfig::new(worker_id);
    for image in config.default_images.values_mut() {
        image.clone_from(&args.image);
    }
    let mut cold_config = config.clone();
    cold_config.worker_id.push_str("-cold");
    cold_config.spares = 0;
    let executor = ContainerExecutor::connect(config)
        .await
        .context("connecting to the Docker engine")?;
    let cold = ContainerExecutor::connect(cold_config)
        .await
        .context("connecting to the Docker engine")?;
    // Every runtime's default image is the same here: one configuration, one spare.
    executor.prewarm();
    let measured = measure(&args, &executor, &cold).await;
    executor.shutdown().await;
    measured
}

async fn measure(
    args: &Args,
    executor: &ContainerExecutor,
    cold: &ContainerExecutor,
) -> anyhow::Result<Summary> {
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let api = match args.api {
        true => Some(ApiSide::start(&args.image).await?),
        false => None,
    };
    let docker =
        Docker::connect_with_local_defaults().context("connecting to the Docker engine")?;
    let mut kinds = vec![Kind::Baton, Kind::Cold, Kind::DockerCli, Kind::Engine];
    if api.is_some() {
        kinds.push(Kind::Api);
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "config: `true` in a fresh container of {} ({}), alternating {}; runs={} warmup={}; \
         {cpus} CPUs, load average {}; baton = a run in a pre-started spare (its creation and \
         start, and the background refill, are off the clock: each run waits, unmeasured, \
         for a ready spare), cold = spares off",
        args.image,
        engine_version().await,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("/"),
        args.runs,
        args.warmup,
        support::load_average()
    );

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..args.warmup + args.runs {
        for (i, kind) in kinds.iter().enumerate() {
            if *kind == Kind::Baton {
                spare_ready(executor).await?;
            }
            let warm_before = executor.spare_stats().warm_runs;
            let started = Instant::now();
            match kind {
                Kind::Baton => through_executor(executor, scratch.path()).await?,
                Kind::Cold => through_executor(cold, scratch.path()).await?,
                Kind::DockerCli => docker_run(&args.image).await?,
                Kind::Engine => engine_floor(&docker, &args.image).await?,
                Kind::Api => match &api {
                    Some(api) => api.one().await?,
                    None => bail!("no api started"),
                },
            }
            let took = started.elapsed().as_secs_f64() * 1000.0;
            if *kind == Kind::Baton {
                ensure!(
                    executor.spare_stats().warm_runs == warm_before + 1,
                    "the run did not take a spare: {:?}",
                    executor.spare_stats()
                );
                // The refill is not the job's: let it finish before anything else is timed.
                spare_ready(executor).await?;
            }
            if round >= args.warmup {
                samples[i].push(took);
            }
        }
    }
    for (kind, values) in kinds.iter().zip(&samples) {
        println!(
            "{:>10}: p50={:.1} p90={:.1} min={:.1} max={:.1} ms",
            kind.name(),
            quantile(values, 0.5),
            quantile(values, 0.9),
            quantile(values, 0.0),
            quantile(values, 1.0)
        );
    }
    println!("load average {}", support::load_average());
    if let Some(api) = api {
        api.stop().await?;
    }

    let baton = median(&samples[0]);
    let cold_ms = median(&samples[1]);
    let cli = median(&samples[2]);
    let engine = median(&samples[3]);
    let mut summary = Summary::new("container")
        .field("baton_ms", format!("{baton:.1}"))
        .field("docker_cli_ms", format!("{cli:.1}"))
        .field("ratio", format!("{:.2}", baton / cli))
        .field("cold_ms", format!("{cold_ms:.1}"))
        .field("cold_ratio", format!("{:.2}", cold_ms / cli))
        .field("engine_ms", format!("{engine:.1}"))
        .field("engine_ratio", format!("{:.2}", engine / cli));
    if let Some(values) = samples.get(4) {
        summary = summary.field("api_ms", format!("{:.1}", median(values)));
    }
    Ok(summary)
}

/// Waits until the executor has a spare ready (bounded).
async fn spare_ready(executor: &ContainerExecutor) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while executor.spare_stats().idle == 0 {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "no spare container became ready within 60 s: {:?}",
                executor.spare_stats()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Fails with a clear message when the engine does not have `image`.
async fn check_image(image: &str) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .await
        .context("running `docker image inspect` (is the docker CLI installed?)")?;
    ensure!(
        out.status.success(),
        "image {image} is not on the Docker engine: build the runtime images with \
         deploy/images/build first ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The engine's version, for the configuration line.
async fn engine_version() -> String {
    let out = tokio::process::Command::new("docker")
        .args(["version", "--format", "engine {{.Server.Version}}"])
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => "engine ?".to_owned(),
    }
}

/// One `exec true` run through the executor, with a run directory as the worker makes one.
async fn through_executor(
    executor: &ContainerExecutor,
    scratch: &std::path::Path,
) -> anyhow::Result<()> {
    let job_id = Uuid::now_v7();
    let dir = scratch.join(job_id.simple().to_string());
    let files = RunFiles {
        input_json: "{}".to_owned(),
        event: json!({"job_id": job_id, "attempt": 1, "runtime": "exec", "executor": "container"}),
        ..RunFiles::default()
    };
    rundir::prepare(&dir, &files).context("preparing the run directory")?;
    let mut spec = RunSpec::exec(["true"]);
    spec.job_id = job_id;
    spec.run_dir = Some(dir.clone());
    let (outcome, _events) = run_collect(executor, spec, CancellationToken::new()).await;
    std::fs::remove_dir_all(&dir).context("removing the run directory")?;
    ensure!(
        outcome.succeeded(),
        "the run through the executor failed: {}",
        outcome.summary()
    );
    Ok(())
}

/// One `docker run --rm IMAGE true`.
async fn docker_run(image: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("docker")
        .args(["run", "--rm", image, "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .await
        .context("running docker")?;
    ensure!(status.success(), "docker run --rm {image} true: {status}");
    Ok(())
}

/// One bare create → start → wait → remove through the Engine API (see the module docs).
async fn engine_floor(docker: &Docker, image: &str) -> anyhow::Result<()> {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(vec!["true".to_owned()]),
        // As Baton's runs (no network unless asked): a network namespace with a bridge
        // endpoint costs the engine more at start than none.
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            ..HostConfig::default()
        }),
        ..ContainerCreateBody::default()
    };
    let id = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .context("creating a bare container")?
        .id;
    let ran = async {
        docker.start_container(&id, None).await?;
        let options = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        let mut wait = docker.wait_container(&id, Some(options));
        while let Some(status) = wait.next().await {
            status?;
        }
        Ok::<_, bollard::errors::Error>(())
    }
    .await;
    let options = RemoveContainerOptionsBuilder::new().force(true).build();
    docker
        .remove_container(&id, Some(options))
        .await
        .context("removing the bare container")?;
    ran.context("running the bare container")
}

/// A private PostgreSQL, an api replica and an in-process worker offering `container`, and an
/// `exec true` event placed on it.
struct ApiSide {
    cluster: baton_devdb::Cluster,
    api: support::ApiHandle,
    worker: support::WorkerHandle,
    event: String,
}

impl ApiSide {
    async fn start(image: &str) -> anyhow::Result<Self> {
        let cluster = support::cluster().await?;
        let api = support::start_api(&cluster, "bench_container", 2, |_| {}).await?;
        let worker = api.start_worker(1).await?;
        api.wait_workers(1).await?;
        let event = api
            .create_event(&json!({
                "name": "bench-container", "runtime": "exec", "command": ["true"],
                "executor": "container", "image": image, "timeout_seconds": 60
            }))
            .await?;
        Ok(Self {
            cluster,
            api,
            worker,
            event,
        })
    }

    /// Enqueues the event and waits until its job has succeeded (its row, polled every
    /// millisecond).
    async fn one(&self) -> anyhow::Result<()> {
        let id = self.api.run_event(&self.event).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, error): (String, Option<String>) =
                sqlx::query_as("SELECT status, error_message FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&self.api.pool)
                    .await?;
            match status.as_str() {
                "succeeded" => return Ok(()),
                "failed" | "timed_out" | "cancelled" => {
                    bail!("job {id} ended {status}: {}", error.unwrap_or_default())
                }
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "job {id} did not finish within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.worker.stop().await?;
        self.api.stop().await?;
        self.cluster.stop().context("stopping PostgreSQL")?;
        Ok(())
    }
}
