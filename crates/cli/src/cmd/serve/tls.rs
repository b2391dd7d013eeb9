//! TLS flags of the server's ports.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use lattice_server::tls::{TlsConfig, TlsPorts};

use crate::Failure;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Port {
    Http,
    Grpc,
    Metrics,
}

#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) the ports present. Set with --tls-key, the
    /// ports in --tls-ports speak TLS only. Re-read when it changes: new connections
    /// get the new certificate, open ones keep theirs.
    #[arg(long, env = "LATTICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1). Re-read when it
    /// changes; write the key and the certificate together (a pair that does not
    /// match keeps the previous one in force).
    #[arg(long, env = "LATTICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates for mutual TLS on the gRPC port: a client without a
    /// certificate that chains to one of them is refused at the handshake. Re-read
    /// when it changes.
    #[arg(long, env = "LATTICE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Ports that speak TLS when --tls-cert is set (comma-separated).
    #[arg(
        long,
        env = "LATTICE_TLS_PORTS",
        value_enum,
        value_delimiter = ',',
        default_value = "http,grpc,metrics"
    )]
    pub tls_ports: Vec<Port>,
}

impl TlsArgs {
    pub fn build(&self) -> Result<Option<TlsConfig>, Failure> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let ports = TlsPorts {
            http: self.tls_ports.contains(&Port::Http),
            grpc: self.tls_ports.contains(&Port::Grpc),
            metrics: self.tls_ports.contains(&Port::Metrics),
        };
        if self.tls_client_ca.is_some() && !ports.grpc {
            return Err(Failure::Usage(
                "--tls-client-ca applies to the gRPC port: include grpc in --tls-ports".into(),
            ));
        }
        Ok(Some(TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
            ports,
        }))
    }
}
