//! A message consumer whose broker redelivers: once while the first delivery
//! is still being processed (an ack timeout), and once after the consumer
//! crashed mid-way. The effect (charging a card) happens once per message.
//!
//! `cargo run --example consumer` (against `idemkv up`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemkv::client::{RunOptions, RunOutcome};
use idemkv::Client;

/// message id -> number of charges made.
pub type Ledger = Arc<Mutex<HashMap<String, u32>>>;

/// Consume one delivery; returns what the consumer acks with.
async fn consume(
    client: &Client,
    consumer: &str,
    msg: &str,
    ledger: Ledger,
    crash: bool,
) -> anyhow::Result<RunOutcome> {
    let mut opts = RunOptions::new(consumer, Duration::from_millis(500));
    opts.wait_for_duplicate = Some(Duration::from_secs(5));
    let out = client
        .run_once("payments", msg.as_bytes(), &opts, |claimed| {
            let ledger = ledger.clone();
            async move {
                println!("{consumer}: processing {msg} (token {})", claimed.token);
                tokio::time::sleep(Duration::from_millis(300)).await;
                if crash {
                    println!("{consumer}: crashed while processing {msg}");
                    std::future::pending::<()>().await;
                }
                *ledger.lock().unwrap().entry(msg.to_string()).or_default() += 1;
                Ok::<_, String>(format!("charged for {msg}"))
            }
        })
        .await?;
    let story = match &out {
        RunOutcome::Ran { token, .. } => format!("charged the card (token {token}); ack"),
        RunOutcome::Replayed { completion, token } => format!(
            "already handled (token {token}): {}; ack without charging",
            String::from_utf8_lossy(&completion.result)
        ),
        RunOutcome::Busy { owner } => format!("{owner} still holds it; try again later"),
        RunOutcome::Failed { last_error, .. } => format!("dead letter: {last_error}"),
    };
    println!("{consumer}: {msg} -> {story}");
    Ok(out)
}

/// Play both redeliveries for messages `<prefix>-42` and `<prefix>-43`.
pub async fn story(client: &Client, prefix: &str) -> anyhow::Result<Ledger> {
    let ledger: Ledger = Arc::default();
    // 1. Redelivery while the first delivery is still running.
    let m42 = format!("{prefix}-42");
    let first = {
        let (c, m, l) = (client.clone(), m42.clone(), ledger.clone());
        tokio::spawn(async move { consume(&c, "consumer-1", &m, l, false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    println!("broker: ack timeout, redelivering {m42} to consumer-2");
    consume(client, "consumer-2", &m42, ledger.clone(), false).await?;
    first.await??;

    // 2. Redelivery after a crash mid-way.
    let m43 = format!("{prefix}-43");
    let crashed = {
        let (c, m, l) = (client.clone(), m43.clone(), ledger.clone());
        tokio::spawn(async move { consume(&c, "consumer-1", &m, l, true).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    crashed.abort();
    println!("broker: consumer-1 is gone, redelivering {m43} to consumer-2");
    while let RunOutcome::Busy { .. } =
        consume(client, "consumer-2", &m43, ledger.clone(), false).await?
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(ledger)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let ledger = story(&client, &format!("msg-{}", std::process::id())).await?;
    println!("charges per message: {:?}", ledger.lock().unwrap());
    Ok(())
}
