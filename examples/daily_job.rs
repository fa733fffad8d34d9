//! A job that must run once per day, however many schedulers fire it.
//!
//! Five schedulers (say, one per replica of a service) fire `nightly-report`
//! at the same moment. The key is `job name + date`, so exactly one of them
//! runs the job; the others wait for it and get its result. Run it again the
//! same day and every scheduler gets the saved result: nothing runs twice.
//!
//! `cargo run --example daily_job` (against `idemkv up`; set
//! `IDEMKV_ENDPOINTS` for another cluster).
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemkv::client::{RunOptions, RunOutcome};
use idemkv::Client;

/// Fire the job from `schedulers` schedulers at once; returns how many times
/// the job body actually ran.
pub async fn fire(client: &Client, date: &str, schedulers: u32) -> anyhow::Result<u32> {
    let runs = Arc::new(AtomicU32::new(0));
    let key = format!("nightly-report/{date}");
    let mut fired = Vec::new();
    for s in 1..=schedulers {
        let (client, runs, key, date) =
            (client.clone(), runs.clone(), key.clone(), date.to_string());
        fired.push(tokio::spawn(async move {
            let mut opts = RunOptions::new(format!("scheduler-{s}"), Duration::from_secs(10));
            opts.wait_for_duplicate = Some(Duration::from_secs(30));
            let out = client
                .run_once("jobs", key.as_bytes(), &opts, |claimed| {
                    let (runs, key) = (runs.clone(), key.clone());
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        println!(
                            "scheduler-{s}: claimed {key} (token {}), building the report",
                            claimed.token
                        );
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok::<_, String>(format!("report for {date}: 1234 orders"))
                    }
                })
                .await;
            match out {
                Ok(RunOutcome::Ran { completion, .. }) => {
                    println!(
                        "scheduler-{s}: ran the job -> {}",
                        String::from_utf8_lossy(&completion.result)
                    )
                }
                Ok(RunOutcome::Replayed { completion, token }) => println!(
                    "scheduler-{s}: already done (token {token}), replayed -> {}",
                    String::from_utf8_lossy(&completion.result)
                ),
                Ok(other) => println!("scheduler-{s}: {other:?}"),
                Err(e) => println!("scheduler-{s}: error: {e}"),
            }
        }));
    }
    for f in fired {
        f.await?;
    }
    Ok(runs.load(Ordering::SeqCst))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::from_env()?;
    let date = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "2026-11-22".into());
    let runs = fire(&client, &date, 5).await?;
    println!("the job body ran {runs} time(s) this call; across all calls for {date} it runs once");
    Ok(())
}
