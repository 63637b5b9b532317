//! cdc-indexer as a library: the binary (`src/main.rs`) is a thin CLI over these modules,
//! and the integration tests use them to inspect the index.
//!
//! The path of one message: [`broker`] (RabbitMQ in) → [`decode`] (Debezium envelope →
//! [`model::ChangeEvent`]) → [`mapping`] (row → document) → [`batch`] (coalesce, plan) →
//! [`embed`] → [`sink`] (vector index) → ack, all driven by [`pipeline`].

pub mod batch;
pub mod broker;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod embed;
pub mod error;
pub mod events;
pub mod faults;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod preflight;
pub mod progress;
pub mod reconcile;
pub mod search;
pub mod sink;
pub mod stored;
pub mod tls;
