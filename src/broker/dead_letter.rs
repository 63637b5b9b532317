//! Publishing poison messages to the dead-letter exchange.
//!
//! The original body and properties are kept; reason headers are added (DESIGN §5):
//! `x-cdc-error-kind`, `x-cdc-error`, `x-cdc-original-exchange`,
//! `x-cdc-original-routing-key`, `x-cdc-failed-at`. The routing key stays the original one.
//!
//! Publishes are `mandatory`: a dead letter the DLX cannot route to any queue (its binding
//! was removed) comes back as `basic.return` before the confirm, and is then an error, never
//! a confirmed dead letter: the original delivery stays unacked and nothing is lost. A
//! publisher that knows its DLQ ([`DeadLetterPublisher::rebinding`]) binds it to the DLX
//! again right away, so the caller's next attempt goes through. A dead letter the broker
//! refuses (`basic.nack`: a full DLQ with `reject-publish`) is a transient error too: the
//! pipeline retries it in place, intake paused, without giving up its session.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::amqp_error;
use crate::error::StageError;
use crate::events::{DeadLetterUnroutable, InternalEvent};
use crate::metrics::Metrics;

/// Why a message is dead-lettered: a short machine-readable kind and a human reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `decode`, `mapping`, `unknown-table`, `embed`, `sink`, `toast-unavailable`.
    pub kind: &'static str,
    pub reason: String,
}

/// A channel in confirm mode for dead letters.
pub struct DeadLetterPublisher {
    channel: Channel,
    exchange: String,
    /// The DLQ to bind to the exchange again when a dead letter comes back unroutable.
    queue: Option<String>,
    metrics: Option<std::sync::Arc<Metrics>>,
}

/// Longest reason we put in a header (the broker limits frame sizes; reasons are for humans).
const MAX_REASON: usize = 2000;

impl DeadLetterPublisher {
    pub async fn open(connection: &Connection, exchange: &str) -> Result<Self, StageError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("confirm.select", e))?;
        Ok(Self {
            channel,
            exchange: exchange.to_string(),
            queue: None,
            metrics: None,
        })
    }

    /// Binds `queue` (the DLQ) to the exchange again whenever a dead letter comes back
    /// unroutable, as the topology declares it (the binding is idempotent).
    pub fn rebinding(mut self, queue: &str) -> Self {
        self.queue = Some(queue.to_string());
        self
    }

    /// Counts unroutable dead letters in `metrics` (`dead_letters_unroutable_total`).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        original_exchange: &str,
        routing_key: &str,
        letter: &DeadLetter,
    ) -> Result<(), StageError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let mut set = |k: &str, v: String| {
            headers.insert(
                ShortString::from(k.to_string()),
                AMQPValue::LongString(LongString::from(v)),
            );
        };
        let reason = &letter.reason[..letter.reason.floor_char_boundary(MAX_REASON)];
        // A delivery replayed from the DLQ came through the default exchange: its original
        // exchange and routing key are already in the headers and stay.
        let replayed =
            super::header(properties.headers().as_ref(), "x-cdc-original-exchange").is_some();
        set("x-cdc-error-kind", letter.kind.to_string());
        set("x-cdc-error", reason.to_string());
        if !replayed {
            set("x-cdc-original-exchange", original_exchange.to_string());
            set("x-cdc-original-routing-key", routing_key.to_string());
        }
        set(
            "x-cdc-failed-at",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        let properties = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let routing_key = super::routing_key_of(routing_key, properties.headers().as_ref());
        self.publish_raw(body, &routing_key, properties).await
    }

    /// Publishes `body` with exactly `properties` to the DLX and waits for the confirm.
    pub async fn publish_raw(
        &self,
        body: &[u8],
        routing_key: &str,
        properties: BasicProperties,
    ) -> Result<(), StageError> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(|e| amqp_error("publish to the dead-letter exchange", e))?
            .await
            .map_err(|e| amqp_error("confirm from the dead-letter exchange", e))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) | Confirmation::Nack(Some(_returned)) => {
                if let Some(metrics) = &self.metrics {
                    DeadLetterUnroutable {
                        exchange: &self.exchange,
                    }
                    .emit(metrics);
                }
                if let Some(queue) = &self.queue {
                    // A failure here (the DLQ itself was deleted: 404) closes this channel;
                    // the session then ends and the next one declares the whole topology.
                    let bound = self
                        .channel
                        .queue_bind(
                            queue.as_str().into(),
                            self.exchange.as_str().into(),
                            "".into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await;
                    if bound.is_ok() {
                        tracing::info!(queue = %queue, exchange = %self.exchange, "the dead-letter queue was unbound; bound it again");
                    }
                }
                Err(StageError::transient(format!(
                    "the dead-letter exchange `{}` has no queue bound: the broker returned the \
                     dead letter as unroutable, so it was not kept and its message stays unacked; \
                     bind the DLQ again (`cdc-indexer topology declare`)",
                    self.exchange
                )))
            }
            Confirmation::Nack(None) => Err(StageError::transient(format!(
                "the broker refused a dead letter (basic.nack): the dead-letter queue behind \
                 `{}` takes no more messages (full, with overflow reject-publish?); its message \
                 stays unacked and intake is paused until it takes them",
                self.exchange
            ))),
            Confirmation::NotRequested => Err(StageError::transient(
                "the broker did not confirm a dead letter (the channel is not in confirm mode)",
            )),
        }
    }
}

/// Headers of a message, empty when it has none.
pub fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}
