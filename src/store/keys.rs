//! Key layout of the state machine trees (`sm`, `sm-b`; the one in force is
//! named by [`ACTIVE_TREE`] in sled's default tree):
//!
//! | prefix | key                              | value                      |
//! |--------|----------------------------------|----------------------------|
//! | `r`    | namespace `\0` key               | the [`Record`], encoded    |
//! | `x`    | expiry (u64 BE) namespace `\0` key | empty: the expiry index of versions before it moved to memory (`expiry.rs`); dropped at open |
//! | `m`    | name                             | applied log id, membership, clock |
//!
//! Namespaces cannot contain `\0` (the API edge allows `[A-Za-z0-9_.-]`), so
//! the separator is unambiguous.
//!
//! [`Record`]: crate::record::Record

use crate::record::RecordKey;

pub const RECORD: u8 = b'r';
pub const EXPIRY: u8 = b'x';
pub const APPLIED: &[u8] = b"m:applied";
pub const MEMBERSHIP: &[u8] = b"m:membership";
pub const CLOCK: &[u8] = b"m:clock";
/// The last fencing token granted (SPEC §2 Tokens); absent before the first
/// grant under this scheme, when the applied index bounds every token given.
pub const LAST_TOKEN: &[u8] = b"m:last_token";
/// A [`crate::store::boot_clock::Anchor`] written by versions before the
/// anchor file (`clock-anchor` in the data directory); still read, never
/// written.
pub const CLOCK_ANCHOR: &[u8] = b"m:clock_anchor";
/// Written only by versions that installed a snapshot in place: present
/// while such an install ran, naming its snapshot file. A tree that still
/// has it was left half-installed; opening finishes that install.
pub const INSTALLING: &[u8] = b"m:installing";
/// The sled tree of Raft's own state (see `log.rs`, `rejoin.rs`).
pub const RAFT_TREE: &str = "raft";
/// In [`RAFT_TREE`]: the vote (made durable before it is acknowledged).
pub const VOTE: &[u8] = b"vote";
/// In [`RAFT_TREE`]: the last purged log id.
pub const PURGED: &[u8] = b"last_purged";
/// In [`RAFT_TREE`]: the cluster's id (`store/identity.rs`).
pub const CLUSTER_ID: &[u8] = b"cluster_id";
/// In [`RAFT_TREE`]: the commit point, a hint saved without a sync.
pub const COMMITTED: &[u8] = b"committed";
/// In [`RAFT_TREE`]: the entry a node that cut a damaged record must hold
/// again before it votes (`rejoin.rs`).
pub const REJOIN_UNTIL: &[u8] = b"rejoin_until";
/// In sled's default tree: the name of the state machine tree in force
/// (absent: `sm`). Flipped in one write when a snapshot is installed.
pub const ACTIVE_TREE: &[u8] = b"sm:active";

fn push_key(out: &mut Vec<u8>, k: &RecordKey) {
    out.extend_from_slice(k.namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(&k.key);
}

pub fn record(k: &RecordKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + k.namespace.len() + k.key.len());
    out.push(RECORD);
    push_key(&mut out, k);
    out
}

fn split_key(bytes: &[u8]) -> Option<RecordKey> {
    let sep = bytes.iter().position(|b| *b == 0)?;
    let namespace = String::from_utf8(bytes[..sep].to_vec()).ok()?;
    Some(RecordKey {
        namespace,
        key: bytes[sep + 1..].to_vec(),
    })
}

pub fn parse_record(bytes: &[u8]) -> Option<RecordKey> {
    if bytes.first() != Some(&RECORD) {
        return None;
    }
    split_key(&bytes[1..])
}
