//! The events every phase works on: N realistic product rows, as Debezium events.
//!
//! A row's text (the daemon's template `{name}\n\n{description}`) depends on its id and a
//! text revision; its price is a payload column outside the template. So:
//! - an insert is revision 0;
//! - an update that changes the text raises the revision (the description gains a sentence);
//! - an update that does not change the text keeps the revision and changes the price only:
//!   the daemon's plan (`src/batch/plan.rs`) finds the same text hash and chunk count and
//!   writes chunk 0's payload only (`payload_updates`), embedding nothing;
//! - a delete carries the row as `before`.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection};
use serde_json::{Value, json};

pub const ROUTING_KEY: &str = "dbserver1.public.products";

const ADJECTIVES: &[&str] = &[
    "lightweight",
    "waterproof",
    "compact",
    "durable",
    "ergonomic",
    "insulated",
    "foldable",
    "stainless",
    "wireless",
    "rechargeable",
    "breathable",
    "heavy-duty",
    "adjustable",
    "non-stick",
    "recycled",
];
const NOUNS: &[&str] = &[
    "hiking backpack",
    "camping stove",
    "trail running shoe",
    "chef's knife",
    "cast iron skillet",
    "noise-cancelling headphones",
    "mechanical keyboard",
    "down sleeping bag",
    "espresso grinder",
    "rain jacket",
    "trekking pole",
    "bluetooth speaker",
    "yoga mat",
    "water filter",
    "headlamp",
];
const USES: &[&str] = &[
    "long weekends in the mountains",
    "busy weeknight dinners",
    "daily commutes in the rain",
    "ultralight thru-hikes",
    "small apartment kitchens",
    "focused work sessions",
    "winter camping below freezing",
    "family road trips",
    "early morning runs",
    "backcountry ski tours",
];
const DETAILS: &[&str] = &[
    "It packs down small and weighs less than you expect.",
    "The handle stays cool and the edge holds for months.",
    "Battery life lasts a full week of normal use.",
    "Seams are taped and the zips are sealed against storms.",
    "A lifetime warranty covers defects in materials.",
    "Easy to clean by hand; no special tools required.",
    "Reviewers praise its comfort on long days.",
    "Made with recycled fabrics and a PFC-free finish.",
    "Includes a carry pouch and a quick start guide.",
    "Tested by our staff over two seasons of hard use.",
];

/// Which version of a row an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Text revision: 0 = as inserted; each text-changing update adds one.
    pub text: u32,
    /// Price in cents (not in the text template).
    pub price_cents: u32,
}

impl Version {
    pub const INSERTED: Version = Version {
        text: 0,
        price_cents: 1999,
    };

    /// The same row with a new text (same price).
    pub fn new_text(self) -> Version {
        Version {
            text: self.text + 1,
            ..self
        }
    }

    /// The same row with a new price only (same text).
    pub fn new_price(self) -> Version {
        Version {
            price_cents: self.price_cents + 500,
            ..self
        }
    }
}

/// Name and description of product `id` at text revision `rev`.
pub fn product(id: u64, rev: u32) -> (String, String) {
    let i = id as usize;
    let name = format!(
        "{} {} {}",
        ADJECTIVES[i % ADJECTIVES.len()],
        NOUNS[(i / 3) % NOUNS.len()],
        id
    );
    let mut description = format!(
        "A {} {} designed for {}. {} {} Model year {}.",
        ADJECTIVES[(i * 7) % ADJECTIVES.len()],
        NOUNS[(i / 3) % NOUNS.len()],
        USES[(i * 3) % USES.len()],
        DETAILS[i % DETAILS.len()],
        DETAILS[(i * 5 + 1) % DETAILS.len()],
        2020 + i % 6
    );
    if rev > 0 {
        description.push_str(&format!(
            " Revised edition {rev}: {}",
            DETAILS[(i + rev as usize * 3) % DETAILS.len()]
        ));
    }
    (name, description)
}

/// The row's columns.
pub fn row(id: u64, v: Version) -> Value {
    let (name, description) = product(id, v.text);
    json!({"id": id, "name": name, "description": description, "category": "outdoor",
           "price": format!("{}.{:02}", v.price_cents / 100, v.price_cents % 100)})
}

/// A Debezium event (`op` c, u or d) for row `id` at `version`, at source position `lsn`.
pub fn event(id: u64, op: &str, v: Version, lsn: u64) -> Vec<u8> {
    let row = row(id, v);
    let (before, after) = match op {
        "d" => (row, Value::Null),
        _ => (Value::Null, row),
    };
    json!({"before": before, "after": after, "op": op,
           "source": {"name": "dbserver1", "schema": "public", "table": "products", "lsn": lsn,
                      "ts_ms": chrono::Utc::now().timestamp_millis()}})
    .to_string()
    .into_bytes()
}

/// Publishes persistent messages to `exchange` (mandatory: an unroutable one is an error) with
/// publisher confirms, awaited in windows of 500 (one wait per message would cap publishing
/// at ~2k msg/s).
pub async fn publish(
    conn: &Connection,
    exchange: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> anyhow::Result<u64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = Vec::new();
    let mut count = 0;
    for body in bodies {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push(confirm);
        count += 1;
        if pending.len() >= 500 {
            for c in pending.drain(..) {
                confirmed(c.await?)?;
            }
        }
    }
    for c in pending {
        confirmed(c.await?)?;
    }
    let _ = ch.close(200, "published".into()).await;
    Ok(count)
}

fn confirmed(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => anyhow::bail!("a published event was unroutable"),
        _ => anyhow::bail!("the broker did not confirm a published event"),
    }
}
