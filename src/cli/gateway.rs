//! `idemkv gateway`: the HTTP Idempotency-Key proxy (SPEC §8) as a
//! process: parse its settings, serve until Ctrl-C or SIGTERM.
//!
//! Settings come from flags, then `IDEMKV_GATEWAY_*` (and the client's
//! `IDEMKV_*`) variables, then the TOML file given with `--config`, then the
//! defaults. The file's keys are the flags' names with `_` for `-`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderName, Method};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;

use idemkv::gateway::{Gateway, GatewayConfig};
use idemkv::wire::DEFAULT_ENDPOINTS;
use idemkv::Client;

fn ms(s: &str) -> Result<Duration, String> {
    idemkv::bench::parse_duration_ms(s).map(Duration::from_millis)
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// TOML file with any of the settings below, keyed by their names with
    /// `_` for `-` (`upstream = "http://…"`, `lease = "10s"`,
    /// `methods = ["POST"]`); flags and variables win over it.
    #[arg(long, env = "IDEMKV_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP on.
    #[arg(long, env = "IDEMKV_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The service behind the gateway: http://host:port (a path prefix is
    /// kept).
    #[arg(long, env = "IDEMKV_GATEWAY_UPSTREAM")]
    pub upstream: Option<String>,
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
    /// Path prefixes, by whole segments (`/orders` covers `/orders/7`, not
    /// `/orders-archive`), where a guarded method must carry
    /// Idempotency-Key (400 without); repeat or comma-separate.
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
    /// How long the upstream may take to answer (and send a body the
    /// gateway saves); past it the claim is released, so a retry calls the
    /// upstream again, and the caller gets 504.
    #[arg(long, env = "IDEMKV_GATEWAY_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = ms)]
    pub upstream_timeout: Duration,
    /// Largest request body taken, and response body saved, in bytes.
    #[arg(long, env = "IDEMKV_GATEWAY_MAX_BODY", default_value_t = 1_000_000)]
    pub max_body: usize,
    #[command(flatten)]
    pub conn: super::ClientConnArgs,
}

/// A list in the config file: an array of strings or one comma-separated
/// string, as the flag takes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum List {
    Many(Vec<String>),
    One(String),
}

impl List {
    fn items(self) -> Vec<String> {
        match self {
            List::Many(v) => v,
            List::One(s) => s.split(',').map(str::to_string).collect(),
        }
    }
}

/// A duration in the config file: `"30s"`, `"250ms"`, or a number of ms.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Span {
    Ms(u64),
    Text(String),
}

impl Span {
    fn get(self) -> Result<Duration, String> {
        match self {
            Span::Ms(n) => Ok(Duration::from_millis(n)),
            Span::Text(t) => ms(&t),
        }
    }
}

/// The config file: every setting of [`GatewayArgs`], all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    listen: Option<String>,
    upstream: Option<String>,
    endpoints: Option<List>,
    namespace: Option<String>,
    methods: Option<List>,
    require_key: Option<List>,
    scope_header: Option<String>,
    save_headers: Option<List>,
    lease: Option<Span>,
    retention: Option<Span>,
    wait: Option<Span>,
    save_5xx: Option<bool>,
    metrics_listen: Option<String>,
    max_body: Option<usize>,
    upstream_timeout: Option<Span>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    auth_token: Option<String>,
}

impl GatewayFile {
    fn read(path: &Path) -> anyhow::Result<GatewayFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config: cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config: {}", path.display()))
    }
}

impl GatewayArgs {
    /// Fill every setting not given by flag or variable from the file at
    /// `--config`; `matches` are the `gateway` subcommand's, which say
    /// where each value came from.
    pub fn with_file(mut self, matches: Option<&ArgMatches>) -> anyhow::Result<GatewayArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let f = GatewayFile::read(&path)?;
        // A value from the command line or the environment stays.
        let open = |id: &str| {
            !matches.is_some_and(|m| {
                matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
        };
        let span = |key: &str, v: Span| {
            v.get()
                .map_err(|e| anyhow::anyhow!("config: {}: {key}: {e}", path.display()))
        };
        if let Some(v) = f.listen.filter(|_| open("listen")) {
            self.listen = v;
        }
        if let Some(v) = f.upstream.filter(|_| open("upstream")) {
            self.upstream = Some(v);
        }
        if let Some(v) = f.endpoints.filter(|_| open("endpoints")) {
            self.endpoints = v.items().join(",");
        }
        if let Some(v) = f.namespace.filter(|_| open("namespace")) {
            self.namespace = v;
        }
        if let Some(v) = f.methods.filter(|_| open("methods")) {
            self.methods = v.items();
        }
        if let Some(v) = f.require_key.filter(|_| open("require_key")) {
            self.require_key = v.items();
        }
        if let Some(v) = f.scope_header.filter(|_| open("scope_header")) {
            self.scope_header = Some(v);
        }
        if let Some(v) = f.save_headers.filter(|_| open("save_headers")) {
            self.save_headers = v.items();
        }
        if let Some(v) = f.save_5xx.filter(|_| open("save_5xx")) {
            self.save_5xx = v;
        }
        if let Some(v) = f.metrics_listen.filter(|_| open("metrics_listen")) {
            self.metrics_listen = Some(v);
        }
        if let Some(v) = f.max_body.filter(|_| open("max_body")) {
            self.max_body = v;
        }
        if let Some(v) = f.lease.filter(|_| open("lease")) {
            self.lease = span("lease", v)?;
        }
        if let Some(v) = f.retention.filter(|_| open("retention")) {
            self.retention = span("retention", v)?;
        }
        if let Some(v) = f.wait.filter(|_| open("wait")) {
            self.wait = span("wait", v)?;
        }
        if let Some(v) = f.upstream_timeout.filter(|_| open("upstream_timeout")) {
            self.upstream_timeout = span("upstream_timeout", v)?;
        }
        let conn = &mut self.conn;
        for (id, from, to) in [
            ("tls_ca", f.tls_ca, &mut conn.tls_ca),
            ("tls_cert", f.tls_cert, &mut conn.tls_cert),
            ("tls_key", f.tls_key, &mut conn.tls_key),
        ] {
            if from.is_some() && open(id) {
                *to = from;
            }
        }
        if f.auth_token.is_some() && open("auth_token") {
            conn.auth_token = f.auth_token;
        }
        Ok(self)
    }

    fn config(&self) -> anyhow::Result<GatewayConfig> {
        let Some(up) = &self.upstream else {
            anyhow::bail!(
                "upstream: none given (--upstream, IDEMKV_GATEWAY_UPSTREAM or `upstream` in --config)"
            );
        };
        let upstream: axum::http::Uri = up
            .parse()
            .with_context(|| format!("upstream: {up:?} is not a URL"))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            anyhow::bail!(
                "upstream: {up:?} must be http://host:port (https upstreams are not supported)"
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
            upstream_timeout: self.upstream_timeout,
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
    say!(
        "idemkv gateway on http://{addr} -> {} (records in namespace {:?} at {})",
        cfg.upstream,
        a.namespace,
        a.endpoints
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(m) = &a.metrics_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .with_context(|| format!("cannot listen on {m} for metrics"))?;
        say!(
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
    // A second signal stops waiting.
    let finished = tokio::select! {
        done = gw.finish() => done,
        _ = super::serve::wait_for_signal() => false,
    };
    if !finished {
        tracing::warn!(
            "claimed requests still running at exit: their keys stay held until the lease runs out"
        );
    }
    let _ = stop.send(true);
    Ok(())
}
