//! Static API keys, stored hashed: the file holds the SHA-256 of each key, never the
//! key. A presented key is hashed and looked up, so neither the file nor a timing
//! difference reveals a key.
//!
//! ```toml
//! [[key]]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! tenant = "acme"
//! user = "ci"
//! scopes = ["infer", "metrics"]
//! ```
//! `printf %s "$KEY" | sha256sum` gives the hash.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Principal, Scope};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sha256: String,
    tenant: String,
    user: String,
    scopes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyFileError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("key {index}: {reason}")]
    Entry { index: usize, reason: String },
}

pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Principal>,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    pub fn parse(bytes: &[u8]) -> Result<ApiKeys, ApiKeyFileError> {
        let text = String::from_utf8_lossy(bytes);
        let file: File = toml::from_str(&text)?;
        let mut by_hash = HashMap::new();
        for (index, e) in file.key.into_iter().enumerate() {
            let bad = |reason: &str| ApiKeyFileError::Entry {
                index,
                reason: reason.to_string(),
            };
            let hash = parse_hex32(&e.sha256).ok_or_else(|| bad("sha256 must be 64 hex digits"))?;
            if e.tenant.is_empty() {
                return Err(bad("tenant must not be empty"));
            }
            let scopes = e
                .scopes
                .iter()
                .map(|s| Scope::parse(s).ok_or_else(|| bad(&format!("unknown scope '{s}' ({})", Scope::NAMES))))
                .collect::<Result<Vec<_>, _>>()?;
            by_hash.insert(
                hash,
                Principal {
                    tenant: super::TenantClaim::One(e.tenant),
                    user: e.user,
                    scopes,
                    method: "api_key",
                },
            );
        }
        Ok(ApiKeys { by_hash })
    }

    pub fn from_entries(entries: impl IntoIterator<Item = ([u8; 32], Principal)>) -> ApiKeys {
        ApiKeys {
            by_hash: entries.into_iter().collect(),
        }
    }

    pub fn lookup(&self, key: &str) -> Option<&Principal> {
        self.by_hash.get(&sha256(key.as_bytes()))
    }
}
