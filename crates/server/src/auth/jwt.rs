//! JWT verification keys, from a JWKS file (`{"keys": [...]}`) or a PEM file with one
//! or more public keys.
//!
//! Each key is bound to one algorithm (HS256 for `oct` keys, RS256 for RSA, ES256
//! for P-256): a token is checked only against keys of the algorithm its header
//! names, and the header's `alg` must be one of those three, so an RSA public key
//! can never be used as an HMAC secret. During a rotation the file lists the old and
//! the new key; a token with a `kid` is checked against the key with that id, a
//! token without one against every key of its algorithm.

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

use super::{AuthError, Scope};

/// Clock skew allowed on `exp` and `nbf`, in seconds. jsonwebtoken's default is 60,
/// which would accept a token for a minute past its expiry.
const LEEWAY_SECS: u64 = 5;

pub struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys of one version of the key file.
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("not a JWKS document: {0}")]
    Jwks(serde_json::Error),
    #[error("key {index}: {reason}")]
    Key { index: usize, reason: String },
    #[error("no PEM public key found (expected -----BEGIN PUBLIC KEY-----)")]
    NoPem,
    #[error("the file holds no usable key")]
    Empty,
}

/// The claims Lattice reads; others are ignored.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub tenant_id: Option<String>,
    pub sub: Option<String>,
    pub user_id: Option<String>,
    /// OAuth 2 style: space-separated.
    pub scope: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// Expiry, Unix seconds (required: verification refuses a token without it).
    pub exp: Option<i64>,
}

impl Claims {
    pub fn scopes(&self) -> Vec<Scope> {
        let from_str = self.scope.iter().flat_map(|s| s.split_whitespace().map(str::to_string));
        let from_list = self.scopes.iter().flatten().cloned();
        from_str.chain(from_list).filter_map(|s| Scope::parse(&s)).collect()
    }
}

impl KeySet {
    /// A JWKS document (starts with `{`) or PEM.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, KeyFileError> {
        let trimmed = bytes.trim_ascii_start();
        let keys = if trimmed.starts_with(b"{") {
            Self::parse_jwks(trimmed)?
        } else {
            Self::parse_pem(trimmed)?
        };
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(KeySet { keys })
    }

    fn parse_jwks(bytes: &[u8]) -> Result<Vec<VerifyKey>, KeyFileError> {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(KeyFileError::Jwks)?;
        set.keys
            .iter()
            .enumerate()
            .map(|(index, jwk)| {
                let bad = |reason: String| KeyFileError::Key { index, reason };
                let alg = match &jwk.algorithm {
                    AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
                    _ => {
                        return Err(bad(
                            "only oct (HS256), RSA (RS256) and EC P-256 (ES256) keys are accepted".into(),
                        ))
                    }
                };
                if let Some(declared) = jwk.common.key_algorithm {
                    let name = format!("{declared:?}");
                    if name != format!("{alg:?}") {
                        return Err(bad(format!("alg {name} does not match the key type ({alg:?})")));
                    }
                }
                let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
                Ok(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                })
            })
            .collect()
    }

    fn parse_pem(bytes: &[u8]) -> Result<Vec<VerifyKey>, KeyFileError> {
        let text = std::str::from_utf8(bytes).map_err(|_| KeyFileError::NoPem)?;
        let mut keys = Vec::new();
        for (index, block) in pem_blocks(text).enumerate() {
            let bad = |reason: String| KeyFileError::Key { index, reason };
            let (alg, key) = match DecodingKey::from_ec_pem(block.as_bytes()) {
                Ok(k) => (Algorithm::ES256, k),
                Err(_) => (
                    Algorithm::RS256,
                    DecodingKey::from_rsa_pem(block.as_bytes()).map_err(|e| bad(format!("neither EC nor RSA: {e}")))?,
                ),
            };
            keys.push(VerifyKey { kid: None, alg, key });
        }
        if keys.is_empty() {
            return Err(KeyFileError::NoPem);
        }
        Ok(keys)
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str, audience: Option<&str>) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if !matches!(header.alg, Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (HS256, RS256, ES256)",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let mut last = None;
        let candidates = self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            });
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    // Expiry is checked after the signature: an expired token was
                    // signed by this key, no other key will do better.
                    if matches!(e.kind(), K::ExpiredSignature) {
                        return Err(AuthError::Expired);
                    }
                    last = Some(e);
                }
            }
        }
        Err(match last {
            None => AuthError::Invalid(match header.kid {
                Some(kid) => format!("no {:?} key with kid '{}'", header.alg, super::clip(&kid)),
                None => format!("no {:?} key", header.alg),
            }),
            Some(e) => AuthError::Invalid(e.to_string()),
        })
    }
}

/// The PEM blocks of a file, each with its BEGIN and END lines.
fn pem_blocks(text: &str) -> impl Iterator<Item = String> + '_ {
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.find("-----BEGIN ")?;
        let end_marker = rest[start..].find("-----END ")? + start;
        let end = rest[end_marker..].find("\n").map_or(rest.len(), |i| end_marker + i + 1);
        let block = rest[start..end].to_string();
        rest = &rest[end..];
        Some(block)
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    use super::*;

    fn token(alg: Algorithm, key: &EncodingKey, exp_in: i64) -> String {
        let exp = jsonwebtoken::get_current_timestamp() as i64 + exp_in;
        let claims = serde_json::json!({"tenant_id": "acme", "sub": "u", "scopes": ["infer", "bogus"], "exp": exp});
        jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
    }

    /// A PEM file with an EC and an RSA public key: each verifies its own
    /// algorithm's tokens, and nothing else.
    #[test]
    fn pem_files_hold_several_keys_each_bound_to_its_algorithm() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
        let pem = format!(
            "{}\n{}",
            ec.public_key_pem(),
            rsa.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()
        );
        let keys = KeySet::parse(pem.as_bytes()).unwrap();
        let es = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
        let rs = EncodingKey::from_rsa_pem(rsa.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let claims = keys.verify(&token(Algorithm::ES256, &es, 60), None).unwrap();
        assert_eq!(claims.tenant_id.as_deref(), Some("acme"));
        assert_eq!(claims.scopes(), vec![Scope::Infer], "unknown scopes are ignored");
        assert!(keys.verify(&token(Algorithm::RS256, &rs, 60), None).is_ok());
        assert_eq!(
            keys.verify(&token(Algorithm::RS256, &rs, -600), None).unwrap_err(),
            AuthError::Expired
        );
        // HS256 is refused: a PEM file holds no HMAC secret.
        let hs = token(Algorithm::HS256, &EncodingKey::from_secret(b"s"), 60);
        assert!(matches!(keys.verify(&hs, None), Err(AuthError::Invalid(_))));
        // Not PEM, not JWKS.
        assert!(KeySet::parse(b"hello").is_err());
        assert!(KeySet::parse(br#"{"keys": []}"#).is_err());
    }
}
