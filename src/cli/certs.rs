//! `idemkv certs`: a development CA and certificates for TLS.
//!
//! Writes `ca.pem`/`ca-key.pem`, `node-N.pem`/`node-N-key.pem` for each
//! node and `client.pem`/`client-key.pem`. Node certificates name every
//! `--hosts` entry (DNS names and IP addresses) and serve both as server
//! and client identity (nodes authenticate each other with them). For
//! development and tests: the CA key sits next to the certificates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write the PEM files to (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Names the node certificates are valid for, comma-separated: DNS
    /// names and IP addresses.
    #[arg(long, default_value = "localhost,127.0.0.1,::1")]
    pub hosts: String,
    /// How many node certificates (node-1 … node-N).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
}

fn params(common_name: &str, sans: Vec<String>) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(sans).context("--hosts: not a DNS name or IP address")?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "idemkv");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    Ok(p)
}

fn write(dir: &Path, name: &str, pem: &str, private: bool) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, pem).with_context(|| format!("cannot write {}", path.display()))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    Ok(())
}

/// Generate and write the files.
pub fn generate(a: &CertsArgs) -> anyhow::Result<()> {
    let hosts: Vec<String> = a
        .hosts
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        anyhow::bail!("--hosts: give at least one DNS name or IP address");
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("--out: cannot create {}", a.out.display()))?;

    let mut ca = params("idemkv development CA", Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
    write(&a.out, "ca.pem", &ca.pem(), false)?;
    write(&a.out, "ca-key.pem", &ca_key_pem, true)?;

    let leaf = |name: &str, sans: Vec<String>, usages| -> anyhow::Result<()> {
        let mut p = params(name, sans)?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = usages;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        write(&a.out, &format!("{name}.pem"), &cert.pem(), false)?;
        write(
            &a.out,
            &format!("{name}-key.pem"),
            &key.serialize_pem(),
            true,
        )
    };
    for n in 1..=a.nodes {
        leaf(
            &format!("node-{n}"),
            hosts.clone(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
    }
    leaf(
        "client",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    Ok(())
}

pub fn run(a: CertsArgs) -> anyhow::Result<()> {
    generate(&a)?;
    say!(
        "wrote ca.pem, ca-key.pem, node-1..{n}.pem (+ -key.pem) for {hosts}, client.pem, \
         client-key.pem to {dir}",
        n = a.nodes,
        hosts = a.hosts,
        dir = a.out.display()
    );
    Ok(())
}
