//! Throughput benchmark: prints figures, asserts nothing.
//!
//! In one run, on the same texts:
//! 1. the bare embedder (fastembed, the daemon's settings) embeds N product texts: texts/s;
//! 2. N insert events are published to a fresh queue, then the daemon drains and indexes
//!    them (timed from ready to the last ack): events/s, and its ratio to (1);
//! 3. N delete events for the same rows: events/s.
//!
//! `cargo run --example bench -- [N] [--sink embedded|llamaindex --url URL]`
//! (the daemon binary must be built: `cargo build`).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdc_indexer::config::Config;
use cdc_indexer::mapping::CompiledRule;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REPO: &str = env!("CARGO_MANIFEST_DIR");

const ADJECTIVES: &[&str] = &[
    "lightweight",
    "waterproof",
    "compact",
    "durable",
    "ergonomic",
    "insulated",
    "foldable",
    "stainless",
    "wireless",
    "rechargeable",
    "breathable",
    "heavy-duty",
    "adjustable",
    "non-stick",
    "recycled",
];
const NOUNS: &[&str] = &[
    "hiking backpack",
    "camping stove",
    "trail running shoe",
    "chef's knife",
    "cast iron skillet",
    "noise-cancelling headphones",
    "mechanical keyboard",
    "down sleeping bag",
    "espresso grinder",
    "rain jacket",
    "trekking pole",
    "bluetooth speaker",
    "yoga mat",
    "water filter",
    "headlamp",
];
const USES: &[&str] = &[
    "long weekends in the mountains",
    "busy weeknight dinners",
    "daily commutes in the rain",
    "ultralight thru-hikes",
    "small apartment kitchens",
    "focused work sessions",
    "winter camping below freezing",
    "family road trips",
    "early morning runs",
    "backcountry ski tours",
];
const DETAILS: &[&str] = &[
    "It packs down small and weighs less than you expect.",
    "The handle stays cool and the edge holds for months.",
    "Battery life lasts a full week of normal use.",
    "Seams are taped and the zips are sealed against storms.",
    "A lifetime warranty covers defects in materials.",
    "Easy to clean by hand; no special tools required.",
    "Reviewers praise its comfort on long days.",
    "Made with recycled fabrics and a PFC-free finish.",
    "Includes a carry pouch and a quick start guide.",
    "Tested by our staff over two seasons of hard use.",
];

fn product(id: u64) -> (String, String) {
    let i = id as usize;
    let name = format!(
        "{} {} {}",
        ADJECTIVES[i % ADJECTIVES.len()],
        NOUNS[(i / 3) % NOUNS.len()],
        id
    );
    let description = format!(
        "A {} {} designed for {}. {} {} Model year {}.",
        ADJECTIVES[(i * 7) % ADJECTIVES.len()],
        NOUNS[(i / 3) % NOUNS.len()],
        USES[(i * 3) % USES.len()],
        DETAILS[i % DETAILS.len()],
        DETAILS[(i * 5 + 1) % DETAILS.len()],
        2020 + i % 6
    );
    (name, description)
}

fn event(id: u64, op: &str, lsn: u64) -> Vec<u8> {
    let (name, description) = product(id);
    let row = json!({"id": id, "name": name, "description": description, "category": "outdoor", "price": "19.99"});
    let (before, after) = if op == "d" {
        (row, serde_json::Value::Null)
    } else {
        (serde_json::Value::Null, row)
    };
    json!({"before": before, "after": after, "op": op,
           "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": lsn, "ts_ms": chrono::Utc::now().timestamp_millis()}})
    .to_string()
    .into_bytes()
}

struct Args {
    n: u64,
    sink: String,
    url: String,
}

fn args() -> Args {
    let mut a = Args {
        n: 5000,
        sink: "embedded".into(),
        url: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sink" => a.sink = it.next().unwrap_or_default(),
            "--url" => a.url = it.next().unwrap_or_default(),
            n => a.n = n.parse().unwrap_or(a.n),
        }
    }
    a
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn metric_sum(addr: &str, name: &str) -> f64 {
    let Some((_, text)) = http_get(addr, "/metrics") else {
        return 0.0;
    };
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn publish(conn: &Connection, exchange: &str, bodies: impl Iterator<Item = Vec<u8>>) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut pending = Vec::new();
    for body in bodies {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "dbserver1.public.products".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() >= 500 {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
}

fn start_daemon(config: &std::path::Path, log: &std::path::Path) -> Child {
    let exe = std::env::current_exe().expect("exe");
    let daemon = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("cdc-indexer"))
        .expect("target dir");
    Command::new(daemon)
        .args(["--config", config.to_str().expect("utf8"), "run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn the daemon (run `cargo build` first)")
}

fn wait_for(addr: &str, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "{what} not reached in {timeout:?} ({addr})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let n = a.n;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!("bench-{}", std::process::id());
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
    };
    let sink = if a.sink == "llamaindex" {
        format!("kind = \"llamaindex\"\nurl = \"{}\"", a.url)
    } else {
        format!("path = \"{}\"", dir.path().join("index").display())
    };
    let state = dir.path().join("state").display().to_string();
    let config_text = format!(
        "[broker]\nurl = \"{AMQP}\"\nprefetch = 1024\n[topology]\nexchange = \"{name}.ex\"\ndead_letter_exchange = \"{name}.dlx\"\ndead_letter_queue = \"{name}.dlq\"\nqueue = \"{name}.q\"\n\
         [pipeline]\nbatch_max_events = 256\nstate_dir = \"{state}\"\n[embedding]\nmodel_dir = \"{REPO}/.models/all-minilm-l6-v2\"\nonnxruntime_lib = \"{REPO}/.models/onnxruntime/libonnxruntime.so\"\n\
         [sink]\n{sink}\n[http]\nlisten = \"{http}\"\n[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{{name}}\\n\\n{{description}}\"\n"
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &config_text).expect("config");
    let config = Config::load(&config_path).expect("config");
    let rule = CompiledRule::new(&config.tables[0]).expect("rule");

    // 1. The bare embedder on the same texts, with the daemon's settings.
    let texts: Vec<String> = (1..=n)
        .map(|id| {
            let (name, description) = product(id);
            let row = json!({"id": id, "name": name, "description": description});
            rule.render(row.as_object().expect("row"))
                .expect("doc")
                .chunks
                .concat()
        })
        .collect();
    let embedder = cdc_indexer::embed::from_config(&config.embedding)
        .await
        .expect("embedder");
    let started = Instant::now();
    for chunk in texts.chunks(256) {
        embedder.embed(chunk).await.expect("embed");
    }
    let embed_rate = n as f64 / started.elapsed().as_secs_f64();
    drop(embedder);

    // 2. The daemon draining N inserts.
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    {
        let ch = conn.create_channel().await.expect("channel");
        cdc_indexer::broker::topology::declare(&ch, &config.topology)
            .await
            .expect("declare");
    }
    publish(
        &conn,
        &config.topology.exchange,
        (1..=n).map(|id| event(id, "c", 1000 + id)),
    )
    .await;
    let mut daemon = start_daemon(&config_path, &dir.path().join("daemon.log"));
    wait_for(&http, "ready", Duration::from_secs(120), || {
        matches!(http_get(&http, "/readyz"), Some((200, _)))
    });
    let started = Instant::now();
    wait_for(&http, "inserts drained", Duration::from_secs(3600), || {
        metric_sum(&http, "cdc_indexer_events_processed_total") >= n as f64
    });
    let insert_secs = started.elapsed().as_secs_f64();
    let insert_rate = n as f64 / insert_secs;

    // 3. N deletes.
    publish(
        &conn,
        &config.topology.exchange,
        (1..=n).map(|id| event(id, "d", 100_000_000 + id)),
    )
    .await;
    let started = Instant::now();
    wait_for(&http, "deletes drained", Duration::from_secs(3600), || {
        metric_sum(&http, "cdc_indexer_events_processed_total") >= 2.0 * n as f64
    });
    let delete_rate = n as f64 / started.elapsed().as_secs_f64();
    let batches = metric_sum(&http, "cdc_indexer_batch_size_events_count");

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
    let ch = conn.create_channel().await.expect("channel");
    for q in [&config.topology.queue, &config.topology.dead_letter_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [
        &config.topology.exchange,
        &config.topology.dead_letter_exchange,
    ] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }

    println!(
        "cdc-indexer benchmark, sink {}, N = {n} product events, {} cores",
        a.sink,
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    println!("  bare embedder:            {embed_rate:>8.1} texts/s");
    println!(
        "  daemon, inserts:          {insert_rate:>8.1} events/s  ({insert_secs:.1} s, {batches} batches in total)"
    );
    println!(
        "  ratio daemon / embedder:  {:>8.3}   (target >= 0.9)",
        insert_rate / embed_rate
    );
    println!("  daemon, deletes:          {delete_rate:>8.1} events/s");
}
