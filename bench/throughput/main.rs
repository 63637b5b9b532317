//! Throughput benchmark: prints figures, asserts nothing. Issue 12's "Benchmark".
//!
//! One command, one run, the same N product rows throughout, one final table:
//! - `seed`: THE SEED DESIGN cdc-indexer replaces, rebuilt as a baseline (`seed.rs`): a
//!   consumer with prefetch 5 making one HTTP call per message to the python-indexer, which
//!   embeds that one text and writes it; ack after the 200. Inserts and deletes.
//! - `embedder`: the bare embedder (fastembed in-process, the daemon's settings): texts/s.
//! - `embedded`, `llamaindex`: the daemon (in-process model) with the embedded index, and with
//!   the python-indexer as its sink: inserts, updates that change the text, updates that do
//!   not (price only: the skip-unchanged path), deletes. Ratios: inserts to the bare embedder
//!   and to the seed design; same-text updates to text-changing ones; deletes and same-text
//!   updates to the broker's ceiling.
//! - `ceiling`: the daemon with `[embedding] provider = "http"` against a FAKE embedding
//!   server in this bench (`fake_embedder.rs`, no model: hash-derived vectors), for
//!   `max_in_flight` 1, 4, 16: the daemon's own ceiling.
//! - `broker`: the raw broker consume+ack rate (lapin, quorum queue, prefetch 500, a multiple
//!   ack every 250), the ceiling of any consumer here.
//! - `rss`: the daemon's peak RSS draining N deletes, then 10×N, queued before it starts.
//!
//! Every daemon phase is its own daemon process over a backlog queued before it starts
//! (`daemon.rs`), so each has its own peak RSS. The bench starts and stops the python-indexer
//! and the fake embedder itself (loopback ports) and deletes every queue and exchange it
//! declared.
//!
//! ```text
//! cargo build && cargo run --example bench -- [N] [--phases LIST] [--in-flight 1,4,16]
//!     [--fake-latency-ms MS] [--broker-messages M] [--backlog-factor 10] [--daemon PATH]
//! ```
//! `LIST`: comma-separated, of `seed,embedder,embedded,llamaindex,ceiling,broker,rss`
//! (default: all). Needs RabbitMQ on 127.0.0.1:5672 (guest), `.models/` and `.venv/`.

mod broker_ceiling;
mod corpus;
mod daemon;
mod fake_embedder;
mod phases;
mod procs;
mod python_indexer;
mod rabbit;
mod report;
mod seed;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use phases::Env;
use report::Results;

const ALL_PHASES: &[&str] = &[
    "broker",
    "embedder",
    "embedded",
    "llamaindex",
    "seed",
    "ceiling",
    "rss",
];

struct Args {
    n: u64,
    phases: Vec<String>,
    in_flight: Vec<usize>,
    fake_latency_ms: u64,
    broker_messages: Option<u64>,
    backlog_factor: u64,
    daemon: Option<PathBuf>,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: bench [N] [--phases {}] [--in-flight 1,4,16] [--fake-latency-ms MS] \
         [--broker-messages M] [--backlog-factor 10] [--daemon PATH]",
        ALL_PHASES.join(",")
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        n: 5000,
        phases: ALL_PHASES.iter().map(|s| s.to_string()).collect(),
        in_flight: vec![1, 4, 16],
        fake_latency_ms: 0,
        broker_messages: None,
        backlog_factor: 10,
        daemon: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        let number = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("not a number: {v}")))
        };
        match arg.as_str() {
            "--phases" => {
                a.phases = value().split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = a.phases.iter().find(|p| !ALL_PHASES.contains(&p.as_str())) {
                    usage(&format!("unknown phase {bad}"));
                }
            }
            "--in-flight" => {
                a.in_flight = value()
                    .split(',')
                    .map(|s| number(s.trim().to_string()).max(1) as usize)
                    .collect()
            }
            "--fake-latency-ms" => a.fake_latency_ms = number(value()),
            "--broker-messages" => a.broker_messages = Some(number(value())),
            "--backlog-factor" => a.backlog_factor = number(value()).max(1),
            "--daemon" => a.daemon = Some(PathBuf::from(value())),
            "-h" | "--help" => usage("cdc-indexer throughput benchmark"),
            n => a.n = number(n.to_string()).max(1),
        }
    }
    a
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a = args();
    let rabbit = match rabbit::Rabbit::connect().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // On Ctrl-C the run is dropped: the processes it started are stopped (`procs::Proc`),
    // then what it declared is deleted.
    let outcome = tokio::select! {
        r = run(&a, &rabbit) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    rabbit.cleanup().await;
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(a: &Args, rabbit: &rabbit::Rabbit) -> anyhow::Result<bool> {
    let exe = match &a.daemon {
        Some(p) => p.clone(),
        None => daemon::default_exe()?,
    };
    let tmp = tempfile::Builder::new().prefix("cdc-bench-").tempdir()?;
    let env = Env {
        rabbit,
        dir: tmp.path(),
        exe: &exe,
        n: a.n,
    };
    let broker_messages = a.broker_messages.unwrap_or((10 * a.n).max(10_000));
    let mut results = Results {
        fake_latency_ms: a.fake_latency_ms,
        ..Results::default()
    };
    let started = Instant::now();
    for phase in ALL_PHASES
        .iter()
        .filter(|p| a.phases.iter().any(|q| q == *p))
    {
        eprintln!(
            "phase {phase} ({:.0} s into the run)",
            started.elapsed().as_secs_f64()
        );
        let outcome = match *phase {
            "broker" => phases::broker(&env, broker_messages)
                .await
                .map(|r| results.broker = Some(r)),
            "embedder" => phases::embedder(&env)
                .await
                .map(|r| results.embedder = Some(r)),
            "embedded" => phases::embedded(&env)
                .await
                .map(|r| results.embedded = Some(r)),
            "llamaindex" => phases::llamaindex(&env)
                .await
                .map(|r| results.llamaindex = Some(r)),
            "seed" => phases::seed(&env).await.map(|r| results.seed = Some(r)),
            "ceiling" => {
                let latency = Duration::from_millis(a.fake_latency_ms);
                phases::ceiling(&env, &a.in_flight, latency)
                    .await
                    .map(|r| results.ceiling = r)
            }
            "rss" => phases::rss(&env, a.backlog_factor)
                .await
                .map(|r| results.rss = Some(r)),
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            eprintln!("  phase {phase} FAILED: {e:#}");
            results.failures.push((phase.to_string(), format!("{e:#}")));
        }
    }
    let ok = results.failures.is_empty();
    if !ok {
        eprintln!("logs kept in {}", tmp.keep().display());
    }
    let overrides: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CDC_INDEXER__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let header = format!(
        "cdc-indexer throughput benchmark: N = {} product rows, {} cores, {:.0} s in all\n\
         daemon {} with default settings{}",
        a.n,
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0),
        started.elapsed().as_secs_f64(),
        exe.display(),
        if overrides.is_empty() {
            String::new()
        } else {
            format!(" but {}", overrides.join(" "))
        }
    );
    println!();
    report::print(&results, &header);
    Ok(ok)
}
