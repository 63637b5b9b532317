//! Latency benchmark (issue 15): how long from a row's commit until a search finds its new
//! text, through REAL Debezium, at 10 % and 50 % of the daemon's measured capacity. Prints
//! figures, asserts nothing.
//!
//! The bench's own table in the logical-decoding cluster (debezium/pg/, port 54329), the real
//! Debezium engine (debezium/runner.py: own slot and publication, publishing to the bench's
//! own exchange), the daemon binary (in-process fastembed model, embedded index, search port
//! on loopback), a tap queue on the same exchange. Phases (`--phases`, default all):
//! - `capacity`: `--burst` single-row text-changing UPDATEs (each its own commit) as fast as
//!   one connection commits them: updates/s from the first commit to the ack of the last;
//! - `load`: single-row UPDATEs paced at `--loads` percent of that (default 10,50) for
//!   `--duration` s each: per update commit → broker → searchable (`track.rs`) and the
//!   daemon's `delivery_to_ack_seconds` histogram over the phase;
//! - `backlog`: `--backlog` updates queued while no daemon runs, drained by a fresh daemon
//!   with the default `batch_idle_ms`, then again with `batch_idle_ms = batch_max_wait_ms`,
//!   alternating, `--backlog-rounds` times;
//! - `poll`: the highest load again with Debezium's default `poll.interval.ms` (500) instead
//!   of the runner's (`--poll-ms`, default 50).
//!
//! ```text
//! cargo build && cargo run --example bench-latency -- [--smoke] [--rows N] [--burst N]
//!     [--backlog N] [--backlog-rounds 2] [--duration S] [--loads 10,50] [--poll-ms 50]
//!     [--compare-poll-ms 500] [--search-every 10] [--probe-ms 20] [--capacity R]
//!     [--phases LIST] [--daemon PATH] [--pg-url URL]
//! ```
//! `--smoke` = `--rows 400 --burst 200 --backlog 1000 --duration 30` (a few minutes); the
//! defaults (`--rows 2000 --burst 1000 --backlog 3000 --duration 120`) are the full size.
//! ```text
//! ```

#[allow(dead_code)]
#[path = "../throughput/corpus.rs"]
mod corpus;
mod daemon;
mod phases;
#[allow(dead_code)]
#[path = "../throughput/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "../throughput/rabbit.rs"]
mod rabbit;
mod report;
mod source;
mod track;

use std::path::PathBuf;
use std::time::{Duration, Instant};

const PHASES: &[&str] = &["capacity", "load", "backlog", "poll"];

struct Args {
    rows: u64,
    burst: u64,
    backlog: u64,
    duration: f64,
    loads: Vec<f64>,
    poll_ms: u64,
    compare_poll_ms: u64,
    search_every: u64,
    probe_ms: u64,
    capacity: Option<f64>,
    backlog_rounds: u64,
    phases: Vec<String>,
    daemon: Option<PathBuf>,
    pg_url: String,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: bench-latency [--smoke] [--rows N] [--burst N] [--backlog N] [--backlog-rounds 2] \
         [--duration S] [--loads 10,50] [--poll-ms 50] [--compare-poll-ms 500] [--search-every 10] [--probe-ms 20] \
         [--capacity R] [--phases {}] [--daemon PATH] [--pg-url URL]",
        PHASES.join(",")
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        rows: 2000,
        burst: 1000,
        backlog: 3000,
        duration: 120.0,
        loads: vec![10.0, 50.0],
        poll_ms: 50,
        compare_poll_ms: 500,
        search_every: 10,
        probe_ms: 20,
        capacity: None,
        backlog_rounds: 2,
        phases: PHASES.iter().map(|s| s.to_string()).collect(),
        daemon: None,
        pg_url: "postgres://postgres:postgres@127.0.0.1:54329/postgres".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        let num = |v: String| -> f64 {
            v.trim()
                .parse()
                .unwrap_or_else(|_| usage(&format!("not a number: {v}")))
        };
        match arg.as_str() {
            "--smoke" => (a.rows, a.burst, a.backlog, a.duration) = (400, 200, 1000, 30.0),
            "--rows" => a.rows = num(value()).max(1.0) as u64,
            "--burst" => a.burst = num(value()).max(1.0) as u64,
            "--backlog" => a.backlog = num(value()).max(1.0) as u64,
            "--duration" => a.duration = num(value()).max(1.0),
            "--loads" => a.loads = value().split(',').map(|s| num(s.to_string())).collect(),
            "--poll-ms" => a.poll_ms = num(value()).max(1.0) as u64,
            "--compare-poll-ms" => a.compare_poll_ms = num(value()) as u64,
            "--search-every" => a.search_every = num(value()).max(1.0) as u64,
            "--probe-ms" => a.probe_ms = num(value()).max(1.0) as u64,
            "--capacity" => a.capacity = Some(num(value())),
            "--backlog-rounds" => a.backlog_rounds = num(value()).max(1.0) as u64,
            "--phases" => {
                a.phases = value().split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = a.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
                    usage(&format!("unknown phase {bad}"));
                }
            }
            "--daemon" => a.daemon = Some(PathBuf::from(value())),
            "--pg-url" => a.pg_url = value(),
            "-h" | "--help" => usage("cdc-indexer latency benchmark"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a.rows = a.rows.max(a.burst);
    a
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let a = args();
    let prefix = format!("bench_lat_{}", std::process::id());
    let rabbit = match rabbit::Rabbit::connect().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-latency: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut pg = match source::Pg::connect(&a.pg_url, &prefix).await {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("bench-latency: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // On Ctrl-C the run is dropped: the runner and the daemon are stopped (`procs::Proc`),
    // then what the bench created is removed.
    let outcome = tokio::select! {
        r = run(&a, &rabbit, &prefix) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    rabbit.cleanup().await;
    pg.cleanup(&prefix).await;
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-latency: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn default_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cdc-indexer"))
        .ok_or_else(|| anyhow::anyhow!("cannot locate the target directory"))?;
    anyhow::ensure!(
        path.exists(),
        "{} not found: build the daemon first (`cargo build`) or pass --daemon PATH",
        path.display()
    );
    Ok(path)
}

async fn run(a: &Args, rabbit: &rabbit::Rabbit, prefix: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let phase = |p: &str| a.phases.iter().any(|q| q == p);
    let tmp = tempfile::Builder::new()
        .prefix("cdc-bench-latency-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let setup = daemon::Setup {
        exe: match &a.daemon {
            Some(p) => p.clone(),
            None => default_exe()?,
        },
        dir: dir.join("daemon"),
        topology: rabbit.declare("latency").await?,
        table: prefix.to_string(),
    };
    let (config, rule) = setup.config()?;
    // Consecutive updates are of distinct rows (round robin), so a batch holds no two events
    // of one key (nothing coalesced) as long as there are more rows than a batch holds.
    let rows = a.rows.max(config.pipeline.batch_max_events as u64);
    let table = format!("public.{prefix}");
    let tracker = track::Tracker::default();
    track::tap(&rabbit.conn, &setup.topology.exchange, tracker.clone()).await?;

    let mut pg = source::Pg::connect(&a.pg_url, prefix).await?;
    pg.create(rows).await?;
    let mut w = phases::Writer::new(pg, tracker.clone(), rule, rows, a.search_every);
    let mut d = setup.start("default", &[]).await?;
    tracker.set_search(&d.search);
    let probe = track::probe(
        table.clone(),
        Duration::from_millis(a.probe_ms),
        tracker.clone(),
    );
    eprintln!(
        "starting the Debezium runner (poll.interval.ms {})",
        a.poll_ms
    );
    let spec = |slot: &str, poll_ms, snapshot| source::RunnerSpec {
        dir: &dir,
        exchange: &setup.topology.exchange,
        table: prefix,
        slot: format!("{prefix}_{slot}"),
        poll_ms,
        snapshot,
    };
    let mut runner = source::Runner::start(spec("a", a.poll_ms, "initial")).await?;
    let t0 = Instant::now();
    while d.metrics().await.sum("cdc_indexer_events_processed_total") < rows as f64 {
        d.proc.check_alive()?;
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "the snapshot was not indexed in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{rows} rows indexed ({:.0} s into the run)",
        started.elapsed().as_secs_f64()
    );

    let mut capacity = Vec::new();
    let mut loads = Vec::new();
    let mut drains = Vec::new();
    let mut rate = a.capacity;
    if phase("capacity") {
        let c = phases::capacity(&mut w, &mut d, a.burst).await?;
        eprintln!(
            "capacity: {:.1} updates/s ({} in {:.1} s)",
            c.rate, c.updates, c.secs
        );
        rate = Some(c.rate);
        capacity.push(c);
    }
    let needs_rate = phase("load") || phase("poll");
    let rate = match rate {
        Some(r) => r,
        None if needs_rate => {
            anyhow::bail!("the load phases need the capacity: run `capacity` or pass --capacity R")
        }
        None => 0.0,
    };
    if phase("load") {
        for &pct in &a.loads {
            let label = format!("{pct:.0} % of capacity (poll.interval.ms {})", a.poll_ms);
            eprintln!("load: {label}");
            let l = phases::load(&mut w, &d, &label, rate * pct / 100.0, a.duration).await?;
            report::print_load(&l, a.search_every);
            loads.push(l);
        }
        if phase("capacity") {
            // Again: the machine's other load may have changed under the loads.
            let c = phases::capacity(&mut w, &mut d, a.burst).await?;
            eprintln!("capacity again: {:.1} updates/s", c.rate);
            capacity.push(c);
        }
    }
    if phase("backlog") {
        d.stop().await;
        let max_wait = config.pipeline.batch_max_wait_ms;
        let idle = config.pipeline.batch_idle_ms;
        let runs: [(String, Vec<(&str, String)>); 2] = [
            (format!("batch_idle_ms {idle} (default, adaptive)"), vec![]),
            (
                format!("batch_idle_ms {max_wait} (= batch_max_wait_ms)"),
                vec![("CDC_INDEXER__PIPELINE__BATCH_IDLE_MS", max_wait.to_string())],
            ),
        ];
        // Alternating rounds: the machine's other load drifts, the comparison should not.
        for round in 1..=a.backlog_rounds {
            for (i, (label, env)) in runs.iter().enumerate() {
                eprintln!("backlog round {round}: {} updates, {label}", a.backlog);
                let name = format!("backlog-{round}-{i}");
                let mut drain = phases::backlog(&mut w, &setup, &name, env, a.backlog).await?;
                drain.label = label.clone();
                eprintln!("  {:.1} events/s", drain.rate());
                drains.push(drain);
            }
        }
        d = setup.start("default-again", &[]).await?;
        tracker.set_search(&d.search);
    }
    if phase("poll") && a.compare_poll_ms > 0 {
        let pct = a.loads.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "poll: {pct:.0} % of capacity with poll.interval.ms {}",
            a.compare_poll_ms
        );
        runner.stop().await;
        runner = source::Runner::start(spec("b", a.compare_poll_ms, "no_data")).await?;
        let label = format!(
            "{pct:.0} % of capacity (poll.interval.ms {})",
            a.compare_poll_ms
        );
        let l = phases::load(&mut w, &d, &label, rate * pct / 100.0, a.duration).await?;
        report::print_load(&l, a.search_every);
        loads.push(l);
    }
    probe.abort();
    runner.stop().await;
    d.stop().await;

    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let overrides: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CDC_INDEXER__"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let header = format!(
        "cdc-indexer latency benchmark: {} rows, burst {}, {} s per load, {} cores, load average now {}, {:.0} s in all\n\
         daemon {} (fastembed in-process, embedded index){}; Debezium 3.6.3 via debezium/runner.py; searchable = the new text's chunk-0 hash via POST /index/states every {} ms, and /search for every {}th update",
        rows,
        a.burst,
        a.duration,
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        load_avg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64(),
        setup.exe.display(),
        if overrides.is_empty() {
            " with default settings".to_string()
        } else {
            format!(" with {}", overrides.join(" "))
        },
        a.probe_ms,
        a.search_every,
    );
    report::print_summary(&capacity, &loads, &drains, &header);
    Ok(())
}
