//! Every setting of a node in one struct, [`Settings`]: its field names are
//! the config file's keys, the flags (`--peer-listen`) and the environment
//! variables (`IDEMKV_PEER_LISTEN`); the nested tables are set with
//! `--set limits.batch_max=5` and `IDEMKV_LIMITS__BATCH_MAX=5`. Its
//! `Default` reads [`NodeConfig::new`]'s, the one place defaults are written. [`merge`] layers the
//! sources: flags (and `--set`) over environment over the file over the
//! defaults.
//!
//! Nothing here starts a node; `node_config` turns the merged settings
//! into the [`NodeConfig`] a node starts from.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::{Deserialize, Serialize};

use crate::config::{Caps, Limits, NodeConfig};
use crate::tls::TlsFiles;

/// A node's settings. Fields without a default are `Option`s.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// This node's id (a positive integer, unique in the cluster).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Client API address [default: 127.0.0.1:7000+id].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Peer (Raft) address [default: 127.0.0.1:7100+id].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
    /// Client address to advertise, if not the bound one.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_api: Option<String>,
    /// Peer address to advertise, if not the bound one.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer: Option<String>,
    /// Data directory [default: .idemkv/node-ID].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// The initial members: `ID=API_ADDR/PEER_ADDR,...` (used with --init).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<String>,
    /// Initialise a new cluster from --peers (ignored if this node's data
    /// already belongs to a cluster).
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          default_value_t = Settings::default().init, value_parser = BoolishValueParser::new())]
    pub init: bool,
    /// This node's TLS certificate (PEM): serve TLS on both ports. Also its
    /// identity towards peers. Needs --tls-key and --tls-ca.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) whose certificates peers must present (the peer port is
    /// always mutual TLS), and clients too with --client-auth.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Require clients of the client port to present a certificate signed
    /// by --tls-ca.
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          default_value_t = Settings::default().client_auth, value_parser = BoolishValueParser::new())]
    pub client_auth: bool,
    /// Bearer-token file (TOML): every client call must carry a token
    /// listed there and may touch only that token's namespaces. Re-read on
    /// SIGHUP.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve the peer port without TLS although --auth-tokens is on and a
    /// peer address is not loopback. Without TLS anyone who can reach the
    /// peer port from a member's address can forward writes past the
    /// tokens; say so explicitly.
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          default_value_t = Settings::default().insecure_peers, value_parser = BoolishValueParser::new())]
    pub insecure_peers: bool,
    /// Serve peer calls only from members' addresses. Turn off where peers
    /// reach each other through address translation, and rely on mutual
    /// TLS alone.
    #[arg(long, num_args = 0..=1, default_missing_value = "true",
          default_value_t = Settings::default().peer_members_only, value_parser = BoolishValueParser::new())]
    pub peer_members_only: bool,
    /// Raft heartbeat interval (ms).
    #[arg(long, default_value_t = Settings::default().heartbeat_ms)]
    pub heartbeat_ms: u64,
    /// Lower end of the randomised election timeout (ms).
    #[arg(long, default_value_t = Settings::default().election_timeout_min_ms)]
    pub election_timeout_min_ms: u64,
    /// Upper end of the randomised election timeout (ms).
    #[arg(long, default_value_t = Settings::default().election_timeout_max_ms)]
    pub election_timeout_max_ms: u64,
    /// How long a request may wait for a quorum before `UNAVAILABLE` (ms).
    #[arg(long, default_value_t = Settings::default().request_timeout_ms)]
    pub request_timeout_ms: u64,
    /// Take a snapshot (and purge the log) every this many entries.
    #[arg(long, default_value_t = Settings::default().snapshot_every)]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (a follower further behind gets
    /// the snapshot instead).
    #[arg(long, default_value_t = Settings::default().snapshot_keep_logs)]
    pub snapshot_keep_logs: u64,
    /// How often the leader looks for records whose retention ran out (ms).
    #[arg(long, default_value_t = Settings::default().sweep_interval_ms)]
    pub sweep_interval_ms: u64,
    /// Most records one sweep entry removes.
    #[arg(long, default_value_t = Settings::default().sweep_limit)]
    pub sweep_limit: u32,
    /// Data-size quota in bytes (records' keys and values): past it, the
    /// NOSPACE alarm is raised and claims are refused until the sweep makes
    /// room. 0: a quarter of the data directory's file system.
    #[arg(long, default_value_t = Settings::default().quota_bytes)]
    pub quota_bytes: u64,
    /// Input limits (SPEC §4): `--set limits.NAME=VALUE`.
    #[arg(skip)]
    pub limits: Limits,
    /// Port caps: `--set caps.NAME=VALUE`.
    #[arg(skip)]
    pub caps: Caps,
}

impl Default for Settings {
    /// The defaults of [`NodeConfig::new`], the one place they are written;
    /// the addresses and the data directory default from the id.
    fn default() -> Self {
        let n = NodeConfig::new(0, PathBuf::new());
        let ms = |d: Duration| d.as_millis() as u64;
        Settings {
            id: None,
            listen: None,
            peer_listen: None,
            advertise_api: None,
            advertise_peer: None,
            data_dir: None,
            metrics_listen: None,
            peers: None,
            init: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            client_auth: false,
            auth_tokens: None,
            insecure_peers: false,
            peer_members_only: n.peer_members_only,
            heartbeat_ms: ms(n.heartbeat),
            election_timeout_min_ms: ms(n.election_timeout.0),
            election_timeout_max_ms: ms(n.election_timeout.1),
            request_timeout_ms: ms(n.request_timeout),
            snapshot_every: n.snapshot_every,
            snapshot_keep_logs: n.snapshot_keep_logs,
            sweep_interval_ms: ms(n.sweep_interval),
            sweep_limit: n.sweep_limit,
            quota_bytes: n.quota_bytes,
            limits: n.limits,
            caps: n.caps,
        }
    }
}

impl Settings {
    /// Every setting with a value of its type, the `Option`s included: the
    /// keys a file, a variable or `--set` may name, and how to read them.
    /// Written out field by field (no `..`), so a new field must be added
    /// here too or this does not compile.
    fn shape() -> toml::Table {
        let s = Settings {
            id: Some(0),
            listen: Some(String::new()),
            peer_listen: Some(String::new()),
            advertise_api: Some(String::new()),
            advertise_peer: Some(String::new()),
            data_dir: Some(PathBuf::new()),
            metrics_listen: Some(String::new()),
            peers: Some(String::new()),
            init: false,
            tls_cert: Some(PathBuf::new()),
            tls_key: Some(PathBuf::new()),
            tls_ca: Some(PathBuf::new()),
            client_auth: false,
            auth_tokens: Some(PathBuf::new()),
            insecure_peers: false,
            peer_members_only: false,
            heartbeat_ms: 0,
            election_timeout_min_ms: 0,
            election_timeout_max_ms: 0,
            request_timeout_ms: 0,
            snapshot_every: 0,
            snapshot_keep_logs: 0,
            sweep_interval_ms: 0,
            sweep_limit: 0,
            quota_bytes: 0,
            limits: Limits::default(),
            caps: Caps::default(),
        };
        table(&s).expect("settings serialise")
    }

    /// Every settable key: `listen`, ..., `limits.batch_max`, ...
    pub fn keys() -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in Settings::shape() {
            match v {
                toml::Value::Table(t) => out.extend(t.keys().map(|n| format!("{k}.{n}"))),
                _ => out.push(k),
            }
        }
        out
    }

    /// The environment variable of `key`: `IDEMKV_PEER_LISTEN`,
    /// `IDEMKV_LIMITS__BATCH_MAX`.
    pub fn env_name(key: &str) -> String {
        format!("IDEMKV_{}", key.replace('.', "__").to_uppercase())
    }

    /// The node configuration these settings describe; defaults that
    /// depend on the id are filled in here. Errors name the setting.
    pub fn node_config(&self) -> Result<NodeConfig, String> {
        let Some(id) = self.id else {
            return Err("id: required (--id, IDEMKV_ID or `id` in the config file)".into());
        };
        if id == 0 {
            return Err("id: must be a positive integer".into());
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!(".idemkv/node-{id}")));
        let mut cfg = NodeConfig::new(id, data_dir);
        cfg.listen = self
            .listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", 7000 + id));
        cfg.peer_listen = self
            .peer_listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", 7100 + id));
        cfg.advertise_api = self.advertise_api.clone();
        cfg.advertise_peer = self.advertise_peer.clone();
        cfg.metrics_listen = self.metrics_listen.clone();
        cfg.heartbeat = Duration::from_millis(self.heartbeat_ms);
        cfg.election_timeout = (
            Duration::from_millis(self.election_timeout_min_ms),
            Duration::from_millis(self.election_timeout_max_ms),
        );
        cfg.request_timeout = Duration::from_millis(self.request_timeout_ms);
        cfg.snapshot_every = self.snapshot_every;
        cfg.snapshot_keep_logs = self.snapshot_keep_logs;
        cfg.sweep_interval = Duration::from_millis(self.sweep_interval_ms);
        cfg.sweep_limit = self.sweep_limit;
        cfg.quota_bytes = self.quota_bytes;
        cfg.limits = self.limits.clone();
        cfg.caps = self.caps.clone();
        cfg.auth_tokens = self.auth_tokens.clone();
        cfg.peer_members_only = self.peer_members_only;
        cfg.tls = self.tls_files()?;
        Ok(cfg)
    }

    /// TLS needs a certificate, its key and the CA together.
    fn tls_files(&self) -> Result<Option<TlsFiles>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                client_auth: self.client_auth,
            })),
            (None, None, None) if !self.client_auth => Ok(None),
            (Some(_), Some(_), None) => Err("tls-ca: --tls-ca is required with TLS (peers \
                 authenticate each other with certificates signed by it)"
                .into()),
            (None, _, _) => Err(
                "tls-cert: --tls-cert is required with --tls-key, --tls-ca or --client-auth".into(),
            ),
            (_, None, _) => Err("tls-key: --tls-key is required with --tls-cert".into()),
        }
    }

    /// The settings a parse took from the command line itself (not clap's
    /// defaults), by field name: those outrank the environment and file.
    pub fn given(m: &ArgMatches) -> BTreeSet<String> {
        let keys = Settings::keys();
        m.ids()
            .map(|id| id.as_str())
            .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
            .filter(|id| keys.iter().any(|k| k == id))
            .map(str::to_string)
            .collect()
    }
}

fn table<T: Serialize>(v: &T) -> Result<toml::Table, String> {
    match toml::Value::try_from(v).map_err(|e| e.to_string())? {
        toml::Value::Table(t) => Ok(t),
        other => Err(format!("not a table: {other}")),
    }
}

/// The sources of one node's settings, highest first.
pub struct Sources<'a> {
    /// What clap parsed from the command line.
    pub flags: &'a Settings,
    /// The top-level settings given on the command line (clap's
    /// `value_source` is `CommandLine`), by field name.
    pub given: &'a BTreeSet<String>,
    /// `--set KEY=VALUE`, in order (a later one wins).
    pub set: &'a [String],
    /// Reads an environment variable.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The TOML file (`--config`), if any.
    pub file: Option<&'a Path>,
}

/// The settings the sources give: each key from the highest source that
/// names it (flags and `--set`, then `IDEMKV_*`, then the file, then the
/// defaults). Unknown keys and values of the wrong type are refused,
/// naming the key and where it came from.
pub fn merge(src: Sources<'_>) -> Result<Settings, String> {
    let shape = Settings::shape();
    let keys = Settings::keys();
    let mut merged = table(&Settings::default())?;
    if let Some(path) = src.file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config: cannot read {}: {e}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).map_err(|e| format!("config: {}: {e}", path.display()))?;
        // Checked on its own first, so an unknown key names the file.
        Settings::deserialize(toml::Value::Table(file.clone()))
            .map_err(|e| format!("config: {}: {e}", path.display()))?;
        for (k, v) in file {
            match (merged.get_mut(&k), v) {
                (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
                (_, v) => {
                    merged.insert(k, v);
                }
            }
        }
    }
    for key in &keys {
        let var = Settings::env_name(key);
        if let Some(raw) = (src.env)(&var) {
            let v = typed(&shape, key, &raw).map_err(|e| format!("{var}: {e}"))?;
            put(&mut merged, key, v);
        }
    }
    let flags = table(src.flags)?;
    for key in src.given {
        match flags.get(key) {
            Some(v) => put(&mut merged, key, v.clone()),
            None => {
                merged.remove(key);
            }
        }
    }
    for s in src.set {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| format!("set: {s:?} is not KEY=VALUE"))?;
        let key = key.trim();
        if !keys.iter().any(|k| k == key) {
            return Err(format!(
                "set: unknown setting {key:?} (one of: {})",
                keys.join(", ")
            ));
        }
        let v = typed(&shape, key, raw.trim()).map_err(|e| format!("set: {key}: {e}"))?;
        put(&mut merged, key, v);
    }
    Settings::deserialize(toml::Value::Table(merged)).map_err(|e| format!("settings: {e}"))
}

/// The value at `key` (`listen`, `limits.batch_max`).
fn at<'a>(t: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    match key.split_once('.') {
        Some((table, k)) => t.get(table).and_then(|v| v.get(k)),
        None => t.get(key),
    }
}

/// `raw` read as the type `key` has in `shape`.
fn typed(shape: &toml::Table, key: &str, raw: &str) -> Result<toml::Value, String> {
    match at(shape, key) {
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Some(toml::Value::Boolean(_)) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not true or false")),
        },
        Some(_) => Ok(toml::Value::String(raw.to_string())),
        None => Err("unknown setting".into()),
    }
}

/// Set `key` (`listen`, `limits.batch_max`) in `t`, making the table.
fn put(t: &mut toml::Table, key: &str, v: toml::Value) {
    match key.split_once('.') {
        Some((table, k)) => {
            let inner = t
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = inner {
                inner.insert(k.to_string(), v);
            }
        }
        None => {
            t.insert(key.to_string(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Args, FromArgMatches};
    use std::collections::BTreeMap;

    /// A value for `key` other than its default.
    fn sample(key: &str) -> toml::Value {
        let defaults = table(&Settings::default()).unwrap();
        let default = at(&defaults, key).cloned();
        let shape = Settings::shape();
        match (typed(&shape, key, "7").ok(), default) {
            (Some(toml::Value::Integer(_)), Some(toml::Value::Integer(n))) => {
                toml::Value::Integer(n + 3)
            }
            (Some(toml::Value::Integer(_)), _) => toml::Value::Integer(7),
            (_, Some(toml::Value::Boolean(b))) => toml::Value::Boolean(!b),
            _ => toml::Value::String(format!("sample-{key}")),
        }
    }

    fn text(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    fn lookup(s: &Settings, key: &str) -> Option<toml::Value> {
        at(&table(s).unwrap(), key).cloned()
    }

    /// Parse `args` the way `idemkv serve` does and merge.
    fn resolve(
        args: &[&str],
        env: &BTreeMap<String, String>,
        file: Option<&Path>,
    ) -> Result<Settings, String> {
        let cmd = Settings::augment_args(clap::Command::new("serve")).arg(
            Arg::new("set")
                .long("set")
                .action(ArgAction::Append)
                .num_args(1),
        );
        let m = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let flags = Settings::from_arg_matches(&m).map_err(|e| e.to_string())?;
        let given = Settings::given(&m);
        let set: Vec<String> = m
            .get_many::<String>("set")
            .map(|v| v.cloned().collect())
            .unwrap_or_default();
        merge(Sources {
            flags: &flags,
            given: &given,
            set: &set,
            env: &|k| env.get(k).cloned(),
            file,
        })
    }

    #[test]
    fn every_setting_is_reachable_by_flag_environment_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Settings::keys();
        assert!(keys.len() > 40, "{keys:?}");
        for key in &keys {
            let want = sample(key);
            let flag_args: Vec<String> = match key.split_once('.') {
                Some(_) => vec!["--set".into(), format!("{key}={}", text(&want))],
                None => vec![format!("--{}", key.replace('_', "-")), text(&want)],
            };
            let flag_args: Vec<&str> = flag_args.iter().map(String::as_str).collect();
            let by_flag = resolve(&flag_args, &BTreeMap::new(), None)
                .unwrap_or_else(|e| panic!("{key} by flag: {e}"));
            assert_eq!(lookup(&by_flag, key), Some(want.clone()), "{key} by flag");

            let env = BTreeMap::from([(Settings::env_name(key), text(&want))]);
            let by_env = resolve(&[], &env, None).unwrap_or_else(|e| panic!("{key} by env: {e}"));
            assert_eq!(lookup(&by_env, key), Some(want.clone()), "{key} by env");

            let mut file = toml::Table::new();
            put(&mut file, key, want.clone());
            let path = dir.path().join("node.toml");
            std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
            let by_file = resolve(&[], &BTreeMap::new(), Some(&path))
                .unwrap_or_else(|e| panic!("{key} by file: {e}"));
            assert_eq!(lookup(&by_file, key), Some(want), "{key} by file");
        }
    }

    #[test]
    fn flags_win_over_the_environment_and_the_environment_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 2\nlisten = \"127.0.0.1:9002\"\nheartbeat_ms = 150\n[limits]\nbatch_max = 5\nkey_max = 9\n",
        )
        .unwrap();
        let env = BTreeMap::from([
            ("IDEMKV_LISTEN".to_string(), "127.0.0.1:9003".to_string()),
            ("IDEMKV_HEARTBEAT_MS".to_string(), "120".to_string()),
            ("IDEMKV_LIMITS__BATCH_MAX".to_string(), "6".to_string()),
        ]);
        let s = resolve(
            &["--listen", "127.0.0.1:9999", "--set", "limits.batch_max=7"],
            &env,
            Some(&path),
        )
        .unwrap();
        assert_eq!(s.id, Some(2), "from the file");
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:9999"), "the flag wins");
        assert_eq!(s.heartbeat_ms, 120, "the environment over the file");
        assert_eq!(s.limits.batch_max, 7, "--set over the environment");
        assert_eq!(s.limits.key_max, 9, "the file over the default");
        assert_eq!(s.limits.owner_max, Limits::default().owner_max);
        let cfg = s.node_config().unwrap();
        assert_eq!(cfg.peer_listen, "127.0.0.1:7102", "derived from the id");
        assert_eq!(cfg.heartbeat, Duration::from_millis(120));
        // A default flag value (clap fills every one in) does not hide the
        // file's: only flags given count.
        let s = resolve(&[], &BTreeMap::new(), Some(&path)).unwrap();
        assert_eq!(s.heartbeat_ms, 150);
    }

    #[test]
    fn bad_settings_are_refused_naming_the_setting() {
        let none = BTreeMap::new();
        let err = resolve(&["--set", "limits.batch_maxx=3"], &none, None).unwrap_err();
        assert!(err.contains("limits.batch_maxx"), "{err}");
        let err = resolve(&["--set", "limits.batch_max=lots"], &none, None).unwrap_err();
        assert!(
            err.contains("limits.batch_max") && err.contains("lots"),
            "{err}"
        );
        let env = BTreeMap::from([("IDEMKV_INIT".to_string(), "maybe".to_string())]);
        let err = resolve(&[], &env, None).unwrap_err();
        assert!(err.starts_with("IDEMKV_INIT"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 1\n[caps]\nmax_in_flite = 3\n").unwrap();
        let err = resolve(&[], &none, Some(&path)).unwrap_err();
        assert!(
            err.contains("max_in_flite") && err.contains("node.toml"),
            "{err}"
        );
        assert!(resolve(&["--init"], &none, None).unwrap().init);
        assert!(
            !resolve(&["--peer-members-only", "false"], &none, None)
                .unwrap()
                .peer_members_only
        );
    }
}
