//! An interrupted long task resumes from its last checkpoint on another
//! worker.
//!
//! worker-a works through ten steps, saving a checkpoint after each (it rides
//! on the lease renewals). After step 4 it is killed. worker-b finds the key
//! IN_PROGRESS, waits for the dead worker's lease to expire, takes over with
//! a larger fencing token, receives the checkpoint "4" and continues at step
//! 5. Every step runs once.
//!
//! `cargo run --example resume_checkpoint` (against `idemkv up`).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemkv::client::{RunOptions, RunOutcome};
use idemkv::Client;

const STEPS: u32 = 10;

/// (worker, step) for every step executed.
pub type Log = Arc<Mutex<Vec<(String, u32)>>>;

async fn run_steps(
    client: &Client,
    key: &str,
    worker: &str,
    log: Log,
    die_after: Option<u32>,
) -> anyhow::Result<RunOutcome> {
    let opts = RunOptions::new(worker, Duration::from_millis(600));
    let out = client
        .run_once("tasks", key.as_bytes(), &opts, |claimed| {
            let log = log.clone();
            async move {
                let from = claimed
                    .checkpoint
                    .as_deref()
                    .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u32>().ok())
                    .map_or(1, |done| done + 1);
                println!(
                    "{worker}: token {} attempt {}, starting at step {from}",
                    claimed.token, claimed.attempt
                );
                for step in from..=STEPS {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    log.lock().unwrap().push((worker.to_string(), step));
                    claimed.save_checkpoint(step.to_string());
                    if die_after == Some(step) {
                        // Let a renewal carry the checkpoint, then "crash".
                        tokio::time::sleep(Duration::from_millis(450)).await;
                        println!("{worker}: killed after step {step}");
                        std::future::pending::<()>().await;
                    }
                }
                Ok::<_, String>(format!("all {STEPS} steps done"))
            }
        })
        .await?;
    Ok(out)
}

/// Play the story; returns the step log.
pub async fn story(client: &Client, key: &str) -> anyhow::Result<Log> {
    let log: Log = Arc::default();
    let a = {
        let (client, key, log) = (client.clone(), key.to_string(), log.clone());
        tokio::spawn(async move { run_steps(&client, &key, "worker-a", log, Some(4)).await })
    };
    // Wait until worker-a has done step 4, then kill it (drop the task: no
    // more renewals, no release — like a crashed process).
    while !log.lock().unwrap().iter().any(|(_, s)| *s == 4) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.abort();
    loop {
        match run_steps(client, key, "worker-b", log.clone(), None).await? {
            RunOutcome::Busy { owner } => {
                println!("worker-b: {owner} still holds a live lease; waiting for it to expire");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            RunOutcome::Ran { completion, token } | RunOutcome::Replayed { completion, token } => {
                println!(
                    "worker-b: {} (token {token})",
                    String::from_utf8_lossy(&completion.result)
                );
                return Ok(log);
            }
            RunOutcome::Failed { last_error, .. } => anyhow::bail!("the task failed: {last_error}"),
        }
    }
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let log = story(&client, &format!("reindex-{}", std::process::id())).await?;
    let log = log.lock().unwrap();
    println!(
        "steps run: {:?}",
        log.iter()
            .map(|(w, s)| format!("{w}:{s}"))
            .collect::<Vec<_>>()
    );
    Ok(())
}
