//! A worker for tests (in-process, stopped when dropped), and waiting on a job's state
//! through the API: shared by the workers and dashboard test targets.

use std::time::Duration;

use baton_api::model::Role;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::TestApp;

/// An in-process worker; dropping it stops it (SIGTERM-like drain).
pub struct InProcessWorker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessWorker {
    pub async fn start(app: &TestApp, slots: u32) -> Self {
        Self::start_with(app, slots, |_| {}).await
    }

    /// [`InProcessWorker::start`], with `configure` applied to the configuration last.
    pub async fn start_with(
        app: &TestApp,
        slots: u32,
        configure: impl FnOnce(&mut baton_worker::WorkerConfig),
    ) -> Self {
        let token = app.token(Role::Worker).await;
        let mut config = baton_worker::WorkerConfig::new(app.grpc_address.clone(), token);
        config.allow_local = true;
        config.slots = slots;
        config.drain_timeout = Duration::from_secs(5);
        configure(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(baton_worker::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the worker and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("worker stops in time");
            result.expect("worker task").expect("worker result");
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls the job until `done(job)` holds (180 s at most: debug builds on a loaded 2-core
/// machine are slow); returns the job.
pub async fn wait_job(app: &TestApp, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let (_, job) = app.get(&format!("/api/v1/jobs/{id}")).await;
        if done(&job) {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never reached the expected state: {job}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the job is in a terminal status.
pub async fn wait_finished(app: &TestApp, id: &str) -> Value {
    wait_job(app, id, |j| {
        matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "timed_out" | "cancelled")
        )
    })
    .await
}
