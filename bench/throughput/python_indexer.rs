//! The python-indexer (`python-indexer/run.sh`: FastAPI + LlamaIndex over Qdrant in local
//! mode), started by the bench on a free loopback port with an empty collection of its own,
//! and stopped (SIGTERM) when dropped.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{Proc, free_addr};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub struct PythonIndexer {
    pub url: String,
    /// Stopped (SIGTERM) when dropped.
    _proc: Proc,
}

impl PythonIndexer {
    /// Starts a service storing into `dir/qdrant`; returns once `/healthz` answers 200.
    pub async fn start(dir: &Path, label: &str) -> anyhow::Result<PythonIndexer> {
        std::fs::create_dir_all(dir)?;
        let addr = free_addr()?;
        let (host, port) = addr
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("address {addr}"))?;
        let mut command = Command::new(format!("{REPO}/python-indexer/run.sh"));
        command
            .env("PYTHON_INDEXER_HOST", host)
            .env("PYTHON_INDEXER_PORT", port)
            .env("PYTHON_INDEXER_QDRANT_PATH", dir.join("qdrant"))
            .env_remove("QDRANT_URL")
            .env_remove("PYTHON_INDEXER_API_KEY");
        let mut proc = Proc::spawn(
            &format!("the python-indexer ({label})"),
            command,
            &dir.join("python-indexer.log"),
        )?;
        let url = format!("http://{addr}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let started = Instant::now();
        loop {
            proc.check_alive()?;
            if let Ok(r) = client.get(format!("{url}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(PythonIndexer { url, _proc: proc });
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "the python-indexer did not answer /healthz within 120 s; log: {}",
                proc.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
