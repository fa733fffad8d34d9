//! idemkv: a CP idempotency store.
pub mod codec;
pub mod raft;
pub mod record;
pub mod store;
