//! RabbitMQ, in and out.
//!
//! How we use AMQP 0-9-1 (lapin):
//!
//! - **In.** One channel consumes the main queue with `basic.qos(prefetch)` and manual acks.
//!   The broker pushes up to `prefetch` unacknowledged deliveries; each carries a *delivery
//!   tag*, increasing per channel. `basic.ack(tag, multiple=true)` acknowledges every
//!   delivery up to `tag` at once: that is how a batch is acked, after its write is durable.
//!   Deliveries never acked are redelivered when the channel closes (crash, restart,
//!   connection loss), flagged `redelivered`.
//! - **Out.** Dead letters are published on a second channel in *confirm mode*: the broker
//!   answers each publish with ack/nack once it has taken responsibility for the message.
//!   We ack the original delivery only after that confirm, so a crash in between duplicates a
//!   DLQ entry at worst, never loses one.
//! - **Topology** (exchanges, queues, bindings) is declared idempotently at every start; see
//!   [`topology`].

pub mod dead_letter;
pub mod topology;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Connect, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, read_secret, redact_url};
use crate::error::{ErrorKind, StageError, tls_rejection};

/// The broker URI with the password from `password_file`/`password_env` if set. The password
/// is put into the parsed URI as it is (no encoding to get wrong), and never printed.
pub fn amqp_uri(config: &BrokerConfig) -> Result<AMQPUri, StageError> {
    let mut uri: AMQPUri = config.url.parse().map_err(|_| {
        StageError::fatal(format!(
            "broker.url: `{}` is not a valid AMQP URI",
            redact_url(&config.url)
        ))
    })?;
    let password = read_secret(config.password_file.as_deref(), &config.password_env)
        .map_err(StageError::fatal)?;
    if let Some(password) = password {
        uri.authority.userinfo.password = password;
    }
    Ok(uri)
}

/// Opens a connection (over TLS for `amqps://`, with `broker.tls_*`). Refused credentials, a
/// refused virtual host and a rejected certificate are fatal; anything else is transient.
pub async fn connect(config: &BrokerConfig, purpose: &str) -> Result<Connection, StageError> {
    let uri = amqp_uri(config)?;
    let tls = crate::tls::amqp(&config.tls())?;
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(
        format!("{} ({purpose})", config.connection_name),
    ));
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| StageError::fatal(format!("no async runtime for lapin: {e}")))?;
    uri.connect_with_config(properties, tls, runtime)
        .await
        .map_err(|e| classify_connect(&e, &config.url))
}

/// Where in our use of AMQP an error happened: the same reply code means different things
/// (406 while declaring is a topology conflict; 406 on an ack is a lost delivery tag after a
/// channel closed, which a new session heals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening the connection (TCP, TLS, SASL, `connection.open` of the vhost).
    Connect,
    /// Declaring exchanges, queues, bindings.
    Declare,
    /// Anything once connected: qos, consume, publish, ack.
    Session,
}

/// The AMQP reply code the broker closed the channel or connection with, if any.
pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// **The one mapping from lapin's errors to what the daemon does.** By reply code (AMQP
/// 0-9-1 §1.4, RabbitMQ's use of them) and lapin's error kind, never by message text:
///
/// | code / kind | meaning | kind |
/// |---|---|---|
/// | 403 ACCESS_REFUSED | bad credentials, or no permission on an object | fatal |
/// | 530 NOT_ALLOWED | the user may not open this vhost (or it does not exist) | fatal |
/// | 402 INVALID_PATH | malformed vhost | fatal |
/// | 406 PRECONDITION_FAILED | declaring: object exists with other arguments | fatal |
/// | 406 PRECONDITION_FAILED | in a session: unknown delivery tag after a channel loss | transient |
/// | 404 NOT_FOUND | queue or exchange missing: a new session re-declares them | transient |
/// | 320 CONNECTION_FORCED | broker shutting down, an operator closed us | transient |
/// | 405 RESOURCE_LOCKED, 311, 312, 313, 5xx | | transient |
/// | 540 NOT_IMPLEMENTED | the broker lacks something we need | fatal |
/// | I/O error carrying a rejected certificate | TLS trust misconfigured | fatal |
/// | other I/O, heartbeat, channel/connection state | the network or the broker went away | transient |
/// | SASL/auth provider, protocol version | | fatal |
pub fn classify(e: &lapin::Error, phase: Phase) -> ErrorKind {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::ProtocolError(amqp) => match (amqp.get_id(), phase) {
            (403 | 530 | 402 | 540, _) => ErrorKind::Fatal,
            (406, Phase::Declare) => ErrorKind::Fatal,
            _ => ErrorKind::Transient,
        },
        K::IOError(io) if tls_rejection(io.as_ref()).is_some() => ErrorKind::Fatal,
        K::AuthProviderError(_) | K::InvalidProtocolVersion(_) | K::NoDefaultRuntime => {
            ErrorKind::Fatal
        }
        _ => ErrorKind::Transient,
    }
}

fn stage_error(kind: ErrorKind, message: String) -> StageError {
    match kind {
        ErrorKind::Fatal => StageError::fatal(message),
        ErrorKind::Poison => StageError::poison(message),
        ErrorKind::Transient => StageError::transient(message),
    }
}

fn classify_connect(e: &lapin::Error, url: &str) -> StageError {
    let shown = redact_url(url);
    let kind = classify(e, Phase::Connect);
    let message = match (reply_code(e), e.kind()) {
        (Some(403), _) => format!(
            "RabbitMQ at {shown} refused our credentials (403 ACCESS_REFUSED): check the user \
             in broker.url and the password in broker.password_env / broker.password_file"
        ),
        (Some(530 | 402), _) => format!(
            "RabbitMQ at {shown} refused the virtual host ({e}): check the vhost in broker.url \
             (`/` is written %2f) and the user's permissions on it"
        ),
        (_, lapin::ErrorKind::IOError(io)) => match tls_rejection(io.as_ref()) {
            Some(why) => format!(
                "TLS to RabbitMQ at {shown}: {why}; check broker.tls_ca_file (and \
                 broker.tls_client_cert_file/tls_client_key_file if the broker asks for one)"
            ),
            None => format!("cannot connect to RabbitMQ at {shown}: {e}"),
        },
        _ => format!("cannot connect to RabbitMQ at {shown}: {e}"),
    };
    stage_error(kind, message)
}

/// Any AMQP error once connected, classified by [`classify`] (phase `Session`).
pub fn amqp_error(what: &str, e: lapin::Error) -> StageError {
    stage_error(
        classify(&e, Phase::Session),
        format!("RabbitMQ {what}: {e}"),
    )
}

/// The routing key an event was published with: a delivery replayed from the DLQ arrives
/// through the default exchange with the main queue's name as its routing key, and carries
/// the original in `x-cdc-original-routing-key`.
pub fn routing_key_of(delivery_routing_key: &str, headers: Option<&FieldTable>) -> String {
    match header(headers, "x-cdc-original-routing-key").map(header_text) {
        Some(original) if !original.is_empty() => original,
        _ => delivery_routing_key.to_string(),
    }
}

/// A signal that fires as soon as the broker closes `connection` or one of its channels
/// (an operator's `close_connection`, a broker restart, a channel error such as a refused
/// ack), or the connection is lost, and that sets `broker_connected` to 0 at once.
///
/// **For the pipeline:** race the batch's work against `token.cancelled()`; when it fires,
/// the deliveries in hand can no longer be acked (their channel is gone and the broker will
/// redeliver them), so stop embedding and writing them, drop the session and reconnect. Call
/// it right after [`connect`], once per session. The token also fires when the connection's
/// event stream ends; cancelling it yourself (at the end of a session) stops the watcher.
pub fn watch_connection(
    connection: &Connection,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> CancellationToken {
    use futures_util::StreamExt;
    let token = CancellationToken::new();
    let fired = token.clone();
    let mut events = Box::pin(connection.events_listener());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => {
                        metrics.set_connected(false);
                        tracing::debug!(error = %e, "broker connection or channel closed");
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = fired.cancelled() => return,
            }
        }
        fired.cancel();
    });
    token
}

/// A header value as text (Debezium sends strings; others are shown as debug text).
pub fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Timestamp(t) => timestamp_text(*t),
        other => format!("{other:?}"),
    }
}

/// An AMQP timestamp (seconds since the epoch) as RFC 3339.
pub fn timestamp_text(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| seconds.to_string())
}

/// Reads a header of a message's headers table.
pub fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(&ShortString::from(name.to_string()))
}

/// Every `period`, reads the depth of the main queue and the DLQ (passive declares, on a
/// connection of its own) into `cdc_indexer_queue_messages`. Runs until `cancel`.
pub async fn poll_queue_depths(
    config: std::sync::Arc<crate::config::Config>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    period: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    use lapin::options::QueueDeclareOptions;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut session: Option<(Connection, lapin::Channel)> = None;
    loop {
        // Only once the pipeline is connected, so it has declared the queues: a passive
        // declare of a queue that does not exist yet closes the channel (404), which lapin
        // logs as an error.
        let declared = metrics
            .health
            .broker_connected
            .load(std::sync::atomic::Ordering::Relaxed);
        if declared
            && session
                .as_ref()
                .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
            && let Ok(connection) = connect(&config.broker, "metrics").await
            && let Ok(channel) = connection.create_channel().await
        {
            session = Some((connection, channel));
        }
        if let Some((_, channel)) = session.as_ref().filter(|_| declared) {
            for (role, queue) in [
                ("main", &config.topology.queue),
                ("dlq", &config.topology.dead_letter_queue),
            ] {
                if let Ok(q) = channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    metrics
                        .queue_messages
                        .with_label_values(&[role])
                        .set(i64::from(q.message_count()));
                }
            }
        }
        // Until the first declare, look again soon: the first depths then follow within
        // moments of the pipeline consuming.
        let wait = if declared {
            period
        } else {
            period.min(std::time::Duration::from_millis(200))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
    }
    if let Some((connection, _)) = session {
        let _ = connection.close(200, "shutdown".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_goes_into_the_uri_unencoded_and_whole() {
        let mut c = BrokerConfig {
            url: "amqp://app@rabbit:5672/%2f".into(),
            ..BrokerConfig::default()
        };
        c.password_env = "CDC_TEST_NO_SUCH_VAR_FOR_URL".into();
        let uri = amqp_uri(&c).unwrap();
        assert_eq!(uri.authority.userinfo.username, "app");
        assert_eq!(uri.authority.userinfo.password, "guest", "lapin's default");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "p@ss:w/rd?#x\n").unwrap();
        c.password_file = Some(file);
        let uri = amqp_uri(&c).unwrap();
        assert_eq!(uri.authority.userinfo.password, "p@ss:w/rd?#x");
        assert_eq!(uri.authority.host, "rabbit");
        assert_eq!(uri.vhost, "/");
    }

    fn protocol_error(code: u16) -> lapin::Error {
        let amqp = lapin::protocol::AMQPError::from_id(code, "text".into()).unwrap();
        lapin::Error::from(lapin::ErrorKind::ProtocolError(amqp))
    }

    #[test]
    fn broker_errors_are_classified_by_reply_code() {
        use ErrorKind::{Fatal, Transient};
        let cases = [
            (403, Phase::Connect, Fatal),
            (403, Phase::Session, Fatal),
            (530, Phase::Connect, Fatal),
            (402, Phase::Connect, Fatal),
            (406, Phase::Declare, Fatal),
            (406, Phase::Session, Transient),
            (404, Phase::Declare, Transient),
            (404, Phase::Session, Transient),
            (320, Phase::Session, Transient),
            (405, Phase::Declare, Transient),
            (541, Phase::Session, Transient),
            (540, Phase::Session, Fatal),
        ];
        for (code, phase, kind) in cases {
            let e = protocol_error(code);
            assert_eq!(reply_code(&e), Some(code));
            assert_eq!(classify(&e, phase), kind, "{code} in {phase:?}");
        }
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io, Phase::Connect), Transient);
        assert_eq!(reply_code(&io), None);
    }

    #[test]
    fn a_rejected_certificate_inside_an_io_error_is_fatal() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        let e = lapin::Error::from(io);
        assert_eq!(classify(&e, Phase::Connect), ErrorKind::Fatal);
        let message = classify_connect(&e, "amqps://u:secret@h:5671/%2f").message;
        assert!(
            message.contains("TLS") && message.contains("broker.tls_ca_file"),
            "{message}"
        );
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn replayed_deliveries_keep_their_original_routing_key() {
        let mut headers = FieldTable::default();
        assert_eq!(routing_key_of("cdc-indexer", Some(&headers)), "cdc-indexer");
        assert_eq!(
            routing_key_of("dbserver1.public.a", None),
            "dbserver1.public.a"
        );
        headers.insert(
            ShortString::from("x-cdc-original-routing-key".to_string()),
            AMQPValue::LongString(LongString::from("dbserver1.public.products")),
        );
        assert_eq!(
            routing_key_of("cdc-indexer", Some(&headers)),
            "dbserver1.public.products"
        );
    }

    #[test]
    fn amqp_timestamps_read_as_rfc3339() {
        assert_eq!(
            header_text(&AMQPValue::Timestamp(1_796_154_615)),
            "2026-12-01T19:50:15Z"
        );
    }
}
