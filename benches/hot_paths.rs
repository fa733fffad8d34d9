//! Criterion benchmarks of the hot paths of a claim: the rule decision, the
//! encodings it goes through (protobuf at the API edge, bincode in the Raft
//! log), and a durable log append (write + fdatasync). `cargo bench`.
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use idemkv::pb::api;
use idemkv::raft::{Entry, TypeConfig};
use idemkv::record::{self, Change, Claim, Command, Op, RecordKey, Request};
use idemkv::store::Store;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log_id;
use openraft::EntryPayload;
use prost::Message;

fn claim(owner: &str) -> Claim {
    Claim {
        owner: owner.into(),
        claim_id: "2c5ea4c0-4067-11e9-8bad-9b1deb4d3b7d".into(),
        lease_ms: 30_000,
        fingerprint: None,
        max_attempts: 0,
        retention_ms: 86_400_000,
    }
}

fn key(i: u64) -> RecordKey {
    RecordKey {
        namespace: "orders".into(),
        key: format!("order-{i}").into_bytes(),
    }
}

fn claim_entry(index: u64) -> Entry {
    Entry {
        log_id: log_id::<TypeConfig>(1, 1, index),
        payload: EntryPayload::Normal(Request {
            stamped_ms: 1_700_000_000_000,
            command: Command::Op {
                key: key(index),
                op: Op::Claim(claim("worker-1")),
            }
            .into(),
        }),
    }
}

fn rules(c: &mut Criterion) {
    let mut g = c.benchmark_group("rules");
    let now = 1_700_000_000_000;
    let op = Op::Claim(claim("worker-1"));
    g.bench_function("claim_fresh_key", |b| {
        b.iter(|| record::apply_op(black_box(None), black_box(&op), now, &mut 41))
    });
    let held = match record::apply_op(None, &op, now, &mut 41).0 {
        Change::Put(r) => r,
        other => panic!("a fresh claim must store a record, got {other:?}"),
    };
    let dup = Op::Claim(claim("worker-2"));
    g.bench_function("claim_held_key", |b| {
        b.iter(|| record::apply_op(black_box(Some(&held)), black_box(&dup), now + 1, &mut 42))
    });
    let complete = Op::Complete {
        token: 42,
        result: vec![7; 100],
        code: None,
        retention_ms: None,
    };
    g.bench_function("complete_100b", |b| {
        b.iter(|| {
            record::apply_op(
                black_box(Some(&held)),
                black_box(&complete),
                now + 2,
                &mut 43,
            )
        })
    });
    let claims: Vec<Claim> = (0..100).map(|i| claim(&format!("w{i}"))).collect();
    let refs: Vec<&Claim> = claims.iter().collect();
    let current = vec![None; 100];
    g.throughput(Throughput::Elements(100));
    g.bench_function("claim_batch_100", |b| {
        b.iter(|| record::apply_claim_batch(black_box(&current), &refs, true, now, &mut 44))
    });
    g.finish();
}

fn encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("encoding");
    let req = api::ClaimRequest {
        namespace: "orders".into(),
        key: b"order-12345".to_vec(),
        owner: "worker-1".into(),
        claim_id: "2c5ea4c0-4067-11e9-8bad-9b1deb4d3b7d".into(),
        lease_ms: 30_000,
        ..Default::default()
    };
    let bytes = req.encode_to_vec();
    g.bench_function("protobuf_claim_request_encode", |b| {
        b.iter(|| black_box(&req).encode_to_vec())
    });
    g.bench_function("protobuf_claim_request_decode", |b| {
        b.iter(|| api::ClaimRequest::decode(black_box(bytes.as_slice())).expect("decodes"))
    });
    let entry = claim_entry(7);
    let encoded = idemkv::codec::encode(&entry).expect("encodes");
    g.bench_function("bincode_log_entry_encode", |b| {
        b.iter(|| idemkv::codec::encode(black_box(&entry)).expect("encodes"))
    });
    g.bench_function("bincode_log_entry_decode", |b| {
        b.iter(|| idemkv::codec::decode::<Entry>(black_box(&encoded)).expect("decodes"))
    });
    g.finish();
}

/// One durable append of `n` claim entries: write, fdatasync, acknowledged.
fn log_append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let mut log = store.log;
    let mut next = 1u64;
    let mut g = c.benchmark_group("log_append_fsync");
    g.measurement_time(Duration::from_secs(5));
    for n in [1u64, 64] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{n}_entries"), |b| {
            b.iter_batched(
                || {
                    let batch: Vec<Entry> = (next..next + n).map(claim_entry).collect();
                    next += n;
                    batch
                },
                |batch| {
                    rt.block_on(async {
                        let (tx, rx) =
                            <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
                        log.append(batch, IOFlushed::signal(tx))
                            .await
                            .expect("append");
                        rx.await.expect("ack").expect("durable");
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, rules, encoding, log_append);
criterion_main!(benches);
