//! TLS (rustls, through tonic) for the client port and the peer port.
//!
//! A node given a certificate and key serves TLS on both ports. The peer
//! port is always mutual TLS: a peer must present a certificate signed by
//! the node's CA that may serve TLS (serverAuth; the peer service refuses a
//! client-only certificate, raft/service.rs), and a node presents its own certificate when it connects
//! to a peer (replication, votes, forwarded writes). The client port asks
//! clients for a certificate only with `client_auth`.
//!
//! Clients ([`ClientTls`]) trust a CA and may present an identity.

use std::fmt;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The PEM files of a node's TLS setup (`--tls-cert`, `--tls-key`,
/// `--tls-ca`, `--client-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate (server and client identity), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA that signs peers' (and, with `client_auth`, clients')
    /// certificates, PEM.
    pub ca: PathBuf,
    /// Require clients of the client port to present a certificate signed
    /// by `ca`.
    pub client_auth: bool,
}

/// The tonic TLS configurations of one node, built from [`TlsFiles`].
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// The client port.
    pub api: ServerTlsConfig,
    /// The peer port: always requires a client certificate signed by the CA.
    pub peer_server: ServerTlsConfig,
    /// How this node connects to its peers: trusts the CA, presents its own
    /// certificate.
    pub peer_client: ClientTlsConfig,
}

/// Read a PEM file, checking it holds a block with a label ending in
/// `label` (`CERTIFICATE`, `PRIVATE KEY`); errors name `what` and the path.
pub fn read_pem(what: &str, path: &Path, label: &str) -> Result<Vec<u8>, String> {
    let data =
        std::fs::read(path).map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&data);
    let found = text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(format!(
            "{what}: {} is not a PEM file with a {label} block",
            path.display()
        ));
    }
    Ok(data)
}

impl TlsFiles {
    /// Load the files and build the server and peer-client configurations.
    pub fn load(&self) -> Result<NodeTls, String> {
        let cert = read_pem("--tls-cert", &self.cert, "CERTIFICATE")?;
        let key = read_pem("--tls-key", &self.key, "PRIVATE KEY")?;
        let ca = read_pem("--tls-ca", &self.ca, "CERTIFICATE")?;
        let identity = Identity::from_pem(&cert, &key);
        let ca = Certificate::from_pem(&ca);
        let mut api = ServerTlsConfig::new().identity(identity.clone());
        if self.client_auth {
            api = api.client_ca_root(ca.clone());
        }
        let peer_server = ServerTlsConfig::new()
            .identity(identity.clone())
            .client_ca_root(ca.clone());
        let peer_client = ClientTlsConfig::new().ca_certificate(ca).identity(identity);
        Ok(NodeTls {
            api,
            peer_server,
            peer_client,
        })
    }
}

/// A client's TLS setting: the CA to trust and, for a cluster run with
/// `--client-auth`, a client certificate and key. PEM contents.
#[derive(Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    /// (certificate PEM, key PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<cert+key>"))
            .finish()
    }
}

impl ClientTls {
    /// Read the CA and, if both are given, a client certificate and key.
    /// Errors name the flag (`--tls-ca`, …) and the file.
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<ClientTls, String> {
        let ca_pem = read_pem("--tls-ca", ca, "CERTIFICATE")?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read_pem("--tls-cert", c, "CERTIFICATE")?,
                read_pem("--tls-key", k, "PRIVATE KEY")?,
            )),
            (None, None) => None,
            (Some(_), None) => return Err("--tls-key: required with --tls-cert".into()),
            (None, Some(_)) => return Err("--tls-cert: required with --tls-key".into()),
        };
        Ok(ClientTls { ca_pem, identity })
    }

    /// From flag-or-env values: `None` when no CA is given (plaintext);
    /// a certificate or key without a CA is an error.
    pub fn from_options(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<ClientTls>, String> {
        match ca {
            Some(ca) => ClientTls::from_files(ca, cert, key).map(Some),
            None if cert.is_some() || key.is_some() => {
                Err("--tls-ca: required with --tls-cert/--tls-key".into())
            }
            None => Ok(None),
        }
    }

    /// The tonic configuration.
    pub fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let files = TlsFiles {
            cert: missing.clone(),
            key: missing.clone(),
            ca: missing.clone(),
            client_auth: false,
        };
        let e = files.load().unwrap_err();
        assert!(
            e.starts_with("--tls-cert:") && e.contains("nope.pem"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = ClientTls::from_files(&junk, None, None).unwrap_err();
        assert!(e.starts_with("--tls-ca:") && e.contains("not a PEM"), "{e}");
        let e = ClientTls::from_options(None, Some(&junk), None).unwrap_err();
        assert!(e.starts_with("--tls-ca:"), "{e}");
        assert!(ClientTls::from_options(None, None, None).unwrap().is_none());
    }
}
