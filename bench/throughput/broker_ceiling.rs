//! The raw broker ceiling: how fast this machine's RabbitMQ hands a consumer the same kind
//! of messages from the same kind of queue and takes its acks, with nothing done in between.
//! A lapin consumer, prefetch 500, one `multiple` ack every 250 deliveries (and one for the
//! rest): what a daemon that embeds and writes nothing could reach at best. The phases that
//! embed nothing (deletes, unchanged texts) are compared with it.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use crate::corpus::{self, Version};
use crate::rabbit::Rabbit;

pub const PREFETCH: u16 = 500;
pub const ACK_EVERY: u64 = 250;

/// Consume+ack rate over `count` delete events queued beforehand (messages/s).
pub async fn measure(rabbit: &Rabbit, count: u64, n: u64) -> anyhow::Result<f64> {
    let topology = rabbit.declare("broker").await?;
    let result = async {
        let rows = n.max(1);
        corpus::publish(
            &rabbit.conn,
            &topology.exchange,
            (0..count)
                .map(|i| corpus::event(1 + i % rows, "d", Version::INSERTED, 9_000_000_000 + i)),
        )
        .await?;
        let ch = rabbit.conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let started = Instant::now();
        let mut consumer = ch
            .basic_consume(
                topology.queue.as_str().into(),
                "bench-broker-ceiling".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut received = 0u64;
        let mut last_tag = None;
        while received < count {
            let delivery = consumer
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("the consumer ended after {received}"))??;
            received += 1;
            last_tag = Some(delivery.delivery_tag);
            if received.is_multiple_of(ACK_EVERY) {
                ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
                last_tag = None;
            }
        }
        if let Some(tag) = last_tag {
            ch.basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = ch.close(200, "done".into()).await;
        anyhow::Ok(count as f64 / secs)
    }
    .await;
    rabbit.delete(&topology).await;
    result
}
