//! Percentiles and the printed report.

use crate::phases::{Capacity, Drain, Load};
use crate::track::Update;

/// Nearest-rank percentiles (p in 0..=1) of `values`, in milliseconds.
pub struct Dist(Vec<f64>);

impl Dist {
    pub fn of(values: impl Iterator<Item = f64>) -> Dist {
        let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).map(|s| s * 1000.0).collect();
        v.sort_by(f64::total_cmp);
        Dist(v)
    }

    pub fn n(&self) -> usize {
        self.0.len()
    }

    pub fn p(&self, p: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let rank = ((p * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        Some(self.0[rank - 1])
    }

    fn cells(&self) -> String {
        [0.5, 0.95, 0.99, 1.0]
            .iter()
            .map(|&p| ms(self.p(p)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => format!("{:>8}", "never"),
        Some(v) => format!("{v:>8.0}"),
        None => format!("{:>8}", "–"),
    }
}

fn span(us: &[Update], f: impl Fn(&Update) -> Option<(f64, f64)>) -> Dist {
    Dist::of(us.iter().filter_map(|u| f(u).map(|(a, b)| b - a)))
}

/// The figures of one load (all in ms).
pub struct Figures {
    pub searchable: Dist,
    pub to_broker: Dist,
    pub broker_to_searchable: Dist,
    pub source_to_searchable: Dist,
    pub commit_after_source: Dist,
    pub search: Dist,
    pub search_over_hash: Dist,
}

pub fn figures(l: &Load) -> Figures {
    let done: Vec<Update> = l
        .updates
        .iter()
        .filter(|u| !u.superseded && u.written.is_some())
        .cloned()
        .collect();
    // An update never seen searchable (within the phase's wait) counts as infinitely late:
    // leaving it out would flatter the percentiles.
    let never = l
        .updates
        .iter()
        .filter(|u| !u.superseded && u.written.is_none())
        .map(|_| f64::INFINITY);
    let searchable = Dist::of(
        done.iter()
            .filter_map(|u| Some(u.written? - u.commit?))
            .chain(never),
    );
    Figures {
        searchable,
        to_broker: span(&done, |u| Some((u.commit?, u.broker?))),
        broker_to_searchable: span(&done, |u| Some((u.broker?, u.written?))),
        source_to_searchable: span(&done, |u| Some((u.source?, u.written?))),
        commit_after_source: span(&done, |u| Some((u.source?, u.commit?))),
        search: span(&done, |u| Some((u.commit?, u.searched?))),
        search_over_hash: span(&done, |u| Some((u.written?, u.searched?))),
    }
}

pub fn print_load(l: &Load, search_every: u64) {
    let f = figures(l);
    let superseded = l.updates.iter().filter(|u| u.superseded).count();
    let missing = l
        .updates
        .iter()
        .filter(|u| !u.superseded && u.written.is_none())
        .count();
    let sampled: Vec<&Update> = l
        .updates
        .iter()
        .filter(|u| u.sampled && !u.superseded)
        .collect();
    let found = sampled.iter().filter(|u| u.searched.is_some()).count();
    let first_try = sampled
        .iter()
        .filter(|u| u.searched.is_some() && u.searches == 1)
        .count();
    println!(
        "\n== {}: {:.1} updates/s asked, {:.1} achieved, {:.0} s: {} updates ({} searchable, {missing} not within 30 s: counted as never, {superseded} superseded by a later update of the row)",
        l.label,
        l.target_rate,
        l.rate,
        l.secs,
        l.updates.len(),
        l.updates.len() - missing - superseded,
    );
    println!(
        "{:<58} {:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p95", "p99", "max"
    );
    let row = |name: &str, d: &Dist| println!("{name:<58} {}", d.cells());
    row(
        "commit → searchable (new chunk-0 hash, /index/states)",
        &f.searchable,
    );
    row(
        "  commit → broker (tap queue: source → broker)",
        &f.to_broker,
    );
    row("  broker → searchable", &f.broker_to_searchable);
    row("source.ts_ms → searchable", &f.source_to_searchable);
    row(
        "client's commit time − source.ts_ms",
        &f.commit_after_source,
    );
    row(
        &format!(
            "commit → /search finds it ({found} of {} sampled)",
            sampled.len()
        ),
        &f.search,
    );
    row("  /search found − hash seen", &f.search_over_hash);
    let hist = |name: &str, h: &crate::daemon::Histogram| {
        let q = |p| h.quantile(p).map(|s| s * 1000.0);
        println!(
            "{:<58} {} {} {} {:>8}",
            format!("{name} ({:.0} obs.)", h.count()),
            ms(q(0.5)),
            ms(q(0.95)),
            ms(q(0.99)),
            "",
        );
    };
    hist(
        "daemon's share: delivery_to_ack_seconds histogram",
        &l.share,
    );
    hist(
        "daemon's lag_seconds histogram (source.ts_ms → ack)",
        &l.lag,
    );
    hist("  per batch: embed_duration_seconds", &l.embed);
    hist(
        "  per batch: write_duration_seconds (durable: + flush)",
        &l.write,
    );
    println!(
        "  /search sample: every {search_every}th update, searched once its hash is seen; found at the first search: {first_try} of {found}. {:.0} batches ({:.1} events each), daemon CPU {:.0} % of a core",
        l.batches,
        l.updates.len() as f64 / l.batches.max(1.0),
        l.daemon_cpu_pct
    );
}

pub fn print_summary(capacity: &[Capacity], loads: &[Load], drains: &[Drain], header: &str) {
    println!("\n{header}");
    for (i, c) in capacity.iter().enumerate() {
        let when = if i == 0 {
            ""
        } else {
            " (again, after the loads)"
        };
        println!(
            "capacity{when}, single-row text-changing updates end to end: {:.1} updates/s ({} updates as fast as one connection commits them, first commit → last ack {:.1} s; {} of {} then seen searchable)",
            c.rate, c.updates, c.secs, c.verified, c.updates
        );
    }
    if !loads.is_empty() {
        println!(
            "\n{:<44} {:>7} {:>5} | {:^26} | {:^17} | {:^17} | {:^17} | {:>7}",
            "commit → searchable, ms",
            "upd/s",
            "n",
            "p50 / p95 / p99",
            "→ broker p50/p99",
            "broker→ p50/p99",
            "share p50/p99",
            "search p99"
        );
    }
    let v = |x: Option<f64>| match x {
        None => "–".to_string(),
        Some(v) if v.is_infinite() => "never".to_string(),
        Some(v) => format!("{v:.0}"),
    };
    for l in loads {
        let f = figures(l);
        let share = |p| l.share.quantile(p).map(|s| s * 1000.0);
        println!(
            "{:<44} {:>7.1} {:>5} | {:>26} | {:>17} | {:>17} | {:>17} | {:>7}",
            l.label,
            l.rate,
            f.searchable.n(),
            format!(
                "{} / {} / {}",
                v(f.searchable.p(0.5)),
                v(f.searchable.p(0.95)),
                v(f.searchable.p(0.99))
            ),
            format!("{} / {}", v(f.to_broker.p(0.5)), v(f.to_broker.p(0.99))),
            format!(
                "{} / {}",
                v(f.broker_to_searchable.p(0.5)),
                v(f.broker_to_searchable.p(0.99))
            ),
            format!("{} / {}", v(share(0.5)), v(share(0.99))),
            v(f.search.p(0.99)),
        );
    }
    if let Some(l) = loads.iter().find(|l| l.label.starts_with("50 %")) {
        let f = figures(l);
        let p99 = f.searchable.p(0.99).unwrap_or(f64::INFINITY);
        let share = l.share.quantile(0.99).map_or(f64::INFINITY, |s| s * 1000.0);
        println!(
            "\ntarget at half capacity: p99 commit → searchable {p99:.0} ms (≤ 1000: {}), daemon's share p99 {share:.0} ms (≤ 300: {})",
            if p99 <= 1000.0 { "met" } else { "NOT met" },
            if share <= 300.0 { "met" } else { "NOT met" },
        );
    }
    if !drains.is_empty() {
        println!(
            "\nbacklog drained by a fresh daemon (queued before it started; /readyz → ack of the last), rounds alternating:"
        );
        for d in drains {
            println!(
                "  {:<46} {:>6} events {:>8.1} events/s  {:>4.0} batches ({:>5.1} events each)  {} of {} then searchable (or superseded by a later update of the row)",
                d.label,
                d.events,
                d.rate(),
                d.batches,
                d.events as f64 / d.batches.max(1.0),
                d.searchable,
                d.events
            );
        }
        let mut labels: Vec<&str> = drains.iter().map(|d| d.label.as_str()).collect();
        labels.dedup();
        labels.truncate(2);
        let rate = |label: &str| {
            let (events, secs) = drains
                .iter()
                .filter(|d| d.label == label)
                .fold((0.0, 0.0), |(e, s), d| (e + d.events as f64, s + d.secs));
            events / f64::max(secs, 1e-9)
        };
        for label in &labels {
            println!("  {label:<46} all rounds: {:.1} events/s", rate(label));
        }
        if let [a, b] = labels[..] {
            println!(
                "  ratio {:.2} (adaptive / linger)",
                rate(a) / rate(b).max(1e-9)
            );
        }
    }
}
