//! `idemkv gateway`: the HTTP Idempotency-Key proxy (SPEC §8) as a
//! process: parse its settings, serve until Ctrl-C or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderName, Method};
use clap::Args;

use idemkv::gateway::{Gateway, GatewayConfig};
use idemkv::wire::DEFAULT_ENDPOINTS;
use idemkv::Client;

fn ms(s: &str) -> Result<Duration, String> {
    idemkv::bench::parse_duration_ms(s).map(Duration::from_millis)
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to serve HTTP on.
    #[arg(long, env = "IDEMKV_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The service behind the gateway: http://host:port (a path prefix is
    /// kept).
    #[arg(long, env = "IDEMKV_GATEWAY_UPSTREAM")]
    pub upstream: String,
    /// Client endpoints of the idemkv cluster, comma-separated.
    #[arg(long, env = "IDEMKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS)]
    pub endpoints: String,
    /// The idemkv namespace of the gateway's records.
    #[arg(long, env = "IDEMKV_GATEWAY_NAMESPACE", default_value = "http")]
    pub namespace: String,
    /// Methods guarded when a request carries Idempotency-Key.
    #[arg(
        long,
        env = "IDEMKV_GATEWAY_METHODS",
        default_value = "POST,PATCH",
        value_delimiter = ','
    )]
    pub methods: Vec<String>,
    /// Path prefixes where a guarded method must carry Idempotency-Key
    /// (400 without); repeat or comma-separate.
    #[arg(long, env = "IDEMKV_GATEWAY_REQUIRE_KEY", value_delimiter = ',')]
    pub require_key: Vec<String>,
    /// Request header whose value scopes keys, e.g. Authorization (stored
    /// hashed): one caller's key never meets another's.
    #[arg(long, env = "IDEMKV_GATEWAY_SCOPE_HEADER")]
    pub scope_header: Option<String>,
    /// Response headers saved and replayed with the status and body.
    #[arg(
        long,
        env = "IDEMKV_GATEWAY_SAVE_HEADERS",
        default_value = "content-type,location",
        value_delimiter = ','
    )]
    pub save_headers: Vec<String>,
    /// Lease of a claim while the upstream runs (renewed every third).
    #[arg(long, env = "IDEMKV_GATEWAY_LEASE", default_value = "30s", value_parser = ms)]
    pub lease: Duration,
    /// How long a saved response is replayed.
    #[arg(long, env = "IDEMKV_GATEWAY_RETENTION", default_value = "24h", value_parser = ms)]
    pub retention: Duration,
    /// How long a request whose key is in progress waits for the first
    /// one's response before 409 (0: at once).
    #[arg(long, env = "IDEMKV_GATEWAY_WAIT", default_value = "0", value_parser = ms)]
    pub wait: Duration,
    /// Save and replay 5xx responses too (by default a 5xx releases the
    /// claim, so a retry calls the upstream again).
    #[arg(long, env = "IDEMKV_GATEWAY_SAVE_5XX")]
    pub save_5xx: bool,
    /// Serve Prometheus `GET /metrics` here (`idemkv_gateway_requests` by
    /// outcome); none: not served.
    #[arg(long, env = "IDEMKV_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Largest request body taken, and response body saved, in bytes.
    #[arg(long, env = "IDEMKV_GATEWAY_MAX_BODY", default_value_t = 1_000_000)]
    pub max_body: usize,
    #[command(flatten)]
    pub conn: super::ClientConnArgs,
}

impl GatewayArgs {
    fn config(&self) -> anyhow::Result<GatewayConfig> {
        let upstream: axum::http::Uri = self
            .upstream
            .parse()
            .with_context(|| format!("upstream: {:?} is not a URL", self.upstream))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            anyhow::bail!(
                "upstream: {:?} must be http://host:port (https upstreams are not supported)",
                self.upstream
            );
        }
        let methods = self
            .methods
            .iter()
            .map(|m| Method::from_bytes(m.trim().to_uppercase().as_bytes()))
            .collect::<Result<_, _>>()
            .context("methods: not an HTTP method")?;
        let header = |h: &str| {
            HeaderName::from_bytes(h.trim().to_lowercase().as_bytes())
                .with_context(|| format!("{h:?} is not a header name"))
        };
        Ok(GatewayConfig {
            upstream,
            namespace: self.namespace.clone(),
            methods,
            require_key: self.require_key.clone(),
            scope_header: self.scope_header.as_deref().map(header).transpose()?,
            save_headers: self
                .save_headers
                .iter()
                .filter(|h| !h.trim().is_empty())
                .map(|h| header(h))
                .collect::<anyhow::Result<_>>()?,
            lease: self.lease,
            retention: self.retention,
            wait: self.wait,
            save_5xx: self.save_5xx,
            max_body: self.max_body,
        })
    }
}

pub async fn run(a: GatewayArgs) -> anyhow::Result<()> {
    let cfg = a.config()?;
    let mut opts = a.conn.options()?;
    // Across a leader change, not longer: a caller waiting on an
    // unreachable store gets 503 and Retry-After instead.
    opts.retry_for = Duration::from_secs(3);
    let client = Client::with_options(a.endpoints.split(','), opts)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "idemkv gateway on http://{addr} -> {} (records in namespace {:?} at {})",
        a.upstream, a.namespace, a.endpoints
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(m) = &a.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("cannot listen on {m} for metrics"))?;
        println!(
            "idemkv gateway: metrics on http://{}/metrics",
            l.local_addr()?
        );
        // A gateway has no Raft state: those gauges read 0 here.
        let gauges: idemkv::metrics::GaugeSource = std::sync::Arc::new(Default::default);
        tokio::spawn(idemkv::metrics::serve(l, gauges, stopped));
    }
    let gw = Gateway::new(cfg, client);
    axum::serve(listener, gw.router())
        .with_graceful_shutdown(super::serve::wait_for_signal())
        .await?;
    let _ = stop.send(true);
    Ok(())
}
