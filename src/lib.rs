//! idemkv: a CP idempotency store. A small Raft cluster (openraft) keeps
//! idempotency records in sled on every node and serves them over gRPC, so
//! at-least-once work gets exactly-once effect.
//!
//! # Layers
//! Each layer imports only from the layers below it (`tests/layers.rs`
//! checks this; docs/ARCHITECTURE.md draws it):
//!
//! 1. [`wire`], [`pb`], [`tls`], [`metrics`], [`codec`], [`clock`]: what
//!    client and node agree on beyond the protobuf (reasons, header names,
//!    message caps, default endpoints); generated code; TLS settings;
//!    counters (a leaf); encoding; the time the rules read (injectable).
//! 2. [`record`]: the idempotency rules, pure and deterministic (the heart).
//! 3. [`error`] (the error type and the one error → status mapping),
//!    [`raft::types`] (openraft's type configuration), [`config`] (node
//!    configuration and limits, with their defaults), then [`auth`] (bearer
//!    tokens), [`caps`] (concurrency and size caps), [`settings`] (every
//!    setting by flag, environment and file, merged).
//! 4. [`store`]: the Raft log in segment files of its own, the vote and the
//!    state machine in sled, snapshots; real fsync with group commit.
//! 5. [`raft`]: [`raft::consensus`] (the one door to the Raft group), the
//!    peer network and the peer service.
//! 6. [`api`]: the public gRPC services and input validation.
//! 7. [`node`]: [`Node`], one node in-process.
//!
//! Beside them: [`client`] (the Rust client: endpoints, leader discovery,
//! safe retries, `run_once`) uses only `wire`, `pb` and `tls`; [`bench`]
//! (the load tool behind `idemkv bench`) only the client and [`out`] (the
//! commands' output lines, which a closed pipe does not turn into a panic;
//! a leaf, shared with the binary); [`gateway`] (the
//! HTTP Idempotency-Key proxy) the client, `metrics` and `codec`. The command
//! line is the `idemkv` binary's own (`src/main.rs`, `src/cli/`).
//!
//! # Features
//! `server` (a node, and the binary) and `bench` are on by default;
//! `--no-default-features --features client` builds the client alone.
pub mod client;
pub mod out;
pub mod pb;
pub mod tls;
pub mod wire;
pub use client::Client;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "server")]
pub mod caps;
#[cfg(feature = "server")]
pub mod clock;
#[cfg(feature = "server")]
pub mod codec;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod gateway;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod node;
#[cfg(feature = "server")]
pub mod raft;
#[cfg(feature = "server")]
pub mod record;
#[cfg(feature = "server")]
pub mod settings;
#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
pub use config::{Limits, NodeConfig};
#[cfg(feature = "server")]
pub use error::Error;
#[cfg(feature = "server")]
pub use node::Node;
