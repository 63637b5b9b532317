//! The RabbitMQ objects the daemon needs, declared idempotently.
//!
//! ```text
//! Debezium Server ─▶ cdc.events (topic) ─[dbserver1.public.#]─▶ cdc-indexer (quorum)
//!                                                                 │ x-dead-letter-exchange
//!                                 cdc.events.dlx (fanout) ◀───────┘ (delivery limit reached)
//!                                   │   ▲ poison messages we publish, with reason headers
//!                                   ▼
//!                              cdc-indexer.dlq
//! ```
//!
//! Declaring an object that exists with the same type and arguments is a no-op; with others,
//! RabbitMQ answers `406 PRECONDITION_FAILED` and closes the channel. We turn that into a
//! start error that names the object and what we asked for.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde_json::{Value, json};

use crate::config::{QueueType, TopologyConfig};
use crate::error::StageError;

/// The arguments of the main queue.
pub fn main_queue_arguments(t: &TopologyConfig) -> Vec<(&'static str, Value)> {
    let mut args = vec![("x-dead-letter-exchange", json!(t.dead_letter_exchange))];
    match t.queue_type {
        QueueType::Quorum => {
            args.push(("x-queue-type", json!("quorum")));
            args.push(("x-delivery-limit", json!(t.delivery_limit)));
            // The broker's own dead-lettering (delivery limit reached) is at-most-once by
            // default: a message is dropped if the DLQ does not take it. At-least-once keeps it
            // in this queue until the DLQ has confirmed it (RabbitMQ 3.10+, feature flag
            // `stream_queue`); RabbitMQ requires `reject-publish` overflow for it.
            args.push(("x-dead-letter-strategy", json!("at-least-once")));
            args.push(("x-overflow", json!("reject-publish")));
        }
        QueueType::Classic => args.push(("x-queue-type", json!("classic"))),
    }
    // One active consumer at a time keeps per-key order with several replicas running:
    // the others stand by.
    args.push(("x-single-active-consumer", json!(true)));
    args
}

/// The arguments of the dead-letter queue.
pub fn dead_letter_queue_arguments() -> Vec<(&'static str, Value)> {
    vec![("x-queue-type", json!("classic"))]
}

fn field_table(args: &[(&'static str, Value)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in args {
        let value = match v {
            Value::Bool(b) => AMQPValue::Boolean(*b),
            Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().unwrap_or(0)),
            Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            other => AMQPValue::LongString(LongString::from(other.to_string())),
        };
        table.insert(ShortString::from(k.to_string()), value);
    }
    table
}

fn describe(args: &[(&'static str, Value)]) -> String {
    let parts: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

fn conflict(object: &str, wanted: &str, e: lapin::Error) -> StageError {
    use crate::broker::{Phase, classify, reply_code};
    let kind = classify(&e, Phase::Declare);
    let message = match reply_code(&e) {
        Some(406) => format!(
            "{object} already exists with other settings than ours ({wanted}); the broker says: {e}. \
             Delete or rename it, or change [topology] in the config"
        ),
        Some(403) => format!(
            "not allowed to declare {object} (403 ACCESS_REFUSED): give the broker user \
             configure permission on it, or pre-provision topology/definitions.json: {e}"
        ),
        _ => format!("declaring {object}: {e}"),
    };
    match kind {
        crate::error::ErrorKind::Fatal => StageError::fatal(message),
        _ => StageError::transient(message),
    }
}

/// Declares every object. Idempotent.
pub async fn declare(channel: &Channel, t: &TopologyConfig) -> Result<(), StageError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            t.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            conflict(
                &format!("exchange `{}`", t.exchange),
                "type=topic, durable",
                e,
            )
        })?;
    channel
        .exchange_declare(
            t.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            conflict(
                &format!("exchange `{}`", t.dead_letter_exchange),
                "type=fanout, durable",
                e,
            )
        })?;

    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlq_args = dead_letter_queue_arguments();
    channel
        .queue_declare(
            t.dead_letter_queue.as_str().into(),
            queue_options,
            field_table(&dlq_args),
        )
        .await
        .map_err(|e| {
            conflict(
                &format!("queue `{}`", t.dead_letter_queue),
                &format!("durable, {}", describe(&dlq_args)),
                e,
            )
        })?;
    channel
        .queue_bind(
            t.dead_letter_queue.as_str().into(),
            t.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            conflict(
                &format!(
                    "binding of `{}` to `{}`",
                    t.dead_letter_queue, t.dead_letter_exchange
                ),
                "",
                e,
            )
        })?;

    let args = main_queue_arguments(t);
    channel
        .queue_declare(t.queue.as_str().into(), queue_options, field_table(&args))
        .await
        .map_err(|e| {
            conflict(
                &format!("queue `{}`", t.queue),
                &format!("durable, {}", describe(&args)),
                e,
            )
        })?;
    for pattern in &t.routing_patterns {
        channel
            .queue_bind(
                t.queue.as_str().into(),
                t.exchange.as_str().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                conflict(
                    &format!("binding `{pattern}` of `{}` to `{}`", t.queue, t.exchange),
                    "",
                    e,
                )
            })?;
    }
    Ok(())
}

/// The same objects as a RabbitMQ definitions file (`rabbitmqctl import_definitions`, or
/// `load_definitions` in rabbitmq.conf), for operators who pre-provision.
pub fn definitions(t: &TopologyConfig, vhost: &str) -> Value {
    let args = |a: Vec<(&'static str, Value)>| {
        Value::Object(a.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let mut bindings = vec![json!({
        "source": t.dead_letter_exchange, "vhost": vhost, "destination": t.dead_letter_queue,
        "destination_type": "queue", "routing_key": "", "arguments": {}
    })];
    for pattern in &t.routing_patterns {
        bindings.push(json!({
            "source": t.exchange, "vhost": vhost, "destination": t.queue,
            "destination_type": "queue", "routing_key": pattern, "arguments": {}
        }));
    }
    json!({
        "exchanges": [
            {"name": t.exchange, "vhost": vhost, "type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}},
            {"name": t.dead_letter_exchange, "vhost": vhost, "type": "fanout", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}
        ],
        "queues": [
            {"name": t.dead_letter_queue, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": args(dead_letter_queue_arguments())},
            {"name": t.queue, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": args(main_queue_arguments(t))}
        ],
        "bindings": bindings
    })
}

/// One finding of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub object: String,
    pub problem: String,
}

/// Compares the broker with the configuration without changing anything: each object must
/// exist (passive declare) and accept our exact declaration (an equivalent re-declare is a
/// no-op; a different type or argument set is refused with the differing argument named).
/// Bindings cannot be read over AMQP; they are reported as unchecked.
pub async fn verify(
    connection: &lapin::Connection,
    t: &TopologyConfig,
) -> Result<Vec<Drift>, StageError> {
    let mut drift = Vec::new();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let exchanges = [
        (&t.exchange, ExchangeKind::Topic),
        (&t.dead_letter_exchange, ExchangeKind::Fanout),
    ];
    for (name, kind) in exchanges {
        let object = format!("exchange `{name}`");
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::broker::amqp_error("open channel", e))?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        if let Err(e) = channel
            .exchange_declare(
                name.as_str().into(),
                kind.clone(),
                passive,
                FieldTable::default(),
            )
            .await
        {
            drift.push(Drift {
                object,
                problem: format!("missing ({e})"),
            });
            continue;
        }
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::broker::amqp_error("open channel", e))?;
        if let Err(e) = channel
            .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
        {
            drift.push(Drift {
                object,
                problem: format!("differs from the config: {e}"),
            });
        }
    }
    let queues = [
        (&t.dead_letter_queue, dead_letter_queue_arguments()),
        (&t.queue, main_queue_arguments(t)),
    ];
    for (name, args) in queues {
        let object = format!("queue `{name}`");
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::broker::amqp_error("open channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if let Err(e) = channel
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
        {
            drift.push(Drift {
                object,
                problem: format!("missing ({e})"),
            });
            continue;
        }
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| crate::broker::amqp_error("open channel", e))?;
        if let Err(e) = channel
            .queue_declare(name.as_str().into(), queue_options, field_table(&args))
            .await
        {
            drift.push(Drift {
                object,
                problem: format!(
                    "differs from the config (we want durable, {}): {e}",
                    describe(&args)
                ),
            });
        }
    }
    Ok(drift)
}
