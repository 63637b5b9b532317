//! What an operator must be able to trust (issue 13): secrets never reach any output,
//! `check-config` refuses what `run` would refuse, a clean start and stop log no ERROR or
//! WARN line, a fatal error is one line that says what to fix, and `/search` is off unless
//! asked for.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PRODUCTS: &str =
    "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n";

fn event(id: u64) -> Vec<u8> {
    serde_json::json!({"op": "c", "before": null, "after": {"id": id, "name": format!("a tent for {id} people")},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": 100 + id, "ts_ms": chrono::Utc::now().timestamp_millis()}})
    .to_string()
    .into_bytes()
}

/// `cdc-indexer --config FILE ARGS...` with extra environment, stdin closed.
fn cli(config: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CDC_INDEXER_LOG")
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run cdc-indexer")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts the daemon with the default log filter (what an operator sees) and `env`.
fn start(w: &World, env: &[(&str, String)]) -> Daemon {
    let log = std::fs::File::create(w.dir.path().join(format!("daemon-{}.log", rand_suffix())))
        .expect("log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"));
    command
        .args(["--config", path_str(&w.config_path), "run"])
        .env_remove("CDC_INDEXER_LOG")
        // A crash journal of its own: tests run in parallel from the same directory.
        .env(
            "CDC_INDEXER__PIPELINE__STATE_DIR",
            w.dir.path().join("state"),
        )
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    Daemon {
        child: command.spawn().expect("spawn daemon"),
        http: w.http.clone(),
        dir: w.dir.path().to_path_buf(),
    }
}

fn full_log(d: &Daemon) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(&d.dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("daemon-") {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

fn clear_logs(w: &World) {
    for e in std::fs::read_dir(w.dir.path()).expect("dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("daemon-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Lines an operator alerting on log levels would be paged for, including ONNX Runtime's
/// own `[E:onnxruntime...]` / `[W:...]` lines.
fn alarms(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains(" ERROR ")
                || l.contains(" WARN ")
                || l.contains("\"level\":\"ERROR\"")
                || l.contains("\"level\":\"WARN\"")
                || l.contains("[E:")
                || l.contains("[W:")
        })
        .collect()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every way the password could show: as is, its distinctive core, percent-encoded.
fn assert_no_secret(output: &str, password: &str, core: &str, what: &str) {
    for form in [
        password.to_string(),
        core.to_string(),
        percent_encode(password),
    ] {
        assert!(
            !output.contains(&form),
            "{what}: the password ({form}) is in the output:\n{output}"
        );
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_with_reserved_characters_never_reaches_any_output() {
    let core = format!("Zq{}", rand_suffix());
    let password = format!("p/{core}?x#y@z");
    let w = World::new("secret", PRODUCTS, "");
    let config = std::fs::read_to_string(&w.config_path).expect("config");

    // 1. Unencoded in broker.url: a config error (exit 2), in every command, without a trace
    //    of the password.
    let raw_url = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
    let bad = w.dir.path().join("unencoded.toml");
    std::fs::write(&bad, config.replace(AMQP, &raw_url)).expect("write");
    for args in [
        vec!["check-config"],
        vec!["run"],
        vec!["dlq", "stats"],
        vec!["topology", "declare"],
    ] {
        let out = cli(&bad, &args, &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {all}");
        assert!(all.contains("broker.url"), "{args:?} names the key: {all}");
        assert_no_secret(&all, &password, &core, &format!("{args:?}"));
    }

    // 2. A TOML syntax error on the line holding the password: position, no line.
    let broken = w.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        config.replace(
            &format!("url = \"{AMQP}\""),
            &format!("url = \"amqp://guest:{password}@h/%2f\" x"),
        ),
    )
    .expect("write");
    let out = cli(&broken, &["check-config"], &[]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(all.contains("line 3"), "{all}");
    assert_no_secret(&all, &password, &core, "syntax error");

    // 3. Percent-encoded but the broker is down: every reconnect warning redacts it.
    let closed = free_port();
    let down_world = World::new("secret-down", PRODUCTS, "");
    let down_config = std::fs::read_to_string(&down_world.config_path).expect("config");
    std::fs::write(
        &down_world.config_path,
        down_config.replace(
            AMQP,
            &format!(
                "amqp://guest:{}@127.0.0.1:{closed}/%2f",
                percent_encode(&password)
            ),
        ),
    )
    .expect("write");
    let out = cli(&down_world.config_path, &["check-config"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_no_secret(&text(&out), &password, &core, "check-config ok line");
    let mut d = start(
        &down_world,
        &[("CDC_INDEXER__PIPELINE__RETRY_MAX_MS", "500".into())],
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) && !full_log(&d).contains("reconnecting") {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let _ = d.sigterm();
    let log = full_log(&d);
    assert!(log.contains("reconnecting"), "{log}");
    assert_no_secret(&log, &password, &core, "reconnect warnings");

    // 4. The right password from a file, for a user that has it: it connects (the password
    //    reaches the broker whole), and is never printed.
    let user = format!("cdc-secret-{}", rand_suffix());
    rabbitmqctl(&["add_user", &user, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let good_world = World::new("secret-good", PRODUCTS, "");
    let password_file = good_world.dir.path().join("amqp-password");
    std::fs::write(&password_file, format!("{password}\n")).expect("write");
    let good_config = std::fs::read_to_string(&good_world.config_path).expect("config");
    std::fs::write(
        &good_world.config_path,
        good_config.replace(
            &format!("url = \"{AMQP}\""),
            &format!(
                "url = \"amqp://{user}@127.0.0.1:5672/%2f\"\npassword_file = \"{}\"",
                password_file.display()
            ),
        ),
    )
    .expect("write");
    let mut d = start(&good_world, &[]);
    d.wait_ready(Duration::from_secs(90));
    assert!(d.sigterm().success());
    let log = full_log(&d);
    assert_no_secret(&log, &password, &core, "a good start");
    assert!(alarms(&log).is_empty(), "{log}");

    // 5. A wrong password: exit 3 with one line that says what to fix, no password.
    std::fs::write(&password_file, format!("{password}-wrong\n")).expect("write");
    clear_logs(&good_world);
    let mut d = start(&good_world, &[]);
    let status = d.wait_exit(Duration::from_secs(60));
    let log = full_log(&d);
    assert_eq!(status.code(), Some(3), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let problems = alarms(&log);
    assert_eq!(problems.len(), 1, "one line: {log}");
    assert!(
        problems[0].contains("refused our credentials") && problems[0].contains("broker.password"),
        "{log}"
    );
    // The start-up lines (side port, search port, embedder, index) and the fatal one.
    assert!(lines.len() <= 5, "the fatal line is not buried: {log}");
    assert_no_secret(&log, &password, &core, "wrong password");

    rabbitmqctl(&["delete_user", &user]);
    for w in [&w, &down_world, &good_world] {
        w.cleanup().await;
    }
}

#[test]
fn check_config_refuses_what_run_would_refuse_and_run_refuses_it_the_same_way() {
    let w = World::new("check", PRODUCTS, "");
    let config = std::fs::read_to_string(&w.config_path).expect("config");
    let file_in_the_way = w.dir.path().join("a-file");
    std::fs::write(&file_in_the_way, "x").expect("write");
    let listen_line = format!("listen = \"{}\"", w.http);
    let index_line = format!("path = \"{}\"", w.dir.path().join("index").display());
    let model_line = format!("model_dir = \"{REPO}/.models/all-minilm-l6-v2\"");
    let ort_line = format!("onnxruntime_lib = \"{REPO}/.models/onnxruntime/libonnxruntime.so\"");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing model directory",
            config.replace(&model_line, "model_dir = \"/nonexistent/model\""),
            "embedding.model_dir: /nonexistent/model is not a directory",
        ),
        (
            "missing ONNX Runtime",
            config.replace(
                &ort_line,
                "onnxruntime_lib = \"/nonexistent/libonnxruntime.so\"",
            ),
            "embedding.onnxruntime_lib: /nonexistent/libonnxruntime.so not found",
        ),
        (
            "not ONNX Runtime",
            config.replace(
                &ort_line,
                &format!("onnxruntime_lib = \"{}\"", file_in_the_way.display()),
            ),
            "does not load as ONNX Runtime",
        ),
        (
            "dimensions of another model",
            config.replace("[embedding]\n", "[embedding]\ndimensions = 768\n"),
            "embedding.dimensions: 768 but the model",
        ),
        (
            "http.listen not an address",
            config.replace(&listen_line, "listen = \"not-an-address\""),
            "http.listen: `not-an-address` is not a socket address",
        ),
        (
            "sink URL scheme",
            config.replace(
                "[sink]\n",
                "[sink]\nkind = \"llamaindex\"\nurl = \"ftp://127.0.0.1:8090\"\n",
            ),
            "sink.url: `ftp://127.0.0.1:8090/` has scheme `ftp`",
        ),
        (
            "password file missing",
            config.replace(
                "prefetch = 200",
                "prefetch = 200\npassword_file = \"/nonexistent/pw\"",
            ),
            "broker.password_file: cannot read /nonexistent/pw",
        ),
        (
            "reconcile password file missing",
            format!("{config}\n[reconcile]\npassword_file = \"/nonexistent/source-pw\"\n"),
            "reconcile.password_file: cannot read /nonexistent/source-pw",
        ),
        (
            "reconcile source URL that does not parse",
            format!(
                "{config}\n[reconcile]\nsource_url = \"postgres://u:p/ss@127.0.0.1:5432/db\"\n"
            ),
            "reconcile.source_url: not a valid URL",
        ),
        (
            "index path under a file",
            config.replace(
                &index_line,
                &format!("path = \"{}/index\"", file_in_the_way.display()),
            ),
            "sink.path: ",
        ),
        (
            "no tables",
            config.replace(PRODUCTS, ""),
            "tables: no [[tables]] rule",
        ),
    ];
    for (what, text_of_config, expected) in cases {
        let path = w.dir.path().join("case.toml");
        std::fs::write(&path, &text_of_config).expect("write");
        assert_ne!(text_of_config, config, "{what}: the case changed nothing");
        let checked = cli(&path, &["check-config"], &[]);
        let check_text = String::from_utf8_lossy(&checked.stderr).to_string();
        assert_eq!(checked.status.code(), Some(2), "{what}: {}", text(&checked));
        assert!(
            check_text.contains(&format!("{}: ", path.display())) && check_text.contains(expected),
            "{what}: expected `{expected}` naming the file: {check_text}"
        );
        let started = Instant::now();
        let ran = cli(&path, &["run"], &[]);
        assert_eq!(ran.status.code(), Some(2), "{what}: run: {}", text(&ran));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: refused at start"
        );
        assert_eq!(
            String::from_utf8_lossy(&ran.stderr),
            check_text,
            "{what}: run refuses with the same words"
        );
    }
    let ok = cli(&w.config_path, &["check-config"], &[]);
    assert!(ok.status.success(), "{}", text(&ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_and_stop_log_no_error_and_no_warning() {
    // A first start: nothing declared yet (the queue-depth poller must not race the declare).
    let w = World::new("quiet", PRODUCTS, "");
    let mut d = start(&w, &[]);
    d.wait_ready(Duration::from_secs(90));
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    for id in 1..=20 {
        w.publish(&ch, "dbserver1.public.products", &event(id))
            .await;
    }
    d.wait_processed(20.0, Duration::from_secs(60));
    // Let the queue-depth poller run a few times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(d.sigterm().success());
    let log = full_log(&d);
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(
        alarms(&log).is_empty(),
        "a clean start and stop pages no one:\n{log}"
    );

    // A stop with a short deadline while the model is busy: the batch is handed back and
    // ONNX Runtime is idle before exit (no `[E:onnxruntime...]` line after "stopped cleanly").
    clear_logs(&w);
    let mut d = start(
        &w,
        &[("CDC_INDEXER__PIPELINE__SHUTDOWN_DEADLINE_MS", "20".into())],
    );
    d.wait_ready(Duration::from_secs(90));
    for id in 100..400 {
        w.publish(&ch, "dbserver1.public.products", &event(id))
            .await;
    }
    let started = Instant::now();
    while d.metric_sum("cdc_indexer_events_received_total") < 1.0
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(d.sigterm().success());
    let log = full_log(&d);
    let after_stop: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("stopped cleanly"))
        .skip(1)
        .collect();
    assert!(after_stop.is_empty(), "nothing after the last line:\n{log}");
    assert!(
        alarms(&log)
            .iter()
            .all(|l| !l.contains(" ERROR ") && !l.contains("[E:")),
        "{log}"
    );
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_is_off_by_default_and_on_its_own_port_behind_a_token_when_asked_for() {
    let w = World::new("search-port", PRODUCTS, "");
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    w.publish(&ch, "dbserver1.public.products", &event(4)).await;

    // Default: the side port has probes and metrics, no /search.
    let mut d = start(&w, &[]);
    d.wait_ready(Duration::from_secs(90));
    d.wait_processed(1.0, Duration::from_secs(60));
    assert_eq!(d.get("/healthz").map(|(s, _)| s), Some(200));
    assert_eq!(d.get("/metrics").map(|(s, _)| s), Some(200));
    assert_eq!(
        d.get("/search?q=tent").map(|(s, _)| s),
        Some(404),
        "no rows on the side port"
    );
    assert!(d.sigterm().success());

    // Asked for: its own port, a bearer token.
    let search = format!("127.0.0.1:{}", free_port());
    let token = format!("tok-{}", rand_suffix());
    let env = vec![
        ("CDC_INDEXER__HTTP__SEARCH_LISTEN", search.clone()),
        ("CDC_INDEXER_SEARCH_TOKEN", token.clone()),
    ];
    let mut d = start(&w, &env);
    d.wait_ready(Duration::from_secs(90));
    assert_eq!(d.get("/search?q=tent").map(|(s, _)| s), Some(404));
    assert_eq!(
        http_get(&search, "/search?q=tent").map(|(s, _)| s),
        Some(401)
    );
    let client = reqwest::Client::new();
    // reconcile's views of the index return row payloads too: the same token.
    for path in ["/index/states", "/index/scan"] {
        let refused = client
            .post(format!("http://{search}{path}"))
            .json(&serde_json::json!({"keys": [], "table": "public.products"}))
            .send()
            .await
            .expect(path);
        assert_eq!(refused.status().as_u16(), 401, "{path} without the token");
        assert_eq!(
            d.get(path).map(|(s, _)| s),
            Some(404),
            "{path} is not on the side port"
        );
    }
    let answer: serde_json::Value = client
        .get(format!("http://{search}/search"))
        .query(&[("q", "a tent")])
        .bearer_auth(&token)
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["results"][0]["key"], r#"{"id":4}"#, "{answer}");
    // The CLI asks the daemon (the embedded index is the daemon's), with the token.
    let out = cli(&w.config_path, &["search", "a tent", "--json"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits[0]["key"], r#"{"id":4}"#);
    let out = cli(&w.config_path, &["search", "a tent"], &env[..1]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "without the token: {}",
        text(&out)
    );
    assert!(d.sigterm().success());

    // No daemon: the CLI opens the index itself.
    let out = cli(&w.config_path, &["search", "a tent", "--json"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(hits[0]["key"], r#"{"id":4}"#);
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// `x-cdc-repair` sets the stale guard aside (`reset-position`, `rewrite`): only
/// `reconcile --repair` may use it, and it publishes to our queue itself (the default
/// exchange). The same header on an event that came through the CDC exchange — anyone who
/// may publish there, or a misconfigured producer — is refused: dead-lettered with the
/// reason, the index untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_header_through_the_cdc_exchange_is_refused() {
    use lapin::options::BasicPublishOptions;
    let w = World::new("repair-header", PRODUCTS, "");
    w.declare().await;
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    // The row at a newer position first, then an older one that claims a position reset.
    w.publish(&ch, "dbserver1.public.products", &event(1)).await;
    let mut old = serde_json::from_slice::<serde_json::Value>(&event(1)).expect("json");
    old["after"]["name"] = "an old name that must not win".into();
    old["source"]["lsn"] = 5.into();
    ch.basic_publish(
        w.exchange.as_str().into(),
        "dbserver1.public.products".into(),
        BasicPublishOptions::default(),
        old.to_string().as_bytes(),
        lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers(&[("x-cdc-repair", "reset-position")])),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let mut d = w.start();
    d.wait_ready(Duration::from_secs(60));
    d.wait_processed(2.0, Duration::from_secs(60));
    assert!(d.sigterm().success());
    let dlq = w.drain_dlq().await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].1["x-cdc-error-kind"], "decode");
    assert!(dlq[0].1["x-cdc-error"].contains("x-cdc-repair"), "{dlq:?}");
    let doc = w.index().await.doc("public.products", "{\"id\":1}").await;
    assert_eq!(doc[0].payload["name"], "a tent for 1 people");
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}
