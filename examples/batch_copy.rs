//! "Copy these 3,000 products": a batch request delivered to four workers at
//! once (a retried request, or a fan-out bug), all racing on the same items.
//!
//! Each worker claims the products a hundred at a time with one ClaimBatch
//! (one Raft entry per hundred), copies only what it acquired, and completes
//! each copy. Products another worker holds or already copied are skipped.
//! The destination ends with every product exactly once. A bundle that must
//! be copied whole uses an all-or-nothing batch.
//!
//! `cargo run --example batch_copy` (against `idemkv up`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use idemkv::pb::api::{self, claim_batch_item::Outcome};
use idemkv::Client;

/// The destination store: product id -> times it was written.
pub type Destination = Arc<Mutex<HashMap<String, u32>>>;

fn claim_item(run: &str, id: &str, owner: &str) -> api::ClaimRequest {
    api::ClaimRequest {
        namespace: "copy".into(),
        key: format!("{run}/{id}").into_bytes(),
        owner: owner.into(),
        lease_ms: 30_000,
        ..Default::default()
    }
}

async fn worker(
    client: Client,
    w: usize,
    run: String,
    products: usize,
    dest: Destination,
) -> anyhow::Result<usize> {
    let mut copied = 0;
    let ids: Vec<String> = (0..products).map(|i| format!("product-{i:05}")).collect();
    for chunk in ids.chunks(100) {
        let owner = format!("worker-{w}");
        let items = chunk
            .iter()
            .map(|id| claim_item(&run, id, &owner))
            .collect();
        let resp = client
            .claim_batch(api::ClaimBatchRequest {
                items,
                all_or_nothing: false,
            })
            .await?;
        let mut completes = Vec::new();
        for (id, item) in chunk.iter().zip(resp.items) {
            if let Some(Outcome::Acquired(a)) = item.outcome {
                *dest.lock().unwrap().entry(id.clone()).or_default() += 1;
                copied += 1;
                let c = client.clone();
                let key = format!("{run}/{id}").into_bytes();
                completes.push(async move {
                    c.complete(api::CompleteRequest {
                        namespace: "copy".into(),
                        key,
                        token: a.token,
                        result: b"copied".to_vec(),
                        ..Default::default()
                    })
                    .await
                });
            }
        }
        for r in futures::future::join_all(completes).await {
            r?;
        }
    }
    Ok(copied)
}

/// Four workers copy `products` products; returns the destination.
pub async fn copy_catalog(
    client: &Client,
    run: &str,
    products: usize,
) -> anyhow::Result<Destination> {
    let dest: Destination = Arc::default();
    let workers: Vec<_> = (1..=4)
        .map(|w| {
            tokio::spawn(worker(
                client.clone(),
                w,
                run.to_string(),
                products,
                dest.clone(),
            ))
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        println!("worker-{} copied {} products", i + 1, w.await??);
    }
    Ok(dest)
}

/// Claim a bundle whole or not at all; returns whether it was acquired.
pub async fn claim_bundle(
    client: &Client,
    run: &str,
    owner: &str,
    keys: &[&str],
) -> anyhow::Result<bool> {
    let items = keys.iter().map(|k| claim_item(run, k, owner)).collect();
    let resp = client
        .claim_batch(api::ClaimBatchRequest {
            items,
            all_or_nothing: true,
        })
        .await?;
    Ok(resp.applied)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let run = format!("run-{}", std::process::id());
    let dest = copy_catalog(&client, &run, 3000).await?;
    let dest = dest.lock().unwrap().clone();
    let dupes = dest.values().filter(|n| **n > 1).count();
    println!(
        "destination holds {} products, {dupes} written more than once",
        dest.len()
    );

    let first = claim_bundle(
        &client,
        &run,
        "bundle-a",
        &["bundle/1", "bundle/2", "bundle/3"],
    )
    .await?;
    let second = claim_bundle(&client, &run, "bundle-b", &["bundle/3", "bundle/4"]).await?;
    println!("bundle-a (1,2,3) acquired whole: {first}; bundle-b (3,4) acquired: {second} (3 is taken, so 4 stays free)");
    Ok(())
}
