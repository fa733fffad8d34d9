//! Shared by the log tests (`log_segments.rs`, `log_recovery.rs`): entries
//! to append, an append that waits for its fsync, closing a store, and
//! where a segment's records end.
#![allow(dead_code)]

use std::path::Path;

use idemkv::raft::{Entry, TypeConfig};
use idemkv::record::{Command, Op, RecordKey, Request};
use idemkv::store::{LogStore, Store};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log_id;
use openraft::EntryPayload;

/// An entry of `term` at `index`, carrying a Complete of about 100 bytes.
pub fn entry(index: u64, term: u64) -> Entry {
    entry_with_result(index, term, vec![index as u8; 100])
}

/// [`entry`] with its Complete carrying `result`.
pub fn entry_with_result(index: u64, term: u64, result: Vec<u8>) -> Entry {
    Entry {
        log_id: log_id::<TypeConfig>(term, 1, index),
        payload: EntryPayload::Normal(Request {
            stamped_ms: index,
            command: Command::Op {
                key: RecordKey {
                    namespace: "ns".into(),
                    key: format!("key-{index}").into_bytes(),
                },
                op: Op::Complete {
                    token: index,
                    result,
                    code: None,
                    retention_ms: None,
                },
            }
            .into(),
        }),
    }
}

/// Append `entries` and wait until the log says they are durable.
pub async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

/// Stop the store's threads and drop it, releasing the data directory.
pub fn close(store: Store) {
    store.log.close();
    store.syncer.close();
    drop(store);
}

/// `(offset, length)` of each whole record in a segment.
pub fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    idemkv::store::log_record_spans(bytes)
}

/// Where a segment's records end: the zero-filled room after them (see
/// `store/log.rs`) starts there.
pub fn records_end(bytes: &[u8]) -> usize {
    records(bytes).last().map_or(0, |(at, len)| at + len)
}

/// Cut the segment back to its last record, as a segment written before
/// the zero-filled room existed (or one cut back at open) is; returns its
/// bytes.
pub fn without_room(seg: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(seg).unwrap();
    let end = records_end(&bytes);
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "only zeros after the records"
    );
    bytes.truncate(end);
    std::fs::write(seg, &bytes).unwrap();
    bytes
}
