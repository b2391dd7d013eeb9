//! TLS of the listening ports (rustls with the ring provider): the server's
//! certificate, and on the gRPC port optionally a CA client certificates must chain
//! to (mutual TLS).
//!
//! The certificate chain, its key and the client CA are files re-read while the
//! server runs ([`crate::watch`]): the handshake asks [`CertResolver`] for the
//! current pair and [`ReloadingClientVerifier`] for the current CA, so a rotated
//! certificate is served to the next connection without a restart, and connections
//! already open keep the one they were made with. A pair that does not match (a
//! certificate written before its key) or a file that no longer parses leaves the
//! last good one in force.
//!
//! ALPN: the REST and metrics ports offer `h2` and `http/1.1` (hyper detects which
//! was chosen); the gRPC port offers `h2` only, which gRPC clients require.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::watch::{load_and_watch_files, WatchError, Watched};

/// What `lattice serve` was given.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key: PathBuf,
    /// PEM CA certificates: set, the gRPC port refuses clients without a
    /// certificate that chains to one of them.
    pub client_ca: Option<PathBuf>,
    /// Which ports speak TLS.
    pub ports: TlsPorts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPorts {
    pub http: bool,
    pub grpc: bool,
    pub metrics: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in the PEM file")]
    NoCertificate,
    #[error("not a PEM private key: {0}")]
    Key(rustls::pki_types::pem::Error),
    #[error("not a PEM certificate: {0}")]
    Certificate(rustls::pki_types::pem::Error),
    #[error("the key does not fit the certificate (write the key and the certificate together): {0}")]
    Pair(rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

/// The ring provider, named explicitly so the choice never depends on which
/// rustls features other crates enable.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === Parsing ===

fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::Certificate)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// `files`: the chain, then the key.
fn parse_pair(files: &[Vec<u8>]) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_chain(&files[0])?;
    let key = PrivateKeyDer::from_pem_slice(&files[1]).map_err(TlsError::Key)?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Pair)?;
    Ok(Arc::new(key))
}

fn parse_client_ca(files: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_chain(&files[0])? {
        roots.add(cert).map_err(|e| TlsError::ClientCa(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::ClientCa(e.to_string()))
}

// === CertResolver ===

/// The current certificate and key, swapped when the files change.
pub struct CertResolver {
    current: Arc<Watched<Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Watched::get(&self.current).as_ref().clone())
    }
}

// === ReloadingClientVerifier ===

/// The current client CA's verifier, swapped when the file changes.
///
/// It sends no CA names in the certificate request (the names would have to be
/// borrowed from a verifier that a reload may drop): clients send the certificate
/// they were configured with, which is what gRPC clients do anyway.
pub struct ReloadingClientVerifier {
    current: Arc<Watched<Arc<dyn ClientCertVerifier>>>,
}

impl fmt::Debug for ReloadingClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingClientVerifier").finish_non_exhaustive()
    }
}

impl ReloadingClientVerifier {
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Watched::get(&self.current).as_ref().clone()
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

// === Acceptors ===

/// One acceptor per port that speaks TLS; cheap to clone.
#[derive(Clone, Default)]
pub struct Acceptors {
    pub http: Option<TlsAcceptor>,
    pub grpc: Option<TlsAcceptor>,
    pub metrics: Option<TlsAcceptor>,
    /// Whether the gRPC port asks for client certificates.
    pub mutual: bool,
}

impl fmt::Debug for Acceptors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why TLS could not start: the files, or rustls refusing the configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsStartError {
    #[error(transparent)]
    Files(#[from] WatchError),
    #[error("{0}")]
    Config(#[from] rustls::Error),
}

impl Acceptors {
    /// Loads the files (an error here is a start-up error) and keeps them fresh
    /// until `stop`.
    pub fn start(cfg: &TlsConfig, stop: CancellationToken) -> Result<Acceptors, TlsStartError> {
        let pair = load_and_watch_files(vec![cfg.cert.clone(), cfg.key.clone()], parse_pair, stop.clone())?;
        let resolver: Arc<dyn ResolvesServerCert> = Arc::new(CertResolver { current: pair });
        let client_ca = cfg
            .client_ca
            .as_deref()
            .map(|p: &Path| load_and_watch_files(vec![p.to_path_buf()], parse_client_ca, stop))
            .transpose()?;
        let build = |alpn: &[&[u8]], mutual: bool| -> Result<TlsAcceptor, TlsStartError> {
            let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let builder = match (&client_ca, mutual) {
                (Some(ca), true) => {
                    builder.with_client_cert_verifier(Arc::new(ReloadingClientVerifier { current: ca.clone() }))
                }
                _ => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        let web: &[&[u8]] = &[b"h2", b"http/1.1"];
        let p = cfg.ports;
        Ok(Acceptors {
            http: p.http.then(|| build(web, false)).transpose()?,
            grpc: p.grpc.then(|| build(&[b"h2"], true)).transpose()?,
            metrics: p.metrics.then(|| build(web, false)).transpose()?,
            mutual: p.grpc && client_ca.is_some(),
        })
    }

    /// The startup line's summary: `tls=http,grpc,metrics mtls=grpc`.
    pub fn describe(&self) -> String {
        let ports: Vec<&str> = [
            ("http", self.http.is_some()),
            ("grpc", self.grpc.is_some()),
            ("metrics", self.metrics.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        if ports.is_empty() {
            return "tls=off".into();
        }
        format!(
            "tls={} mtls={}",
            ports.join(","),
            if self.mutual { "grpc" } else { "off" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let k = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("self-signed certificate");
        (k.cert.pem(), k.signing_key.serialize_pem())
    }

    #[test]
    fn a_pair_parses_and_a_mismatched_one_is_refused() {
        let (c1, k1) = pair("a.test");
        let (_, k2) = pair("b.test");
        assert!(parse_pair(&[c1.clone().into_bytes(), k1.into_bytes()]).is_ok());
        assert!(matches!(
            parse_pair(&[c1.clone().into_bytes(), k2.into_bytes()]),
            Err(TlsError::Pair(_))
        ));
        assert!(matches!(
            parse_pair(&[Vec::new(), Vec::new()]),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            parse_pair(&[c1.into_bytes(), b"not a key".to_vec()]),
            Err(TlsError::Key(_))
        ));
        assert!(parse_client_ca(&[b"junk".to_vec()]).is_err());
    }
}
