//! idemkv: a CP idempotency store. A small Raft cluster (openraft) keeps
//! idempotency records in sled on every node and serves them over gRPC, so
//! at-least-once work gets exactly-once effect.
//!
//! # Layout
//! - [`record`]: the idempotency rules, pure and deterministic (the heart).
//! - [`store`]: storage: the Raft log in segment files of its own, the vote
//!   and the state machine in sled, snapshots; real fsync with group commit.
//! - [`raft`]: everything that names openraft: type config, peer network,
//!   peer service, and [`raft::consensus`], the door to the Raft group.
//! - [`api`]: the public gRPC services, validation, error → status mapping.
//! - [`client`]: the Rust client: endpoints, leader discovery, safe retries.
//! - [`node`]: [`Node`], one node in-process.
//! - [`config`]: node configuration and limits.
//! - [`cli`]: the `idemkv` subcommands (`serve`, `up`, `ctl`, `bench`, `certs`).
//! - [`tls`]: TLS (rustls) for the client and peer ports, and for clients.
//! - [`bench`]: the load tool behind `idemkv bench` (idemkv, etcd, Redis).
//! - [`codec`], [`pb`], [`error`]: encoding, generated code, the error type.
pub mod api;
pub mod auth;
pub mod bench;
pub mod caps;
pub use client::Client;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod error;
pub mod metrics;
pub mod node;
pub mod pb;
pub mod raft;
pub mod record;
pub mod store;
pub mod tls;

pub use config::{Limits, NodeConfig};
pub use error::Error;
pub use node::Node;
