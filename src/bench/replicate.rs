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
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb::peer::{
    raft_peer_client::RaftPeerClient, raft_peer_server::RaftPeer, raft_peer_server::RaftPeerServer,
    Payload, SnapshotChunk,
};

/// Bytes of each copy's file; batches wrap around it (nothing reads them).
const ROOM: u64 = 8 << 20;

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
            file.write_all_at(&zeros, at)
                .context("replicated floor: zero-fill a copy's file")?;
        }
        file.sync_all()
            .context("replicated floor: sync a copy's file")?;
        Ok(Arc::new(CopyFile {
            file,
            next: AtomicU64::new(0),
        }))
    }

    /// Write `data` after the last write (from the start again when it
    /// would pass the zero-filled room; a write larger than the room grows
    /// the file) and fdatasync, on a blocking thread. One writer per file
    /// (`write_in_order`).
    async fn append_synced(self: &Arc<Self>, data: Vec<u8>) -> std::io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let len = data.len() as u64;
            let mut at = me.next.load(Ordering::Relaxed);
            if at + len > ROOM {
                at = 0;
            }
            me.next.store(at + len, Ordering::Relaxed);
            me.file.write_all_at(&data, at)?;
            me.file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// What a copy's writer reports after each fdatasync: the newest batch
/// number it covered and how many fdatasyncs it has done.
type Synced = std::io::Result<(u64, u64)>;

/// Write what arrives on `input`, in order: everything already queued goes
/// in one write and one fdatasync, after which the newest batch number
/// covered (a prefix: batches arrive in order) is reported. Stops at the
/// first failure, after reporting it.
fn write_in_order<S>(mut input: S, file: Arc<CopyFile>) -> mpsc::UnboundedReceiver<Synced>
where
    S: futures::Stream<Item = Payload> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut syncs = 0u64;
        while let Some(first) = input.next().await {
            let mut newest = word(&first, 0);
            let mut data = first.data;
            while let Some(Some(p)) = input.next().now_or_never() {
                newest = word(&p, 0);
                data.extend_from_slice(&p.data);
            }
            syncs += 1;
            let synced = file.append_synced(data).await.map(|()| (newest, syncs));
            let failed = synced.is_err();
            if tx.send(synced).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// A follower: its copy's writer over what the leader streams; each
/// answer is the newest batch number synced, then the follower's syncs.
struct Follower {
    file: Arc<CopyFile>,
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

type Answers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Payload, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for Follower {
    type AppendStreamStream = Answers;

    async fn append_stream(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Answers>, Status> {
        // The stream ends at the leader's first error.
        let input = request
            .into_inner()
            .take_while(|p| std::future::ready(p.is_ok()))
            .filter_map(|p| std::future::ready(p.ok()));
        let synced = write_in_order(Box::pin(input), self.file.clone());
        let answers = UnboundedReceiverStream::new(synced).map(|s| match s {
            Ok((newest, syncs)) => Ok(Payload {
                data: [newest, syncs].map(u64::to_le_bytes).concat(),
                ..Default::default()
            }),
            Err(e) => Err(Status::internal(format!(
                "replicated floor follower: fdatasync: {e}"
            ))),
        });
        Ok(Response::new(Box::pin(answers)))
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
    number: u64,
    bytes: Vec<u8>,
    done: oneshot::Sender<bool>,
}

/// Where durability stands: every write numbered up to `writes` is on a
/// majority, or a copy failed and nothing more will be.
#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    writes: u64,
    broken: bool,
}

/// The queue of writes, numbered in the order they are queued.
struct Queue {
    next: u64,
    tx: mpsc::UnboundedSender<Pending>,
}

/// What an answer must wait for before it is given: its own write, if it
/// made one, and every write it read.
#[derive(Default)]
pub struct Wait {
    seen: u64,
    /// The answer's own write: its number and its outcome.
    write: Option<(u64, oneshot::Receiver<bool>)>,
}

impl Wait {
    /// The answer reads what write `number` made.
    pub fn saw(&mut self, number: u64) {
        self.seen = self.seen.max(number);
    }
}

/// The leader's side: queues writes and answers each once a majority
/// holds it.
pub struct Leader {
    queue: std::sync::Mutex<Queue>,
    durable: watch::Receiver<Durable>,
}

fn lost() -> Status {
    Status::unavailable(
        "replicated floor: a write could not be made durable on a majority \
         (the leader's fdatasync failed or both followers are gone)",
    )
}

/// Raise the number `at` picks out of a watched value to `n`, if `n` is
/// higher (answers arrive from two followers, batches finish out of
/// order; the highest counts).
fn raise<T>(w: &watch::Sender<T>, n: u64, at: impl Fn(&mut T) -> &mut u64) {
    w.send_if_modified(|v| {
        let a = at(v);
        let newer = n > *a;
        if newer {
            *a = n;
        }
        newer
    });
}

/// Answer a sent batch once the leader's copy and a follower's hold it
/// (`local` and `remote`: the newest batch number each has synced), and
/// move the durable mark past its writes. Its `slot` frees as soon as
/// the batch is held (or lost).
async fn finish_batch(
    n: u64,
    batch: Vec<Pending>,
    slot: tokio::sync::OwnedSemaphorePermit,
    (mut local, mut remote): (watch::Receiver<u64>, watch::Receiver<u64>),
    durable: Arc<watch::Sender<Durable>>,
    counters: Arc<Counters>,
) {
    let held =
        local.wait_for(|a| *a >= n).await.is_ok() && remote.wait_for(|a| *a >= n).await.is_ok();
    drop(slot);
    if held {
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let last = batch.last().map_or(0, |p| p.number);
        raise(&durable, last, |d| &mut d.writes);
    } else {
        durable.send_modify(|d| d.broken = true);
    }
    for p in batch {
        let _ = p.done.send(held);
    }
}

impl Leader {
    /// Queue `bytes` (the encoded request) as this answer's write, once:
    /// a later call for the same answer adds nothing. Returns the write's
    /// number, for whoever reads what it made. Call with the map locked,
    /// so writes are numbered in the order they changed it.
    pub fn write(&self, wait: &mut Wait, bytes: &mut Option<Vec<u8>>) -> u64 {
        if let Some((number, _)) = &wait.write {
            return *number;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let number = q.next;
        q.next += 1;
        let (done, answer) = oneshot::channel();
        let bytes = bytes.take().unwrap_or_default();
        // A send fails only once the batching task is gone; the answer
        // then fails with it.
        let _ = q.tx.send(Pending {
            number,
            bytes,
            done,
        });
        wait.write = Some((number, answer));
        number
    }

    /// Wait until the answer's write and every write it read are durable
    /// on a majority.
    pub async fn settle(&self, wait: Wait) -> Result<(), Status> {
        if let Some((_, answer)) = wait.write {
            if answer.await != Ok(true) {
                return Err(lost());
            }
        }
        if wait.seen > 0 {
            let mut durable = self.durable.clone();
            let d = durable
                .wait_for(|d| d.broken || d.writes >= wait.seen)
                .await
                .map_err(|_| lost())?;
            if d.writes < wait.seen {
                return Err(lost());
            }
        }
        Ok(())
    }

    /// Connect to the followers at `peers` and start the batching task on
    /// the current runtime.
    async fn start(peers: Vec<String>, counters: Arc<Counters>) -> anyhow::Result<Self> {
        // The newest batch synced on the leader's copy, and on a follower's.
        let (local_tx, local) = watch::channel(0u64);
        let (remote_tx, remote) = watch::channel(0u64);
        let remote_tx = Arc::new(remote_tx);
        let (durable_tx, durable) = watch::channel(Durable::default());
        let durable_tx = Arc::new(durable_tx);
        let mut outs = Vec::new();
        for (index, addr) in peers.into_iter().enumerate() {
            let mut client = RaftPeerClient::connect(format!("http://{addr}"))
                .await
                .with_context(|| format!("replicated floor: connect to follower {addr}"))?;
            let (out, rx) = mpsc::unbounded_channel();
            let mut answers = client
                .append_stream(UnboundedReceiverStream::new(rx))
                .await
                .with_context(|| format!("replicated floor: open the stream to {addr}"))?
                .into_inner();
            let remote_tx = remote_tx.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Some(Ok(p)) = answers.next().await {
                    counters.follower_syncs[index].store(word(&p, 1), Ordering::Relaxed);
                    raise(&remote_tx, word(&p, 0), |a| a);
                }
            });
            outs.push(out);
        }
        drop(remote_tx);
        // The leader's own copy, written in order as a follower writes.
        let (to_local, local_input) = mpsc::unbounded_channel();
        let mut local_synced = write_in_order(
            UnboundedReceiverStream::new(local_input),
            CopyFile::create()?,
        );
        let dt = durable_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok((newest, _))) = local_synced.recv().await {
                raise(&local_tx, newest, |a| a);
            }
            // The leader's copy failed: nothing more becomes durable.
            dt.send_modify(|d| d.broken = true);
        });
        let (tx, mut queued) = mpsc::unbounded_channel::<Pending>();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            let mut batch_number = 0u64;
            while let Some(first) = queued.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while let Ok(p) = queued.try_recv() {
                    batch.push(p);
                }
                batch_number += 1;
                let n = batch_number;
                let size = batch.iter().map(|p| 4 + p.bytes.len()).sum::<usize>();
                let mut data = Vec::with_capacity(8 + size);
                data.extend_from_slice(&n.to_le_bytes());
                for p in &batch {
                    data.extend_from_slice(&(p.bytes.len() as u32).to_le_bytes());
                    data.extend_from_slice(&p.bytes);
                }
                // One copy of the bytes per follower, the original for the
                // leader's own file.
                for out in &outs {
                    let _ = out.send(Payload {
                        data: data.clone(),
                        ..Default::default()
                    });
                }
                let _ = to_local.send(Payload {
                    data,
                    ..Default::default()
                });
                let copies = (local.clone(), remote.clone());
                let (counters, durable_tx) = (counters.clone(), durable_tx.clone());
                tokio::spawn(finish_batch(n, batch, slot, copies, durable_tx, counters));
            }
        });
        Ok(Leader {
            queue: std::sync::Mutex::new(Queue { next: 1, tx }),
            durable,
        })
    }
}

/// The follower processes; stopped when the run ends.
pub struct Followers(Vec<std::process::Child>);

impl Followers {
    /// Kill the followers and wait for them; returns how many were still
    /// running.
    pub fn stop(&mut self) -> usize {
        let mut were_running = 0;
        for mut child in self.0.drain(..) {
            if matches!(child.try_wait(), Ok(None)) {
                were_running += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        were_running
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Start two follower processes of `program` (`idemkv`); returns them and
/// their addresses.
fn start_followers(program: &Path) -> anyhow::Result<(Followers, Vec<String>)> {
    use std::io::BufRead;
    let mut followers = Followers(Vec::new());
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let mut child = std::process::Command::new(program)
            .arg("floor-follower")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("replicated floor: start {}", program.display()))?;
        let out = child.stdout.take();
        followers.0.push(child);
        let mut line = String::new();
        if let Some(out) = out {
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .context("replicated floor: read a follower's address")?;
        }
        let addr: std::net::SocketAddr = line.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "replicated floor: `{} floor-follower` printed {:?}, not its address \
                 (is it idemkv? see --floor-follower)",
                program.display(),
                line.trim()
            )
        })?;
        addrs.push(addr.to_string());
    }
    Ok((followers, addrs))
}

/// `idemkv floor-follower`: serve one follower on a free loopback port,
/// print its address, and exit when stdin closes (the bench ended).
pub async fn follow() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("floor-follower: bind a loopback port")?;
    let follower = Follower {
        file: CopyFile::create()?,
    };
    crate::out::print_line(format_args!("{}", listener.local_addr()?));
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let incoming =
        tokio_stream::wrappers::TcpListenerStream::new(listener).map(super::floor::no_delay);
    tonic::transport::Server::builder()
        .add_service(RaftPeerServer::new(follower))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Start the follower processes (`program floor-follower`) and return
/// them with a future that, on the leader's runtime, connects to them and
/// starts the leader's batching task.
pub fn prepare(
    program: &Path,
    counters: Arc<Counters>,
) -> anyhow::Result<(
    Followers,
    impl std::future::Future<Output = anyhow::Result<Leader>> + Send,
)> {
    let (followers, peers) = start_followers(program)?;
    Ok((
        followers,
        async move { Leader::start(peers, counters).await },
    ))
}
