//! Repair: Debezium-shaped events, published to the daemon's own queue, that heal drift
//! without ever overwriting or deleting a newer streamed change.
//!
//! They go through the normal path (decode → coalesce → plan → write) and so through its
//! stale guard, which orders events by their source position. What makes a repair safe is
//! the position it carries:
//!
//! * **A missing or stale row** is read again in a short transaction of its own with
//!   `SELECT … FOR SHARE`, which waits for every open transaction that changed the row and
//!   keeps new writers out until we commit; `pg_current_wal_insert_lsn()` is read while the
//!   locks are held. Every change of the row committed before has a smaller LSN (its records
//!   are in the WAL before that point, and its value is the one read), every later change a
//!   larger one (it waits for our commit, whose record comes after that point). Whichever
//!   arrives first, the stale guard then keeps the newest value. A position read at snapshot
//!   time would not do: a transaction open at the snapshot writes the row at an LSN before the
//!   snapshot's and commits after it, so its streamed change would look older than the repair
//!   and be skipped, leaving the snapshot's old value.
//! * **An orphan** (a document without a row) is deleted only while the index still holds the
//!   very position reconcile observed (`x-cdc-repair: delete-if-unchanged`; the event carries
//!   that position). The index was read *before* the source was asked whether the row exists,
//!   so the document's change had committed and the row was gone by then. Anything written for
//!   the key since wins; the delete marker keeps the observed position (not a newer one), so a
//!   later re-insert of the key still applies.
//!
//! The events are published to the default exchange with the main queue's name as routing
//! key (only the daemon's queue gets them), persistent, with publisher confirms awaited per
//! page. The header `x-cdc-repair` carries the flags of [`crate::batch::Repair`].

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};

use crate::batch::Repair;
use crate::broker::{self, amqp_error};
use crate::config::Config;
use crate::error::StageError;
use crate::model::{DocumentKey, PositionAt, Row, SourcePosition};
use crate::pipeline::REPAIR_HEADER;

/// Where a repair event comes from, for `source`.
#[derive(Debug, Clone)]
pub struct Origin {
    /// Debezium's `source.name` of the stream: positions compare only within one connector.
    pub connector: String,
    /// `source.db`.
    pub database: String,
}

/// One repair event: its body and its flags.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairEvent {
    pub body: Vec<u8>,
    pub repair: Repair,
}

fn source(origin: &Origin, table: &str, position: Option<&SourcePosition>, ts_ms: i64) -> Value {
    let (schema, name) = table.split_once('.').unwrap_or(("", table));
    let mut source = json!({
        "version": concat!("cdc-indexer-reconcile/", env!("CARGO_PKG_VERSION")),
        "connector": "postgresql",
        "name": position.map_or(origin.connector.as_str(), |p| p.connector.as_str()),
        "db": origin.database,
        "schema": schema,
        "table": name,
        "snapshot": "false",
    });
    match position.map(|p| &p.at) {
        Some(PositionAt::Lsn(lsn)) => {
            source["lsn"] = json!(lsn);
            source["ts_ms"] = json!(ts_ms);
        }
        Some(PositionAt::Binlog { file, pos, row }) => {
            source["file"] = json!(file);
            source["pos"] = json!(pos);
            source["row"] = json!(row);
            source["ts_ms"] = json!(ts_ms);
        }
        // The position *is* the timestamp: keep it exactly.
        Some(PositionAt::TsMs(ts)) => source["ts_ms"] = json!(ts),
        None => {}
    }
    source
}

/// The row as read under lock, at the WAL position read while the locks were held.
pub fn upsert_event(
    origin: &Origin,
    table: &str,
    row: &Row,
    lsn: u64,
    repair: Repair,
    now_ms: i64,
) -> RepairEvent {
    let position = SourcePosition {
        connector: origin.connector.clone(),
        at: PositionAt::Lsn(lsn),
    };
    let body = json!({
        "before": null,
        "after": row,
        "source": source(origin, table, Some(&position), now_ms),
        "op": "r",
        "ts_ms": now_ms,
    });
    RepairEvent {
        body: body.to_string().into_bytes(),
        repair: Repair {
            from_reconcile: true,
            ..repair
        },
    }
}

/// The conditional delete of an orphan: its key columns, at the position the index held.
pub fn orphan_event(
    origin: &Origin,
    key: &DocumentKey,
    key_values: &Row,
    observed: Option<&SourcePosition>,
    now_ms: i64,
) -> RepairEvent {
    let body = json!({
        "before": key_values,
        "after": null,
        "source": source(origin, &key.table, observed, now_ms),
        "op": "d",
        "ts_ms": now_ms,
    });
    RepairEvent {
        body: body.to_string().into_bytes(),
        repair: Repair {
            from_reconcile: true,
            if_unchanged: true,
            ..Repair::default()
        },
    }
}

/// Publishes repair events to the daemon's main queue with confirms.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
    queue: String,
}

impl Publisher {
    /// Connects to the broker; the main queue must exist (the daemon declares it).
    pub async fn connect(config: &Config) -> Result<Publisher, StageError> {
        let connection = broker::connect(&config.broker, "reconcile").await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))?;
        let queue = config.topology.queue.clone();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                StageError::fatal(format!(
                    "the daemon's queue `{queue}` does not exist ({e}); start the daemon or run `cdc-indexer topology declare` first"
                ))
            })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("confirm.select", e))?;
        Ok(Publisher {
            connection,
            channel,
            queue,
        })
    }

    /// Publishes `events` and waits until the broker has confirmed every one.
    pub async fn publish(&self, events: &[RepairEvent]) -> Result<(), StageError> {
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from(REPAIR_HEADER),
                AMQPValue::LongString(LongString::from(event.repair.header())),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_app_id(ShortString::from("cdc-indexer reconcile"))
                .with_headers(headers);
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &event.body,
                    properties,
                )
                .await
                .map_err(|e| amqp_error("basic.publish", e))?;
            pending.push(confirm);
        }
        for confirm in pending {
            let confirmation = confirm
                .await
                .map_err(|e| amqp_error("publisher confirm", e))?;
            if !matches!(confirmation, lapin::Confirmation::Ack(_)) {
                return Err(StageError::transient(format!(
                    "the broker refused a repair event for queue `{}`: {confirmation:?}",
                    self.queue
                )));
            }
        }
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decoded, decode};
    use crate::model::{Change, Op};

    fn origin() -> Origin {
        Origin {
            connector: "dbserver1".into(),
            database: "app".into(),
        }
    }

    fn change(event: &RepairEvent) -> crate::model::ChangeEvent {
        match decode(&event.body, "cdc-indexer").expect("decodes") {
            Decoded::Change(c) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_upsert_repair_decodes_to_the_row_at_the_locked_position() {
        let row: Row = json!({"id": 1, "price": "329.00", "tags": ["a"], "note": null})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let e = upsert_event(&origin(), "public.products", &row, 42, Repair::default(), 7);
        let c = change(&e);
        assert_eq!(c.table.to_string(), "public.products");
        assert_eq!(c.op, Op::Read);
        assert_eq!(c.change, Change::Upsert(row));
        assert_eq!(
            c.position,
            Some(SourcePosition {
                connector: "dbserver1".into(),
                at: PositionAt::Lsn(42)
            })
        );
        assert!(e.repair.from_reconcile && !e.repair.if_unchanged);
    }

    #[test]
    fn an_orphan_delete_carries_exactly_the_position_it_saw() {
        let key = DocumentKey {
            table: "public.products".into(),
            key: r#"{"id":9}"#.into(),
        };
        let values: Row = json!({"id": 9}).as_object().cloned().unwrap_or_default();
        for seen in [
            Some(SourcePosition {
                connector: "other".into(),
                at: PositionAt::Lsn(5),
            }),
            Some(SourcePosition {
                connector: "dbserver1".into(),
                at: PositionAt::TsMs(1234),
            }),
            Some(SourcePosition {
                connector: "m".into(),
                at: PositionAt::Binlog {
                    file: "bin.000002".into(),
                    pos: 7,
                    row: 1,
                },
            }),
            None,
        ] {
            let e = orphan_event(&origin(), &key, &values, seen.as_ref(), 99);
            let c = change(&e);
            assert_eq!(c.op, Op::Delete);
            assert_eq!(c.position, seen, "{seen:?}");
            assert!(e.repair.if_unchanged);
        }
    }
}
