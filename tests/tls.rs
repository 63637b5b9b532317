//! TLS against real endpoints on this machine, with a CA and certificates each test makes
//! with openssl: `amqps://` against a TLS listener the test starts on the local RabbitMQ at
//! run time (`rabbitmqctl eval`, stopped again on drop; the plain 5672 listener is never
//! touched), and HTTPS against the python-indexer served by uvicorn with `--ssl-certfile`.
//! A certificate from another CA is a fatal error at start (exit 3), never retried.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdc_indexer::config::BrokerConfig;
use cdc_indexer::error::ErrorKind;
use common::*;

const PRODUCTS: &str =
    "[[tables]]\ntable = \"public.products\"\nid_columns = [\"id\"]\ntext = \"{name}\"\n";

/// A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second
/// CA that signed neither.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    for (key, cert, cn) in [
        ("ca.key", "ca.pem", "cdc test CA"),
        ("other.key", "other.pem", "other CA"),
    ] {
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
    }
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, cn) in [("server", "localhost"), ("client", "cdc-indexer")] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    // The broker (an Erlang node running as the rabbitmq user) reads the server files.
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(d).status();
    Pki {
        ca: d.join("ca.pem"),
        server_cert: d.join("server.pem"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.pem"),
        client_key: d.join("client.key"),
        other_ca: d.join("other.pem"),
        _dir: dir,
    }
}

/// An AMQP-over-TLS listener of the local RabbitMQ on a port of its own, started at run time
/// and stopped on drop.
struct TlsListener {
    port: u16,
}

fn rabbitmqctl_eval(expr: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "eval", expr])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "rabbitmqctl eval {expr}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

impl TlsListener {
    fn start(pki: &Pki, require_client_cert: bool) -> TlsListener {
        let port = free_port();
        // With a client certificate required, TLS 1.2 only: there the broker refuses a
        // missing certificate inside the handshake, with an alert. Under TLS 1.3 it refuses
        // after the client's side of the handshake is done, and the alert can lose the race
        // with the connection reset (then the error is a transient reset; see README, TLS).
        let verify = if require_client_cert {
            "{verify, verify_peer}, {fail_if_no_peer_cert, true}, {versions, ['tlsv1.2']}"
        } else {
            "{verify, verify_none}, {fail_if_no_peer_cert, false}"
        };
        let answer = rabbitmqctl_eval(&format!(
            "_ = rabbit_networking:ensure_ssl(), rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, \
             [{{cacertfile, \"{}\"}}, {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {verify}], 1).",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ));
        assert_eq!(answer, "ok", "TLS listener on {port}");
        TlsListener { port }
    }

    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                &format!(
                    "rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).",
                    self.port
                ),
            ])
            .output();
    }
}

fn broker(url: &str, ca: Option<&Path>, client: Option<(&Path, &Path)>) -> BrokerConfig {
    BrokerConfig {
        url: url.to_string(),
        password_env: "CDC_TEST_NO_PASSWORD_ENV".into(),
        tls_ca_file: ca.map(Path::to_path_buf),
        tls_client_cert_file: client.map(|(c, _)| c.to_path_buf()),
        tls_client_key_file: client.map(|(_, k)| k.to_path_buf()),
        ..BrokerConfig::default()
    }
}

/// Starts `cdc-indexer run` for `w` with extra environment (config overrides).
fn start_with_env(w: &World, env: &[(&str, String)]) -> Daemon {
    let log = std::fs::File::create(w.dir.path().join(format!("daemon-{}.log", rand_suffix())))
        .expect("log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cdc-indexer"));
    command
        .args(["--config", path_str(&w.config_path), "run"])
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

fn clear_logs(d: &Daemon) {
    for e in std::fs::read_dir(&d.dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("daemon-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The daemon's whole stderr.
fn full_log(d: &Daemon) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(&d.dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().starts_with("daemon-") {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

#[tokio::test]
async fn amqps_with_the_custom_ca_connects_and_a_client_certificate_is_presented() {
    let pki = pki();
    let open = TlsListener::start(&pki, false);
    let connection =
        cdc_indexer::broker::connect(&broker(&open.url(), Some(&pki.ca), None), "tls-test")
            .await
            .expect("amqps with our CA");
    assert!(connection.status().connected());
    let _ = connection.close(200, "ok".into()).await;

    let strict = TlsListener::start(&pki, true);
    let with_cert = broker(
        &strict.url(),
        Some(&pki.ca),
        Some((&pki.client_cert, &pki.client_key)),
    );
    let connection = cdc_indexer::broker::connect(&with_cert, "tls-test")
        .await
        .expect("amqps with a client certificate");
    let _ = connection.close(200, "ok".into()).await;

    // The broker refuses a missing certificate with an alert, and then closes the socket;
    // the client's last handshake records can reach the closed socket first, and a reset
    // then discards the alert (nothing says "certificate" any more: transient, like any
    // reset). So: every attempt fails, and the alert, whenever it is read, is fatal.
    let without_cert = broker(&strict.url(), Some(&pki.ca), None);
    let mut resets = 0;
    loop {
        let err = cdc_indexer::broker::connect(&without_cert, "tls-test")
            .await
            .expect_err("the broker asks for a client certificate");
        if err.kind == ErrorKind::Fatal {
            assert!(err.message.contains("TLS"), "{err}");
            break;
        }
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
        resets += 1;
        assert!(resets < 10, "the refusal was never read as an alert: {err}");
    }
}

#[tokio::test]
async fn amqps_with_a_wrong_ca_is_fatal_at_start_with_one_clear_line() {
    let pki = pki();
    let listener = TlsListener::start(&pki, false);
    let err = cdc_indexer::broker::connect(
        &broker(&listener.url(), Some(&pki.other_ca), None),
        "tls-test",
    )
    .await
    .expect_err("a certificate of another CA");
    assert_eq!(err.kind, ErrorKind::Fatal, "{err}");

    // The daemon: exit 3 at start, no retry, one line naming the setting to fix.
    let w = World::new("tls-wrong-ca", PRODUCTS, "");
    let mut d = start_with_env(
        &w,
        &[
            ("CDC_INDEXER__BROKER__URL", listener.url()),
            (
                "CDC_INDEXER__BROKER__TLS_CA_FILE",
                pki.other_ca.display().to_string(),
            ),
        ],
    );
    let status = d.wait_exit(Duration::from_secs(60));
    let log = full_log(&d);
    assert_eq!(status.code(), Some(3), "{log}");
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    assert_eq!(problems.len(), 1, "one line that says what to fix: {log}");
    assert!(
        problems[0].contains("TLS") && problems[0].contains("broker.tls_ca_file"),
        "{log}"
    );
    assert!(!log.contains("reconnecting"), "not retried: {log}");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_consumes_over_amqps() {
    let pki = pki();
    let listener = TlsListener::start(&pki, false);
    let w = World::new("tls-consume", PRODUCTS, "");
    let mut d = start_with_env(
        &w,
        &[
            ("CDC_INDEXER__BROKER__URL", listener.url()),
            (
                "CDC_INDEXER__BROKER__TLS_CA_FILE",
                pki.ca.display().to_string(),
            ),
        ],
    );
    d.wait_ready(Duration::from_secs(90));
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let body = serde_json::json!({"op": "c", "after": {"id": 1, "name": "a tent"},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": 10}})
    .to_string();
    w.publish(&ch, "dbserver1.public.products", body.as_bytes())
        .await;
    d.wait_processed(1.0, Duration::from_secs(60));
    assert!(d.sigterm().success());
    assert_eq!(w.index().await.count(None).await, 1);
    common::reconcile::assert_index_matches(
        &w,
        &[common::reconcile::Expected::new(
            "public.products",
            "id int PRIMARY KEY, name text",
            [serde_json::json!({"id": 1, "name": "a tent"})],
        )],
    );
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}

/// The python-indexer over HTTPS (uvicorn `--ssl-*`), optionally with an API key.
struct HttpsIndexer {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl HttpsIndexer {
    async fn start(dir: &Path, pki: &Pki, api_key: Option<&str>) -> HttpsIndexer {
        Self::start_with(dir, pki, api_key, false).await
    }

    /// `require_client_cert`: uvicorn asks every client for a certificate of our CA.
    async fn start_with(
        dir: &Path,
        pki: &Pki,
        api_key: Option<&str>,
        require_client_cert: bool,
    ) -> HttpsIndexer {
        let port = free_port();
        let log = dir.join(format!("python-indexer-{port}.log"));
        let mut command = Command::new(format!("{REPO}/python-indexer/run.sh"));
        command
            .args([
                "--ssl-certfile",
                path_str(&pki.server_cert),
                "--ssl-keyfile",
                path_str(&pki.server_key),
            ])
            .env("PYTHON_INDEXER_PORT", port.to_string())
            .env("PYTHON_INDEXER_QDRANT_PATH", dir.join("python-qdrant"))
            .env("PYTHON_INDEXER_COLLECTION", "tls")
            .env("CDC_INDEXER_MODELS", format!("{REPO}/.models"))
            .env_remove("QDRANT_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        match api_key {
            Some(key) => command.env("PYTHON_INDEXER_API_KEY", key),
            None => command.env_remove("PYTHON_INDEXER_API_KEY"),
        };
        if require_client_cert {
            // ssl.CERT_REQUIRED
            command.args(["--ssl-cert-reqs", "2", "--ssl-ca-certs", path_str(&pki.ca)]);
        }
        let mut me = HttpsIndexer {
            child: command.spawn().expect("python-indexer"),
            url: format!("https://127.0.0.1:{port}"),
            log,
        };
        let files = cdc_indexer::config::TlsFiles {
            ca_file: Some(pki.ca.clone()),
            client_cert_file: require_client_cert.then(|| pki.client_cert.clone()),
            client_key_file: require_client_cert.then(|| pki.client_key.clone()),
        };
        let client = cdc_indexer::tls::http(reqwest::Client::builder(), "test", &files)
            .expect("tls")
            .build()
            .expect("client");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "python-indexer exited {status}: {}",
                    std::fs::read_to_string(&me.log).unwrap_or_default()
                );
            }
            if let Ok(r) = client.get(format!("{}/healthz", me.url)).send().await
                && r.status().is_success()
            {
                return me;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let _ = me.child.kill();
        panic!(
            "python-indexer over https not healthy: {}",
            std::fs::read_to_string(&me.log).unwrap_or_default()
        );
    }
}

impl Drop for HttpsIndexer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_embedder_and_llamaindex_sink_trust_the_custom_ca_and_refuse_another() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tmp");
    let service = HttpsIndexer::start(dir.path(), &pki, None).await;

    // The HTTP embedder with our CA embeds; with another CA the error is fatal, not retried.
    let mut config = cdc_indexer::config::EmbeddingConfig {
        provider: cdc_indexer::config::EmbeddingProvider::Http,
        url: format!("{}/v1", service.url),
        tls_ca_file: Some(pki.ca.clone()),
        ..Default::default()
    };
    let embedder = cdc_indexer::embed::http::HttpEmbedder::new(&config).expect("embedder");
    use cdc_indexer::embed::Embedder;
    let vectors = embedder
        .embed(&["a tent".to_string()])
        .await
        .expect("https embed");
    assert_eq!(vectors[0].len(), 384);
    config.tls_ca_file = Some(pki.other_ca.clone());
    let embedder = cdc_indexer::embed::http::HttpEmbedder::new(&config).expect("embedder");
    let err = embedder
        .embed(&["a tent".to_string()])
        .await
        .expect_err("another CA");
    assert_eq!(err.kind, ErrorKind::Fatal, "{err}");
    assert!(err.message.contains("TLS"), "{err}");

    // The daemon with the https embedder and another CA stops at the first event: exit 3.
    let w = World::new("tls-embedder", PRODUCTS, "");
    w.declare().await;
    let mut d = start_with_env(
        &w,
        &[
            ("CDC_INDEXER__EMBEDDING__PROVIDER", "http".into()),
            ("CDC_INDEXER__EMBEDDING__URL", format!("{}/v1", service.url)),
            (
                "CDC_INDEXER__EMBEDDING__TLS_CA_FILE",
                pki.other_ca.display().to_string(),
            ),
        ],
    );
    d.wait_ready(Duration::from_secs(60));
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let body = serde_json::json!({"op": "c", "after": {"id": 1, "name": "a tent"},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": 10}})
    .to_string();
    w.publish(&ch, "dbserver1.public.products", body.as_bytes())
        .await;
    let status = d.wait_exit(Duration::from_secs(60));
    let log = full_log(&d);
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("TLS"), "{log}");
    assert_eq!(
        w.queue_depth(&w.queue).await,
        1,
        "the event stays for after the fix"
    );
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;

    // The llamaindex sink: our CA → ready; another CA → exit 3 at start.
    let w = World::new("tls-sink", PRODUCTS, "");
    let sink_env = |ca: &Path| {
        vec![
            ("CDC_INDEXER__SINK__KIND", "llamaindex".to_string()),
            ("CDC_INDEXER__SINK__URL", service.url.clone()),
            ("CDC_INDEXER__SINK__TLS_CA_FILE", ca.display().to_string()),
        ]
    };
    let mut d = start_with_env(&w, &sink_env(&pki.ca));
    d.wait_ready(Duration::from_secs(60));
    assert!(d.sigterm().success());
    clear_logs(&d);
    let mut d = start_with_env(&w, &sink_env(&pki.other_ca));
    let status = d.wait_exit(Duration::from_secs(60));
    let log = full_log(&d);
    assert_eq!(status.code(), Some(3), "{log}");
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    assert_eq!(problems.len(), 1, "{log}");
    assert!(
        problems[0].contains("TLS") && problems[0].contains("sink.tls_ca_file"),
        "{log}"
    );
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_python_indexer_api_key_is_fatal_at_start() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tmp");
    let service = HttpsIndexer::start(dir.path(), &pki, Some("the-right-key")).await;
    let w = World::new("api-key", PRODUCTS, "");
    let key_file = w.dir.path().join("sink-key");
    let env = |key: Option<&str>| {
        let mut env = vec![
            ("CDC_INDEXER__SINK__KIND", "llamaindex".to_string()),
            ("CDC_INDEXER__SINK__URL", service.url.clone()),
            (
                "CDC_INDEXER__SINK__TLS_CA_FILE",
                pki.ca.display().to_string(),
            ),
        ];
        if let Some(key) = key {
            std::fs::write(&key_file, format!("{key}\n")).expect("key file");
            env.push((
                "CDC_INDEXER__SINK__API_KEY_FILE",
                key_file.display().to_string(),
            ));
        }
        env
    };
    for (key, what) in [(Some("a-wrong-key"), "a wrong key"), (None, "no key")] {
        let mut d = start_with_env(&w, &env(key));
        let status = d.wait_exit(Duration::from_secs(60));
        let log = full_log(&d);
        assert_eq!(status.code(), Some(3), "{what}: {log}");
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert_eq!(problems.len(), 1, "{what}: one line: {log}");
        assert!(
            problems[0].contains("API key") && problems[0].contains("sink.api_key"),
            "{log}"
        );
        assert!(
            !log.contains("a-wrong-key"),
            "the key is never logged: {log}"
        );
        clear_logs(&d);
    }
    let mut d = start_with_env(&w, &env(Some("the-right-key")));
    d.wait_ready(Duration::from_secs(60));
    assert!(d.sigterm().success());
    w.cleanup().await;
}

/// A service that asks for a client certificate (mutual TLS): the HTTP embedder and the
/// llamaindex sink present `tls_client_cert_file` + `tls_client_key_file`. Without them the
/// service refuses us; never as the input's fault (under TLS 1.3 the refusal may arrive as a
/// bare reset, retried like one: see README, TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_embedder_and_llamaindex_sink_present_a_client_certificate() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tmp");
    let service = HttpsIndexer::start_with(dir.path(), &pki, None, true).await;
    let mut config = cdc_indexer::config::EmbeddingConfig {
        provider: cdc_indexer::config::EmbeddingProvider::Http,
        url: format!("{}/v1", service.url),
        tls_ca_file: Some(pki.ca.clone()),
        tls_client_cert_file: Some(pki.client_cert.clone()),
        tls_client_key_file: Some(pki.client_key.clone()),
        ..Default::default()
    };
    use cdc_indexer::embed::Embedder;
    let embedder = cdc_indexer::embed::http::HttpEmbedder::new(&config).expect("embedder");
    let vectors = embedder
        .embed(&["a tent".to_string()])
        .await
        .expect("https embed with a client certificate");
    assert_eq!(vectors[0].len(), 384);
    config.tls_client_cert_file = None;
    config.tls_client_key_file = None;
    let embedder = cdc_indexer::embed::http::HttpEmbedder::new(&config).expect("embedder");
    let err = embedder
        .embed(&["a tent".to_string()])
        .await
        .expect_err("no client certificate");
    assert_ne!(err.kind, ErrorKind::Poison, "{err}");

    // The daemon's llamaindex sink: with the certificate it is ready, and indexes.
    let w = World::new("tls-client-cert", PRODUCTS, "");
    let env = vec![
        ("CDC_INDEXER__SINK__KIND", "llamaindex".to_string()),
        ("CDC_INDEXER__SINK__URL", service.url.clone()),
        (
            "CDC_INDEXER__SINK__TLS_CA_FILE",
            pki.ca.display().to_string(),
        ),
        (
            "CDC_INDEXER__SINK__TLS_CLIENT_CERT_FILE",
            pki.client_cert.display().to_string(),
        ),
        (
            "CDC_INDEXER__SINK__TLS_CLIENT_KEY_FILE",
            pki.client_key.display().to_string(),
        ),
    ];
    let mut d = start_with_env(&w, &env);
    d.wait_ready(Duration::from_secs(60));
    let conn = connect().await;
    let ch = confirm_channel(&conn).await;
    let body = serde_json::json!({"op": "c", "after": {"id": 1, "name": "a tent"},
        "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": 10}})
    .to_string();
    w.publish(&ch, "dbserver1.public.products", body.as_bytes())
        .await;
    d.wait_processed(1.0, Duration::from_secs(60));
    assert!(d.sigterm().success());
    assert!(w.drain_dlq().await.is_empty());
    let _ = conn.close(200, "ok".into()).await;
    w.cleanup().await;
}
