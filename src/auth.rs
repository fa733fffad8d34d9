//! Bearer tokens mapped to namespaces (`--auth-tokens FILE`).
//!
//! With a token file, every call on the client port except health checks and
//! reflection must carry `authorization: Bearer <token>`. A call without a
//! known token gets `UNAUTHENTICATED`; a known token used on a namespace it
//! does not list, or on a cluster operation without `admin`, gets
//! `PERMISSION_DENIED`. Both are decided before anything is proposed.
//!
//! The file is TOML, one `[[token]]` table per caller:
//!
//! ```toml
//! [[token]]
//! name = "billing"                  # shown in logs and errors, never the secret
//! token_sha256 = "9f86d0…"          # or `token = "…"` (at least 16 characters)
//! namespaces = ["billing", "billing-*"]   # exact names, `prefix*`, or "*"
//! admin = false                     # may change membership, take snapshots
//! ```
//!
//! Only SHA-256 digests are kept in memory and they are compared in constant
//! time. [`Auth::reload`] re-reads the file (the `serve` command does so on
//! SIGHUP); a file that does not parse leaves the old table in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::Error;

/// Shortest plaintext token the file may hold.
pub const TOKEN_MIN: usize = 16;

/// The loaded token table and the file it came from.
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    table: RwLock<Arc<Vec<Arc<Principal>>>>,
}

/// Who a valid token speaks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    digest: [u8; 32],
    namespaces: Vec<Pattern>,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Exact(String),
    Prefix(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTable {
    #[serde(default, rename = "token")]
    tokens: Vec<FileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    token: Option<String>,
    token_sha256: Option<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    admin: bool,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

/// Equal without an early exit, so timing says nothing about the digest.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn pattern(entry: &str, p: &str) -> Result<Pattern, String> {
    let bad = |why: &str| format!("token {entry:?}: namespaces: {p:?} {why}");
    if p == "*" {
        return Ok(Pattern::All);
    }
    let (body, prefix) = match p.strip_suffix('*') {
        Some(b) => (b, true),
        None => (p, false),
    };
    if body.is_empty() {
        return Err(bad("is empty"));
    }
    if !body
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(bad(
            "may hold only [A-Za-z0-9_.-] and one trailing * (or be \"*\")",
        ));
    }
    Ok(if prefix {
        Pattern::Prefix(body.to_string())
    } else {
        Pattern::Exact(body.to_string())
    })
}

/// Parse a token file's text; errors name the entry and the field.
fn parse(text: &str) -> Result<Vec<Arc<Principal>>, String> {
    let file: FileTable = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.tokens.is_empty() {
        return Err("no [[token]] entries: every call would be refused".into());
    }
    let mut out: Vec<Arc<Principal>> = Vec::new();
    for e in file.tokens {
        let name = e.name.trim().to_string();
        if name.is_empty() {
            return Err("a [[token]] entry has an empty name".into());
        }
        if out.iter().any(|p| p.name == name) {
            return Err(format!("token {name:?}: name is used twice"));
        }
        let digest = match (&e.token, &e.token_sha256) {
            (Some(t), None) if t.len() >= TOKEN_MIN => sha256(t.as_bytes()),
            (Some(_), None) => {
                return Err(format!(
                    "token {name:?}: token is shorter than {TOKEN_MIN} characters"
                ))
            }
            (None, Some(h)) => parse_hex32(h).ok_or_else(|| {
                format!("token {name:?}: token_sha256 is not 64 hexadecimal digits")
            })?,
            _ => {
                return Err(format!(
                    "token {name:?}: give exactly one of token and token_sha256"
                ))
            }
        };
        if out.iter().any(|p| same(&p.digest, &digest)) {
            return Err(format!("token {name:?}: the same secret as another entry"));
        }
        if e.namespaces.is_empty() && !e.admin {
            return Err(format!(
                "token {name:?}: namespaces is empty and admin is false: it could do nothing"
            ));
        }
        let namespaces = e
            .namespaces
            .iter()
            .map(|p| pattern(&name, p))
            .collect::<Result<_, _>>()?;
        out.push(Arc::new(Principal {
            name,
            digest,
            namespaces,
            admin: e.admin,
        }));
    }
    Ok(out)
}

impl Auth {
    /// Read and check the token file.
    pub fn load(path: &Path) -> Result<Auth, String> {
        let table = Self::read(path)?;
        Ok(Auth {
            path: path.to_path_buf(),
            table: RwLock::new(Arc::new(table)),
        })
    }

    fn read(path: &Path) -> Result<Vec<Arc<Principal>>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Re-read the file; on an error the previous table stays in force.
    /// Returns how many tokens are now loaded.
    pub fn reload(&self) -> Result<usize, String> {
        let table = Self::read(&self.path)?;
        let n = table.len();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        Ok(n)
    }

    /// The principal of the request's bearer token. A refusal is counted
    /// (`idemkv_auth_refusals_total`).
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Arc<Principal>, Error> {
        let found = self.principal(md);
        if found.is_err() {
            crate::metrics::auth_refused(false);
        }
        found
    }

    fn principal(&self, md: &MetadataMap) -> Result<Arc<Principal>, Error> {
        let value = md.get("authorization").ok_or_else(|| {
            Error::Unauthenticated(
                "this cluster requires a bearer token (authorization metadata)".into(),
            )
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Error::Unauthenticated("authorization: expected \"Bearer <token>\"".into())
            })?;
        let digest = sha256(token.as_bytes());
        let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Compare against every entry so the time does not say which matched.
        let mut found = None;
        for p in table.iter() {
            if same(&p.digest, &digest) {
                found = Some(p.clone());
            }
        }
        found.ok_or_else(|| Error::Unauthenticated("authorization: unknown token".into()))
    }
}

impl Principal {
    pub fn may_use(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|p| match p {
            Pattern::All => true,
            Pattern::Exact(n) => n == namespace,
            Pattern::Prefix(pre) => namespace.starts_with(pre.as_str()),
        })
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), Error> {
        if self.may_use(namespace) {
            Ok(())
        } else {
            crate::metrics::auth_refused(true);
            Err(Error::PermissionDenied(format!(
                "namespace: token {:?} may not use namespace {namespace:?}",
                self.name
            )))
        }
    }

    pub fn check_admin(&self, what: &str) -> Result<(), Error> {
        if self.admin {
            Ok(())
        } else {
            crate::metrics::auth_refused(true);
            Err(Error::PermissionDenied(format!(
                "{what}: token {:?} is not an admin token",
                self.name
            )))
        }
    }
}

/// Check a request against `auth` (None: auth is off, everything passes).
pub fn authenticate(
    auth: &Option<Arc<Auth>>,
    md: &MetadataMap,
) -> Result<Option<Arc<Principal>>, Error> {
    match auth {
        Some(a) => a.authenticate(md).map(Some),
        None => Ok(None),
    }
}

/// The token of `name` hashed as a token file's `token_sha256` wants it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    const FILE: &str = r#"
[[token]]
name = "billing"
token = "billing-secret-0123"
namespaces = ["billing", "jobs-*"]

[[token]]
name = "ops"
token_sha256 = "HASH"
admin = true
"#;

    fn auth_with(text: &str) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, text).unwrap();
        Auth::load(&path).unwrap()
    }

    #[test]
    fn tokens_map_to_their_namespaces() {
        let text = FILE.replace("HASH", &token_sha256("ops-secret-0123456"));
        let a = auth_with(&text);
        let b = a.authenticate(&md("Bearer billing-secret-0123")).unwrap();
        assert_eq!(b.name, "billing");
        assert!(b.may_use("billing") && b.may_use("jobs-nightly"));
        assert!(!b.may_use("billing2") && !b.may_use("jobs"));
        assert!(b.check_admin("member add").is_err());
        let o = a.authenticate(&md("Bearer ops-secret-0123456")).unwrap();
        assert!(o.admin && !o.may_use("billing"));
        for bad in [
            "Bearer nope-nope-nope-nope",
            "billing-secret-0123",
            "Basic x",
        ] {
            assert!(matches!(
                a.authenticate(&md(bad)),
                Err(Error::Unauthenticated(_))
            ));
        }
        assert!(matches!(
            a.authenticate(&MetadataMap::new()),
            Err(Error::Unauthenticated(_))
        ));
    }

    #[test]
    fn bad_files_are_refused_with_the_entry_named() {
        let cases = [
            ("", "no [[token]]"),
            (
                "[[token]]\nname='a'\ntoken='short'\nnamespaces=['x']",
                "shorter than 16",
            ),
            (
                "[[token]]\nname='a'\ntoken='0123456789abcdef'\nnamespaces=['x y']",
                "token \"a\": namespaces",
            ),
            (
                "[[token]]\nname='a'\ntoken='0123456789abcdef'",
                "could do nothing",
            ),
            (
                "[[token]]\nname='a'\ntoken_sha256='xyz'\nnamespaces=['x']",
                "token_sha256",
            ),
            (
                "[[token]]\nname='a'\ntoken='0123456789abcdef'\nnamespaces=['x']\n\
                 [[token]]\nname='b'\ntoken='0123456789abcdef'\nnamespaces=['y']",
                "same secret",
            ),
            (
                "[[token]]\nname='a'\ntoken='0123456789abcdef'\nnamespace=['x']",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_broken_reload_keeps_the_old_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let one = "[[token]]\nname='a'\ntoken='0123456789abcdef'\nnamespaces=['x']";
        std::fs::write(&path, one).unwrap();
        let a = Auth::load(&path).unwrap();
        std::fs::write(&path, "not toml [").unwrap();
        assert!(a.reload().is_err());
        assert!(a.authenticate(&md("Bearer 0123456789abcdef")).is_ok());
        std::fs::write(&path, one.replace("0123456789abcdef", "fedcba9876543210")).unwrap();
        assert_eq!(a.reload(), Ok(1));
        assert!(a.authenticate(&md("Bearer 0123456789abcdef")).is_err());
        assert!(a.authenticate(&md("Bearer fedcba9876543210")).is_ok());
    }
}
