//! Publishing poison messages to the dead-letter exchange.
//!
//! The original body and properties are kept; reason headers are added (DESIGN §5):
//! `x-cdc-error-kind`, `x-cdc-error`, `x-cdc-original-exchange`,
//! `x-cdc-original-routing-key`, `x-cdc-failed-at`. The routing key stays the original one.

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::amqp_error;
use crate::error::StageError;

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
        })
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
        set("x-cdc-error-kind", letter.kind.to_string());
        set("x-cdc-error", reason.to_string());
        set("x-cdc-original-exchange", original_exchange.to_string());
        set("x-cdc-original-routing-key", routing_key.to_string());
        set(
            "x-cdc-failed-at",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        let properties = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        self.publish_raw(body, routing_key, properties).await
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
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(|e| amqp_error("publish to the dead-letter exchange", e))?
            .await
            .map_err(|e| amqp_error("confirm from the dead-letter exchange", e))?;
        match confirm {
            Confirmation::Ack(_) => Ok(()),
            other => Err(StageError::transient(format!(
                "the broker did not confirm a dead letter: {other:?}"
            ))),
        }
    }
}

/// Headers of a message, empty when it has none.
pub fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}
