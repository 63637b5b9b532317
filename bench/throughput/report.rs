//! What the phases measured, and the one final table (ratios only where both sides ran).

use crate::daemon::Drain;
use crate::seed::SeedDrain;

/// The four phases of a daemon run over the same N rows.
pub struct DaemonOps {
    pub inserts: Drain,
    /// Updates that change the text (every text re-embedded).
    pub updates: Drain,
    /// Updates of the price only (same text: nothing embedded, chunk 0's payload written).
    pub unchanged: Drain,
    pub deletes: Drain,
}

pub struct SeedOps {
    pub inserts: SeedDrain,
    pub deletes: SeedDrain,
}

pub struct CeilingRun {
    pub max_in_flight: usize,
    pub drain: Drain,
    pub requests: u64,
    pub texts: u64,
}

pub struct RssRun {
    pub factor: u64,
    pub base: Drain,
    pub big: Drain,
}

#[derive(Default)]
pub struct Results {
    pub broker: Option<(u64, f64)>,
    pub embedder: Option<(u64, f64)>,
    pub embedded: Option<DaemonOps>,
    pub llamaindex: Option<DaemonOps>,
    pub seed: Option<SeedOps>,
    pub ceiling: Vec<CeilingRun>,
    pub fake_latency_ms: u64,
    pub rss: Option<RssRun>,
    pub failures: Vec<(String, String)>,
}

struct Row {
    label: String,
    events: u64,
    rate: f64,
    rss: Option<(u64, u64)>,
    cpu_pct: Option<f64>,
    ratio: String,
    note: String,
}

fn row(label: impl Into<String>, events: u64, rate: f64) -> Row {
    Row {
        label: label.into(),
        events,
        rate,
        rss: None,
        cpu_pct: None,
        ratio: String::new(),
        note: String::new(),
    }
}

fn drain_row(label: impl Into<String>, d: &Drain) -> Row {
    Row {
        rss: Some((d.rss_drain_kb, d.hwm_kb)),
        cpu_pct: Some(d.cpu_pct()),
        ..row(label, d.events, d.rate())
    }
}

fn x(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b.max(1e-9))
}

fn pct(a: f64, b: f64) -> String {
    let p = 100.0 * a / b.max(1e-9);
    if p < 10.0 {
        format!("{p:.1} %")
    } else {
        format!("{p:.0} %")
    }
}

fn mb(kb: u64) -> String {
    format!("{:.0}", kb as f64 / 1024.0)
}

/// Rows of one daemon run's phases, with the ratios the issue sets targets for.
fn ops_rows(out: &mut Vec<Row>, name: &str, ops: &DaemonOps, r: &Results) {
    let mut inserts = drain_row(format!("{name}: inserts"), &ops.inserts);
    if let (Some((_, embed)), "cdc-indexer, embedded sink") = (r.embedder, name) {
        inserts.ratio = format!("{} of bare embedder", x(ops.inserts.rate(), embed));
        inserts.note = "target ≥ 0.90×".into();
    }
    out.push(inserts);
    let mut updates = drain_row(format!("{name}: updates, text changed"), &ops.updates);
    updates.note = format!("{:.0} texts embedded", ops.updates.texts_embedded);
    out.push(updates);
    let mut unchanged = drain_row(format!("{name}: updates, same text"), &ops.unchanged);
    unchanged.ratio = format!(
        "{} of text-changing",
        x(ops.unchanged.rate(), ops.updates.rate())
    );
    unchanged.note = format!(
        "target ≥ 20×; {:.0} texts embedded",
        ops.unchanged.texts_embedded
    );
    out.push(unchanged);
    if let Some((_, broker)) = r.broker {
        let mut of_broker = row(format!("{name}: same text / broker"), 0, 0.0);
        of_broker.ratio = pct(ops.unchanged.rate(), broker);
        of_broker.note = "target ≥ 50 %".into();
        out.push(of_broker);
    }
    let mut deletes = drain_row(format!("{name}: deletes"), &ops.deletes);
    if let Some((_, broker)) = r.broker {
        deletes.ratio = format!("{} of broker", pct(ops.deletes.rate(), broker));
        deletes.note = "target ≥ 50 %".into();
    }
    out.push(deletes);
}

pub fn print(r: &Results, header: &str) {
    let mut rows: Vec<Option<Row>> = Vec::new();
    let section = |rows: &mut Vec<Option<Row>>, body: Vec<Row>| {
        if !body.is_empty() {
            rows.push(None);
            rows.extend(body.into_iter().map(Some));
        }
    };

    // 1. The seed design against the daemon, on the same events.
    let mut body = Vec::new();
    if let Some(seed) = &r.seed {
        let mut s = row(
            "SEED DESIGN (baseline, prefetch 5, 1 HTTP call/msg): inserts",
            seed.inserts.events,
            seed.inserts.rate(),
        );
        s.ratio = "1.00× (baseline)".into();
        s.note = format!(
            "first tenth {:.1}/s, last tenth {:.1}/s",
            seed.inserts.first_tenth, seed.inserts.last_tenth
        );
        body.push(s);
        for (name, ops) in [("embedded", &r.embedded), ("llamaindex", &r.llamaindex)] {
            if let Some(ops) = ops {
                let mut d = drain_row(format!("cdc-indexer, {name} sink: inserts"), &ops.inserts);
                d.ratio = format!("{} of seed", x(ops.inserts.rate(), seed.inserts.rate()));
                body.push(d);
            }
        }
        let mut s = row(
            "SEED DESIGN (baseline): deletes",
            seed.deletes.events,
            seed.deletes.rate(),
        );
        s.ratio = "1.00× (baseline)".into();
        body.push(s);
        for (name, ops) in [("embedded", &r.embedded), ("llamaindex", &r.llamaindex)] {
            if let Some(ops) = ops {
                let mut d = drain_row(format!("cdc-indexer, {name} sink: deletes"), &ops.deletes);
                d.ratio = format!("{} of seed", x(ops.deletes.rate(), seed.deletes.rate()));
                body.push(d);
            }
        }
    }
    section(&mut rows, body);

    // 2 and 4. The in-process model, each phase, the broker's ceiling.
    let mut body = Vec::new();
    if let Some((n, rate)) = r.broker {
        let mut b = row(
            "raw broker consume+ack (quorum, prefetch 500, ack/250)",
            n,
            rate,
        );
        b.note = "the ceiling of any consumer here".into();
        body.push(b);
    }
    if let Some((n, rate)) = r.embedder {
        let mut e = row("bare embedder (fastembed in-process), texts/s", n, rate);
        e.note = "the daemon's settings, batches of 256".into();
        body.push(e);
    }
    if let Some(ops) = &r.embedded {
        ops_rows(&mut body, "cdc-indexer, embedded sink", ops, r);
    }
    section(&mut rows, body);
    let mut body = Vec::new();
    if let Some(ops) = &r.llamaindex {
        ops_rows(&mut body, "cdc-indexer, llamaindex sink", ops, r);
    }
    section(&mut rows, body);

    // 3. The daemon's own ceiling: an embedding service that costs nothing.
    let mut body = Vec::new();
    for c in &r.ceiling {
        let mut d = drain_row(
            format!(
                "FAKE EMBEDDER (no model), max_in_flight {:>2}: inserts",
                c.max_in_flight
            ),
            &c.drain,
        );
        if let Some(first) = r.ceiling.first() {
            d.ratio = format!(
                "{} of max_in_flight 1",
                x(c.drain.rate(), first.drain.rate())
            );
        }
        d.note = format!(
            "{} requests, {:.1} texts each, adaptive limit at end {:.0}{}",
            c.requests,
            c.texts as f64 / c.requests.max(1) as f64,
            c.drain.embed_concurrency,
            if r.fake_latency_ms > 0 {
                format!(", {} ms per request", r.fake_latency_ms)
            } else {
                String::new()
            }
        );
        body.push(d);
    }
    section(&mut rows, body);

    // 5. Memory with a 10× larger backlog.
    let mut body = Vec::new();
    if let Some(rss) = &r.rss {
        body.push(drain_row("RSS: deletes, backlog N", &rss.base));
        let mut big = drain_row(format!("RSS: deletes, backlog {}×N", rss.factor), &rss.big);
        big.ratio = format!(
            "RSS {} / peak {} of N",
            x(rss.big.rss_drain_kb as f64, rss.base.rss_drain_kb as f64),
            x(rss.big.hwm_kb as f64, rss.base.hwm_kb as f64)
        );
        big.note = "flat = about 1.00× (the backlog stays in the broker)".into();
        body.push(big);
        if let Some((_, broker)) = r.broker {
            let mut of_broker = row(
                format!("RSS: deletes, backlog {}×N / broker", rss.factor),
                0,
                0.0,
            );
            of_broker.ratio = pct(rss.big.rate(), broker);
            of_broker.note = "target ≥ 50 %".into();
            body.push(of_broker);
        }
    }
    section(&mut rows, body);

    println!("{header}");
    println!(
        "{:<62} {:>7} {:>10} {:>5} {:>15}  {:<30} notes",
        "figure", "events", "events/s", "CPU%", "RSS MB drain/pk", "ratio"
    );
    for row in rows {
        let Some(row) = row else {
            println!("{}", "-".repeat(140));
            continue;
        };
        let events = if row.events > 0 {
            row.events.to_string()
        } else {
            String::new()
        };
        let rate = if row.rate > 0.0 {
            format!("{:.1}", row.rate)
        } else {
            String::new()
        };
        let rss = row
            .rss
            .map(|(d, h)| format!("{} / {}", mb(d), mb(h)))
            .unwrap_or_default();
        let cpu = row.cpu_pct.map(|c| format!("{c:.0}")).unwrap_or_default();
        println!(
            "{:<62} {events:>7} {rate:>10} {cpu:>5} {rss:>15}  {:<30} {}",
            row.label, row.ratio, row.note
        );
    }
    for (phase, error) in &r.failures {
        println!("FAILED phase {phase}: {error}");
    }
}
