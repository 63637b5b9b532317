//! The bench's RabbitMQ objects: one uniquely named topology per run of a consumer (the
//! daemon's own declaration, so every consumer reads the same kind of queue: quorum,
//! single active consumer, delivery limit), all deleted at the end, also after a failure.

use std::sync::Mutex;

use anyhow::Context;
use cdc_indexer::config::TopologyConfig;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub struct Rabbit {
    pub conn: Connection,
    prefix: String,
    declared: Mutex<Vec<TopologyConfig>>,
}

impl Rabbit {
    pub async fn connect() -> anyhow::Result<Rabbit> {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .with_context(|| format!("RabbitMQ at {AMQP}"))?;
        Ok(Rabbit {
            conn,
            prefix: format!("bench-{}", std::process::id()),
            declared: Mutex::new(Vec::new()),
        })
    }

    /// Declares a fresh topology named after `run` (exchange, DLX, DLQ, main queue bound by
    /// the default routing pattern) and remembers it for [`Rabbit::cleanup`].
    pub async fn declare(&self, run: &str) -> anyhow::Result<TopologyConfig> {
        let name = format!("{}-{run}", self.prefix);
        let topology = TopologyConfig {
            exchange: format!("{name}.ex"),
            dead_letter_exchange: format!("{name}.dlx"),
            dead_letter_queue: format!("{name}.dlq"),
            queue: format!("{name}.q"),
            ..TopologyConfig::default()
        };
        self.lock().push(topology.clone());
        let ch = self.conn.create_channel().await?;
        cdc_indexer::broker::topology::declare(&ch, &topology)
            .await
            .with_context(|| format!("declaring {name}"))?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(topology)
    }

    /// Deletes one topology now (frees the broker's memory between phases).
    pub async fn delete(&self, topology: &TopologyConfig) {
        self.lock().retain(|t| t.queue != topology.queue);
        delete(&self.conn, topology).await;
    }

    /// Deletes every topology still declared.
    pub async fn cleanup(&self) {
        let all: Vec<TopologyConfig> = self.lock().drain(..).collect();
        for t in &all {
            delete(&self.conn, t).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TopologyConfig>> {
        self.declared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn delete(conn: &Connection, t: &TopologyConfig) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    for q in [&t.queue, &t.dead_letter_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [&t.exchange, &t.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = ch.close(200, "cleanup".into()).await;
}
