//! Endpoints as users write them: `host:port`, `http://host:port` or
//! `https://host:port` (with or without a trailing `/`), the forms etcd's
//! tools take. The scheme, when given, decides plaintext or TLS; a bare
//! `host:port` uses TLS when the client has TLS settings (or was given an
//! `https://` endpoint), so the addresses a cluster reports (a leader hint,
//! its members) follow the user's choice.

use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::{ClientError, ClientTls};

/// One endpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    /// `Some(true)` for `https://`, `Some(false)` for `http://`, `None`
    /// when no scheme was written.
    pub tls: Option<bool>,
    /// `host:port`, as the cluster names its members.
    pub authority: String,
}

fn bad(s: &str, why: &str) -> ClientError {
    ClientError::Config(format!(
        "endpoint {s:?}: {why} (write host:port, http://host:port or https://host:port)"
    ))
}

/// Parse one endpoint; an error names it and the forms accepted.
pub fn parse(s: &str) -> Result<Addr, ClientError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(bad(s, "empty"));
    }
    let (tls, rest) = if let Some(r) = t.strip_prefix("https://") {
        (Some(true), r)
    } else if let Some(r) = t.strip_prefix("http://") {
        (Some(false), r)
    } else if let Some((scheme, _)) = t.split_once("://") {
        return Err(bad(s, &format!("unknown scheme {scheme}://")));
    } else {
        (None, t)
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        return Err(bad(s, "only a host and port, no path"));
    }
    let uri: Uri = format!("http://{authority}/")
        .parse()
        .map_err(|e| bad(s, &format!("not an address: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad(s, "no host"));
    }
    if uri.port_u16().is_none() {
        return Err(bad(s, "no port"));
    }
    Ok(Addr {
        tls,
        authority: authority.to_string(),
    })
}

/// The tonic endpoint for `addr`: TLS with `tls`'s CA (or the system's
/// roots for an `https://` endpoint given without one), else plaintext.
/// `default_tls` decides for an address written without a scheme.
pub fn endpoint(
    addr: &Addr,
    tls: Option<&ClientTls>,
    default_tls: bool,
) -> Result<Endpoint, ClientError> {
    if addr.tls == Some(false) && tls.is_some() {
        return Err(ClientError::Config(format!(
            "endpoint http://{} is plaintext but TLS settings were given; write https://{0} or {0}",
            addr.authority
        )));
    }
    let secure = addr.tls.unwrap_or(default_tls || tls.is_some());
    let scheme = if secure { "https" } else { "http" };
    let failed = |e: tonic::transport::Error| {
        ClientError::Config(format!("endpoint {scheme}://{}: {e}", addr.authority))
    };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", addr.authority)).map_err(failed)?;
    if secure {
        let config = match tls {
            Some(t) => t.config(),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        ep = ep.tls_config(config).map_err(failed)?;
    }
    Ok(ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
}

/// HTTP/2 keepalive for a client's connections: while calls are open on
/// one, a ping after `interval` without news from the node, and the
/// connection dropped when a ping goes unanswered for `timeout`. A node
/// that froze (SIGSTOP, a hung host, a partition that drops packets) then
/// fails the calls waiting on it within `interval + timeout`, and they go
/// on to another node instead of waiting out their whole deadline. Idle
/// connections send none.
pub fn with_keepalive(ep: Endpoint, interval: Option<Duration>, timeout: Duration) -> Endpoint {
    match interval {
        Some(i) => ep
            .http2_keep_alive_interval(i)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(false),
        None => ep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_users_write_are_accepted() {
        let a = |tls, authority: &str| Addr {
            tls,
            authority: authority.into(),
        };
        assert_eq!(parse("127.0.0.1:7001").unwrap(), a(None, "127.0.0.1:7001"));
        assert_eq!(
            parse(" http://127.0.0.1:2379 ").unwrap(),
            a(Some(false), "127.0.0.1:2379")
        );
        assert_eq!(
            parse("https://db.example:443/").unwrap(),
            a(Some(true), "db.example:443")
        );
        assert_eq!(parse("[::1]:7001").unwrap(), a(None, "[::1]:7001"));
        assert_eq!(parse("localhost:1").unwrap(), a(None, "localhost:1"));
    }

    #[test]
    fn anything_else_is_refused_naming_the_endpoint_and_the_forms() {
        for s in [
            "",
            "127.0.0.1",
            "http://127.0.0.1",
            "ftp://127.0.0.1:21",
            "unix:///tmp/sock",
            "http://127.0.0.1:2379/v3",
            "127.0.0.1:99999",
            "user@127.0.0.1:1",
            ":7001",
        ] {
            let e = parse(s).expect_err(s).to_string();
            assert!(e.contains(&format!("{:?}", s)), "{e}");
            assert!(
                e.contains("host:port, http://host:port or https://host:port"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_scheme_decides_and_a_bare_address_follows_the_settings() {
        let uri = |s: &str, default_tls| {
            endpoint(&parse(s).unwrap(), None, default_tls)
                .unwrap()
                .uri()
                .to_string()
        };
        assert_eq!(uri("127.0.0.1:1", false), "http://127.0.0.1:1/");
        assert_eq!(uri("127.0.0.1:1", true), "https://127.0.0.1:1/");
        assert_eq!(uri("http://127.0.0.1:1", true), "http://127.0.0.1:1/");
        assert_eq!(uri("https://127.0.0.1:1", false), "https://127.0.0.1:1/");
        let tls = ClientTls {
            ca_pem: Vec::new(),
            identity: None,
        };
        let e = endpoint(&parse("http://127.0.0.1:1").unwrap(), Some(&tls), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("plaintext but TLS settings were given"),
            "{e}"
        );
    }
}
