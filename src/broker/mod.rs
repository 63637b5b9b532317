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
use lapin::{Connection, ConnectionProperties};

use crate::config::{BrokerConfig, read_secret, redact_url};
use crate::error::StageError;

/// The AMQP URL with the password from `password_file`/`password_env` if set.
pub fn amqp_url(config: &BrokerConfig) -> Result<String, StageError> {
    let password = read_secret(config.password_file.as_deref(), &config.password_env)
        .map_err(StageError::fatal)?;
    let Some(password) = password else {
        return Ok(config.url.clone());
    };
    let Some((scheme, rest)) = config.url.split_once("://") else {
        return Err(StageError::fatal(format!(
            "broker.url: `{}` is not an amqp:// URL",
            redact_url(&config.url)
        )));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (
            userinfo.split(':').next().unwrap_or("guest").to_string(),
            host,
        ),
        None => ("guest".to_string(), authority),
    };
    Ok(format!(
        "{scheme}://{user}:{}@{host}{path}",
        percent_encode(&password)
    ))
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

/// Opens a connection. Refused credentials are fatal; anything else is transient.
pub async fn connect(config: &BrokerConfig, purpose: &str) -> Result<Connection, StageError> {
    let url = amqp_url(config)?;
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(
        format!("{} ({purpose})", config.connection_name),
    ));
    Connection::connect(&url, properties)
        .await
        .map_err(|e| classify_connect(&e, &config.url))
}

fn classify_connect(e: &lapin::Error, url: &str) -> StageError {
    let text = e.to_string();
    let shown = redact_url(url);
    if text.contains("ACCESS_REFUSED")
        || text.contains("access refused")
        || text.contains("authentication")
    {
        StageError::fatal(format!(
            "RabbitMQ at {shown} refused our credentials: {text}"
        ))
    } else if text.contains("NOT_ALLOWED") || text.contains("vhost") {
        StageError::fatal(format!(
            "RabbitMQ at {shown} refused the virtual host: {text}"
        ))
    } else {
        StageError::transient(format!("cannot connect to RabbitMQ at {shown}: {text}"))
    }
}

/// Any AMQP error once connected: the connection or channel is gone → transient.
pub fn amqp_error(what: &str, e: lapin::Error) -> StageError {
    StageError::transient(format!("RabbitMQ {what}: {e}"))
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
        other => format!("{other:?}"),
    }
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
        if session
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
            && let Ok(connection) = connect(&config.broker, "metrics").await
            && let Ok(channel) = connection.create_channel().await
        {
            session = Some((connection, channel));
        }
        if let Some((_, channel)) = &session {
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
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
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
    fn password_is_spliced_into_the_url() {
        let mut c = BrokerConfig {
            url: "amqp://app@rabbit:5672/%2f".into(),
            ..BrokerConfig::default()
        };
        c.password_env = "CDC_TEST_NO_SUCH_VAR_FOR_URL".into();
        assert_eq!(amqp_url(&c).unwrap(), "amqp://app@rabbit:5672/%2f");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "p@ss:w/rd\n").unwrap();
        c.password_file = Some(file);
        assert_eq!(
            amqp_url(&c).unwrap(),
            "amqp://app:p%40ss%3Aw%2Frd@rabbit:5672/%2f"
        );
    }
}
