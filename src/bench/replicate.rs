//! The replicated floor (`idemkv bench --target replicated-floor`): the
//! least a three-copy, majority-fsynced gRPC service pays on this machine.
//!
//! The floor's server (`floor.rs`) becomes a leader with two followers,
//! each a process of its own (`idemkv floor-follower`, started from the
//! same binary) as idemkv's nodes are, talking over loopback with idemkv's
//! own peer service (`AppendStream`). A write that changes the map is queued;
//! one task takes everything queued (at most two batches in flight, as
//! idemkv's proposer), writes the batch to the leader's file and sends the
//! same bytes to both followers; each follower writes what it has
//! received to its file, fdatasyncs once, and answers with the newest
//! batch number. A write is answered once the leader's fdatasync and one
//! follower's have covered its batch: the durability idemkv promises,
//! with no Raft, no storage engine, no record rules. Reads are answered
//! from the leader's map, as the floor answers them.
//!
//! The files live in the system's temporary directory, are unlinked as
//! soon as they are open (the process holds the only handle) and are
//! zero-filled up front, so an fdatasync does not also commit a new file
//! size: idemkv's log keeps the same room ahead of its last record.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::peer::{
    raft_peer_client::RaftPeerClient, raft_peer_server::RaftPeer, raft_peer_server::RaftPeerServer,
    Payload, SnapshotChunk,
};

/// Bytes of each copy's file; batches wrap around it (nothing reads them).
const ROOM: u64 = 32 << 20;

/// Batches sent before the first of them is durable on a majority.
const IN_FLIGHT: usize = 2;

/// What the replicated floor did, for the report.
#[derive(Debug, Default)]
pub struct Counters {
    /// Writes made durable on a majority.
    pub writes: AtomicU64,
    /// Batches the leader wrote, synced and sent.
    pub batches: AtomicU64,
    /// fdatasyncs by each follower, as its newest answer counted them.
    pub follower_syncs: [AtomicU64; 2],
}

/// One copy's file: unlinked, zero-filled, written at a moving offset.
struct CopyFile {
    file: std::fs::File,
    next: AtomicU64,
}

impl CopyFile {
    fn create() -> anyhow::Result<Arc<Self>> {
        let path = std::env::temp_dir().join(format!(
            "idemkv-replicated-floor-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("replicated floor: create {}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        let zeros = vec![0u8; 1 << 20];
        for at in (0..ROOM).step_by(zeros.len()) {
            file.write_all_at(&zeros, at)?;
        }
        file.sync_all()?;
        Ok(Arc::new(CopyFile {
            file,
            next: AtomicU64::new(0),
        }))
    }

    /// Write `data` and fdatasync, on a blocking thread.
    async fn append_synced(self: &Arc<Self>, data: Vec<u8>) -> std::io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let len = data.len() as u64;
            let mut at = me.next.fetch_add(len, Ordering::Relaxed) % ROOM;
            if at + len > ROOM {
                at = 0;
            }
            me.file.write_all_at(&data, at)?;
            me.file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// A follower: writes what the leader streams, one fdatasync for all that
/// has arrived, then answers with the newest batch number it covered and
/// how many fdatasyncs it has done.
struct Follower {
    file: Arc<CopyFile>,
    syncs: Arc<AtomicU64>,
}

/// The `n`th little-endian u64 of a payload: a batch's number leads what
/// the leader sends; an answer is the number, then the follower's syncs.
fn word(p: &Payload, n: usize) -> u64 {
    p.data
        .get(8 * n..8 * n + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn only_append<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "the replicated floor's followers answer AppendStream only",
    ))
}

#[tonic::async_trait]
impl RaftPeer for Follower {
    type AppendStreamStream = ReceiverStream<Result<Payload, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let mut input = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let file = self.file.clone();
        let syncs = self.syncs.clone();
        tokio::spawn(async move {
            while let Some(Ok(first)) = input.next().await {
                let mut newest = word(&first, 0);
                let mut data = first.data;
                // Everything else already here goes in the same sync.
                while let Some(Some(Ok(p))) = input.next().now_or_never() {
                    newest = word(&p, 0);
                    data.extend_from_slice(&p.data);
                }
                let synced = file.append_synced(data).await;
                let done = syncs.fetch_add(1, Ordering::Relaxed) + 1;
                let answer = synced.map(|()| Payload {
                    data: [newest, done].map(u64::to_le_bytes).concat(),
                });
                let answer = answer.map_err(|e| Status::internal(format!("fdatasync: {e}")));
                if tx.send(answer).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn append_entries(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        only_append()
    }

    async fn vote(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        only_append()
    }

    async fn pre_vote(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        only_append()
    }

    async fn install_snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        only_append()
    }

    async fn forward(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        only_append()
    }

    async fn transfer_leader(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        only_append()
    }
}

/// A write waiting for its batch to be durable on a majority.
struct Pending {
    bytes: Vec<u8>,
    done: oneshot::Sender<bool>,
}

/// The leader's side: queues writes and answers each once a majority
/// holds it.
pub struct Leader {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Leader {
    /// Make `bytes` (the encoded request) durable on the leader and one
    /// follower.
    pub async fn commit(&self, bytes: Vec<u8>) -> Result<(), Status> {
        let (done, answer) = oneshot::channel();
        let lost = || Status::unavailable("replicated floor: a copy failed");
        self.queue
            .send(Pending { bytes, done })
            .map_err(|_| lost())?;
        match answer.await {
            Ok(true) => Ok(()),
            _ => Err(lost()),
        }
    }

    /// Connect to the followers at `peers` and start the batching task on
    /// the current runtime.
    async fn start(peers: Vec<String>, counters: Arc<Counters>) -> anyhow::Result<Self> {
        let file = CopyFile::create()?;
        // The highest batch number any follower has made durable.
        let (acked, majority) = watch::channel(0u64);
        let acked = Arc::new(acked);
        let mut outs = Vec::new();
        for (index, addr) in peers.into_iter().enumerate() {
            let mut client = RaftPeerClient::connect(format!("http://{addr}"))
                .await
                .with_context(|| format!("replicated floor: connect to {addr}"))?;
            let (out, rx) = mpsc::unbounded_channel();
            let mut answers = client
                .append_stream(UnboundedReceiverStream::new(rx))
                .await
                .context("replicated floor: open the append stream")?
                .into_inner();
            let acked = acked.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Some(Ok(p)) = answers.next().await {
                    counters.follower_syncs[index].store(word(&p, 1), Ordering::Relaxed);
                    let n = word(&p, 0);
                    acked.send_if_modified(|a| {
                        let newer = n > *a;
                        if newer {
                            *a = n;
                        }
                        newer
                    });
                }
            });
            outs.push(out);
        }
        let (queue, mut queued) = mpsc::unbounded_channel::<Pending>();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            let mut number = 0u64;
            while let Some(first) = queued.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while let Ok(p) = queued.try_recv() {
                    batch.push(p);
                }
                number += 1;
                let size = batch.iter().map(|p| 4 + p.bytes.len()).sum::<usize>();
                let mut data = Vec::with_capacity(8 + size);
                data.extend_from_slice(&number.to_le_bytes());
                for p in &batch {
                    data.extend_from_slice(&(p.bytes.len() as u32).to_le_bytes());
                    data.extend_from_slice(&p.bytes);
                }
                for out in &outs {
                    let _ = out.send(Payload { data: data.clone() });
                }
                let file = file.clone();
                let mut majority = majority.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    let local = file.append_synced(data).await.is_ok();
                    let remote = majority.wait_for(|a| *a >= number).await.is_ok();
                    drop(slot);
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters
                        .writes
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for p in batch {
                        let _ = p.done.send(local && remote);
                    }
                });
            }
        });
        Ok(Leader { queue })
    }
}

/// The follower processes; stopped when the run ends.
pub struct Followers(Vec<std::process::Child>);

impl Drop for Followers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The program to run as a follower: `IDEMKV_FLOOR_FOLLOWER` if set (a
/// test's `idemkv` binary), otherwise this one.
fn follower_program() -> anyhow::Result<std::path::PathBuf> {
    match std::env::var_os("IDEMKV_FLOOR_FOLLOWER") {
        Some(p) => Ok(p.into()),
        None => std::env::current_exe().context("replicated floor: this program's path"),
    }
}

/// Start two follower processes; returns them and their addresses.
fn start_followers() -> anyhow::Result<(Followers, Vec<String>)> {
    use std::io::BufRead;
    let program = follower_program()?;
    let mut followers = Followers(Vec::new());
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let mut child = std::process::Command::new(&program)
            .arg("floor-follower")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("replicated floor: start {}", program.display()))?;
        let out = child.stdout.take();
        followers.0.push(child);
        let mut line = String::new();
        if let Some(out) = out {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let addr = line.trim();
        if addr.is_empty() {
            anyhow::bail!(
                "replicated floor: {} floor-follower printed no address",
                program.display()
            );
        }
        addrs.push(addr.to_string());
    }
    Ok((followers, addrs))
}

/// `idemkv floor-follower`: serve one follower on a free loopback port,
/// print its address, and exit when stdin closes (the bench ended).
pub async fn follow() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let follower = Follower {
        file: CopyFile::create()?,
        syncs: Arc::default(),
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
        .map(super::floor::no_delay as fn(_) -> _);
    tonic::transport::Server::builder()
        .add_service(RaftPeerServer::new(follower))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Start the follower processes and return them with a future that, on
/// the leader's runtime, connects to them and starts the leader's
/// batching task.
pub fn prepare(
    counters: Arc<Counters>,
) -> anyhow::Result<(
    Followers,
    impl std::future::Future<Output = anyhow::Result<Leader>> + Send,
)> {
    let (followers, peers) = start_followers()?;
    Ok((
        followers,
        async move { Leader::start(peers, counters).await },
    ))
}
