//! One idemkv node in-process: storage, Raft, the peer server, the client API
//! server and the leader's retention sweeper. `Node::start` returns once both
//! ports are bound (port 0 picks free ones); `shutdown` stops every task and
//! leaves the data durable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::{Server, ServerTlsConfig};

use crate::api::{ClusterService, IdempotencyService};
use crate::auth::Auth;
use crate::caps::{AwaitCaps, CappedHealth, InFlightLayer};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::pb::api::cluster_server::ClusterServer;
use crate::pb::api::idempotency_server::IdempotencyServer;
use crate::pb::peer::raft_peer_server::RaftPeerServer;
use crate::raft::consensus::Consensus;
use crate::raft::network::Peers;
use crate::raft::service::PeerService;
use crate::raft::{NodeId, PeerNode, Raft};
use crate::record::{Command, Outcome};
use crate::store::{Store, Syncer};
use crate::wire::{MAX_API_MESSAGE, MAX_PEER_MESSAGE};

pub struct Node {
    pub id: NodeId,
    /// The bound client API address.
    pub api_addr: SocketAddr,
    /// The bound peer address.
    pub peer_addr: SocketAddr,
    /// The bound metrics address, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// How clients and peers reach this node (advertised addresses).
    pub member: PeerNode,
    consensus: Arc<Consensus>,
    auth: Option<Arc<Auth>>,
    syncer: Arc<Syncer>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

impl Node {
    pub async fn start(cfg: NodeConfig) -> Result<Node> {
        let store = Store::open_with(
            &cfg.data_dir,
            cfg.clock.clone(),
            crate::store::SEGMENT_BYTES,
        )?;
        let api_listener = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| Error::invalid("listen", format!("cannot bind {}: {e}", cfg.listen)))?;
        let peer_listener = TcpListener::bind(&cfg.peer_listen).await.map_err(|e| {
            Error::invalid(
                "peer_listen",
                format!("cannot bind {}: {e}", cfg.peer_listen),
            )
        })?;
        let api_addr = api_listener.local_addr()?;
        let peer_addr = peer_listener.local_addr()?;
        let member = PeerNode {
            api_addr: cfg
                .advertise_api
                .clone()
                .unwrap_or_else(|| api_addr.to_string()),
            raft_addr: cfg
                .advertise_peer
                .clone()
                .unwrap_or_else(|| peer_addr.to_string()),
        };

        let rejoin = store.log.rejoin();
        let raft_config = openraft::Config {
            cluster_name: "idemkv".into(),
            heartbeat_interval: cfg.heartbeat.as_millis() as u64,
            election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
            election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.snapshot_keep_logs,
            // Off while this node must first regain a damaged entry it may
            // have acknowledged (store/rejoin.rs); `Consensus::rejoin`
            // turns it on.
            enable_elect: rejoin.until().is_none(),
            // Such a node's log is behind what it acknowledged: the leader
            // must search for the match again instead of stalling on its
            // old progress. A commit is never withdrawn by this.
            allow_log_reversion: Some(true),
            // A restarted leader must win a new election: a power cut may
            // have taken entries from its log that the followers hold, and
            // leading on in its old term it would write other entries under
            // those entries' log ids; the followers would take them for the
            // ones they have and the replicas would differ for good
            // (tests/damaged_log.rs). openraft restores it by default.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| internal("raft config", e))?;
        let tls = match &cfg.tls {
            Some(files) => Some(files.load().map_err(|e| Error::invalid("tls", e))?),
            None => None,
        };
        let auth = match &cfg.auth_tokens {
            Some(path) => Some(Arc::new(
                Auth::load(path).map_err(|e| Error::invalid("auth_tokens", e))?,
            )),
            None => None,
        };
        let caps = &cfg.caps;
        let peers = Peers::new(
            tls.as_ref().map(|t| t.peer_client.clone()),
            store.identity.clone(),
            store.log.encodings(),
        );
        let sm = store.state_machine.clone();
        store.log.set_node_id(cfg.id);
        let raft = Raft::new(
            cfg.id,
            Arc::new(raft_config),
            peers.clone(),
            store.log,
            sm.clone(),
        )
        .await
        .map_err(|e| internal("raft start", e))?;
        let limits = cfg.limits.clone();
        let check: crate::raft::consensus::CommandCheck =
            Arc::new(move |c| crate::api::validate::command(&limits, c));
        let quota = crate::config::quota_bytes(cfg.quota_bytes, &cfg.data_dir);
        tracing::info!(quota_bytes = quota, "data-size quota");
        let consensus = Consensus::new(
            cfg.id,
            raft,
            sm,
            peers,
            cfg.request_timeout,
            crate::raft::consensus::Admission {
                check,
                quota_bytes: quota,
            },
            rejoin,
        );
        let (shutdown, _) = watch::channel(false);
        let mut tasks = Vec::new();

        // Peer port.
        let peer_service = PeerService::new(
            consensus.clone(),
            cfg.data_dir.join("snapshots"),
            caps.peer_max_snapshot_bytes,
            shutdown.subscribe(),
            cfg.peer_members_only,
        );
        let peer_server = server_builder(
            tls.as_ref().map(|t| &t.peer_server),
            caps.max_streams_per_connection,
            Some(peer_keepalive(&cfg)),
            "peer port",
        )?
        .layer(InFlightLayer::new(
            caps.peer_max_in_flight,
            "peer_max_in_flight",
            "peer_max_message_bytes",
        ))
        .add_service(
            RaftPeerServer::new(peer_service)
                .max_decoding_message_size(caps.peer_max_message_bytes)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
        );
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let incoming = no_delay(peer_listener);
            if let Err(e) = peer_server
                .serve_with_incoming_shutdown(incoming, signal)
                .await
            {
                tracing::error!(error = %e, "peer server stopped");
            }
        }));

        // Client port.
        // Health: Check uncounted, Watch streams capped.
        let health_reporter = tonic_health::server::HealthReporter::new();
        health_reporter
            .set_serving::<IdempotencyServer<IdempotencyService>>()
            .await;
        let health_service = tonic_health::pb::health_server::HealthServer::new(CappedHealth::new(
            tonic_health::server::HealthService::from_health_reporter(health_reporter.clone()),
            caps.max_health_watches,
        ));
        // Reflection in both versions: common tools still ask for v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| internal("reflection v1", e))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| internal("reflection v1alpha", e))?;
        let client_keepalive =
            Some(Duration::from_millis(caps.client_keepalive_ms)).filter(|d| !d.is_zero());
        let api_server = server_builder(
            tls.as_ref().map(|t| &t.api),
            caps.max_streams_per_connection,
            client_keepalive,
            "client port",
        )?
        .layer(InFlightLayer::new(
            caps.max_in_flight,
            "max_in_flight",
            "max_message_bytes",
        ))
        .add_service(
            IdempotencyServer::new(IdempotencyService::new(
                consensus.clone(),
                cfg.limits.clone(),
                auth.clone(),
                AwaitCaps::new(caps.max_awaits, caps.max_awaits_per_namespace),
            ))
            .max_decoding_message_size(caps.max_message_bytes)
            .max_encoding_message_size(MAX_API_MESSAGE),
        )
        .add_service(
            ClusterServer::new(ClusterService::new(
                consensus.clone(),
                member.api_addr.clone(),
                auth.clone(),
            ))
            .max_decoding_message_size(caps.max_message_bytes),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
        let mut stop = shutdown.subscribe();
        tasks.push(tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let incoming = no_delay(api_listener);
            if let Err(e) = api_server
                .serve_with_incoming_shutdown(incoming, signal)
                .await
            {
                tracing::error!(error = %e, "api server stopped");
            }
        }));

        let metrics_addr = match &cfg.metrics_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr).await.map_err(|e| {
                    Error::invalid("metrics_listen", format!("cannot bind {addr:?}: {e}"))
                })?;
                let bound = l.local_addr().ok();
                let c = consensus.clone();
                let gauges: crate::metrics::GaugeSource = Arc::new(move || {
                    let s = c.status();
                    let (data_bytes, quota_bytes) = c.data_size();
                    crate::metrics::RaftGauges {
                        term: s.term,
                        is_leader: s.role == "leader",
                        commit_index: s.commit_index,
                        applied_index: s.applied_index,
                        data_bytes,
                        quota_bytes,
                    }
                });
                tasks.push(tokio::spawn(crate::metrics::serve(
                    l,
                    gauges,
                    shutdown.subscribe(),
                )));
                bound
            }
            None => None,
        };

        tasks.push(tokio::spawn(sweeper(
            consensus.clone(),
            cfg.clone(),
            shutdown.subscribe(),
        )));
        {
            let consensus = consensus.clone();
            tasks.push(tokio::spawn(async move { consensus.rejoin().await }));
        }
        tracing::info!(id = cfg.id, api = %api_addr, peer = %peer_addr, "node started");
        Ok(Node {
            id: cfg.id,
            api_addr,
            peer_addr,
            metrics_addr,
            member,
            consensus,
            auth,
            syncer: store.syncer,
            shutdown,
            tasks,
        })
    }

    pub fn consensus(&self) -> &Arc<Consensus> {
        &self.consensus
    }

    /// The bearer-token table, when auth is on.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.auth.as_ref()
    }

    /// Make this node's `members` the initial voters of a new cluster.
    pub async fn initialize(&self, members: BTreeMap<NodeId, PeerNode>) -> Result<()> {
        self.consensus.initialize(members).await
    }

    /// Whether this node has ever been part of a cluster (its data directory
    /// holds a vote or log).
    pub async fn is_initialized(&self) -> bool {
        self.consensus.is_initialized().await
    }

    /// Stop serving, stop Raft, and make everything written durable.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.consensus.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        // The servers drain open calls first; a peer that keeps a call open
        // must not hold the shutdown forever.
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                tracing::warn!("a server did not drain within 5 s; stopping it");
                t.abort();
            }
        }
        if let Err(e) = self.syncer.sync_now() {
            tracing::error!(error = %e, "final sync failed");
        }
        self.syncer.close();
        tracing::info!(id = self.id, "node stopped");
    }
}

/// How long a peer connection may stay quiet before the peer port pings
/// it, and how long the ping may go unanswered before the connection is
/// closed: five election timeouts (the wait for the answer at most
/// [`KEEPALIVE_ANSWER_MAX`]). A peer that hung or vanished
/// without closing its connection (a frozen VM, a host cut off by a
/// partition) would otherwise keep the connection and its streams' tasks
/// on this node for good. A live peer's connection answers at once, busy
/// ones are not pinged at all, and a leader unheard of for that long has
/// been replaced (it reconnects if it comes back).
fn peer_keepalive(cfg: &NodeConfig) -> Duration {
    cfg.election_timeout.1.saturating_mul(5)
}

/// The longest a port waits for the answer to a keepalive ping.
const KEEPALIVE_ANSWER_MAX: Duration = Duration::from_secs(20);

/// A server for one port: TLS when configured, `streams` HTTP/2 streams per
/// connection, and a connection quiet for `keepalive` pinged, then closed
/// if the ping goes unanswered as long (at most [`KEEPALIVE_ANSWER_MAX`]).
fn server_builder(
    tls: Option<&ServerTlsConfig>,
    streams: u32,
    keepalive: Option<Duration>,
    port: &str,
) -> Result<Server> {
    let builder = Server::builder()
        .max_concurrent_streams(Some(streams))
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive.map(|k| k.min(KEEPALIVE_ANSWER_MAX)));
    match tls {
        Some(t) => builder
            .tls_config(t.clone())
            .map_err(|e| Error::invalid("tls", format!("{port}: {e}"))),
        None => Ok(builder),
    }
}

/// On the leader, propose sweeps while the expiry index has due records.
async fn sweeper(consensus: Arc<Consensus>, cfg: NodeConfig, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(cfg.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        while consensus.sweep_due() {
            let sweep = Command::Sweep {
                limit: cfg.sweep_limit,
            };
            match consensus.write(sweep).await {
                Ok(Outcome::Swept { removed }) if removed > 0 => {
                    tracing::debug!(removed, "swept expired records");
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "sweep not committed");
                    break;
                }
            }
        }
    }
}

/// Accepted connections with Nagle's algorithm off: tonic ignores its own
/// `tcp_nodelay` for a caller's listener, and small replies held back for
/// a delayed ACK cost 40 ms each.
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot turn Nagle off on a connection");
        }
        Ok(conn)
    })
}
