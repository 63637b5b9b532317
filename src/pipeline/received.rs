//! The consumer, read as deliveries arrive: a task takes each delivery the moment lapin hands
//! it over and stamps it with that instant, the start of the daemon's own share
//! (`cdc_indexer_delivery_to_ack_seconds`). A delivery that then waits in the prefetch buffer
//! while the batch before it is embedded or written counts that wait as the daemon's: it is.
//!
//! The buffer stays bounded by the prefetch window (the broker sends no more unacked
//! deliveries than that). The task ends with the consumer (its stream ends after
//! `basic.cancel` or with the channel) and is aborted when this is dropped.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use tokio::sync::mpsc;

/// A delivery and when the daemon received it.
pub(crate) struct Received {
    pub at: Instant,
    pub delivery: Delivery,
}

pub(crate) struct Deliveries {
    rx: mpsc::UnboundedReceiver<lapin::Result<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Deliveries {
    pub fn new(mut consumer: Consumer) -> Deliveries {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                let item = item.map(|delivery| Received {
                    at: Instant::now(),
                    delivery,
                });
                if tx.send(item).is_err() {
                    break;
                }
            }
        });
        Deliveries { rx, task }
    }

    /// The next delivery, as the consumer's stream gives it (`None` once it ended).
    pub async fn next(&mut self) -> Option<lapin::Result<Received>> {
        self.rx.recv().await
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.task.abort();
    }
}
