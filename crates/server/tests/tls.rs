//! TLS at the connection level: the connection cap counts connections whose
//! handshake is not done, a stalled handshake is cut at the timeout, and the agent
//! client library reaches a mutual-TLS gRPC port only with its certificate.

mod support;

use std::{sync::Arc, time::Duration};

use lattice_agent::client::{AgentClient, ClientConfig, ClientTls, LinkState};
use lattice_server::{
    conn::{self, Limits},
    tls::{Acceptors, TlsConfig, TlsPorts},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    client: (String, String),
    stranger: (String, String),
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A server CA and certificate (written where the server reads them), a client CA
/// and a client certificate, and a client certificate from a CA nobody trusts.
fn pki() -> (Pki, TlsConfig) {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("server ca");
    let client_ca = ca("client ca");
    let other_ca = ca("other ca");
    let (cert, key) = leaf(&server_ca, ExtendedKeyUsagePurpose::ServerAuth);
    let w = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let cfg = TlsConfig {
        cert: w("tls.crt", &cert),
        key: w("tls.key", &key),
        client_ca: Some(w("client-ca.crt", &client_ca.pem())),
        ports: TlsPorts {
            http: true,
            grpc: true,
            metrics: true,
        },
    };
    let pki = Pki {
        ca_pem: server_ca.pem(),
        ca_der: server_ca.der().clone(),
        client: leaf(&client_ca, ExtendedKeyUsagePurpose::ClientAuth),
        stranger: leaf(&other_ca, ExtendedKeyUsagePurpose::ClientAuth),
        dir,
    };
    (pki, cfg)
}

fn connector(ca: CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// An HTTP/1.1 GET over TLS; the status line.
async fn get(addr: std::net::SocketAddr, ca: CertificateDer<'static>) -> std::io::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let mut s = connector(ca)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    s.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn the_connection_cap_counts_handshakes_and_a_stalled_one_is_cut() {
    let (pki, cfg) = pki();
    let stop = CancellationToken::new();
    let acceptors = Acceptors::start(&cfg, stop.clone()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
    let server = tokio::spawn(conn::serve_http(
        listener,
        router,
        limits,
        acceptors.http.clone(),
        stop.clone().cancelled_owned(),
    ));

    assert_eq!(get(addr, pki.ca_der.clone()).await.unwrap(), "HTTP/1.1 200 OK");

    // A client that connects and never starts its handshake holds the only slot...
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let held_from = std::time::Instant::now();
    // ...so this one waits behind it (the kernel's backlog holds its connection)...
    let ca = pki.ca_der.clone();
    let waiting = tokio::spawn(async move { (get(addr, ca).await, std::time::Instant::now()) });
    // ...until the stalled handshake is cut at the timeout: the silent client reads
    // end-of-stream, and the waiting one is served.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the stalled handshake is cut")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server closes a connection that never handshakes");
    let (served, at) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiting client is served once the slot frees")
        .unwrap();
    assert_eq!(served.unwrap(), "HTTP/1.1 200 OK");
    // Not before the slot was freed: a lower bound, which a slow machine only widens.
    assert!(
        at.duration_since(held_from) >= limits.header_read_timeout,
        "served after {:?}, while the silent connection held the only slot",
        at.duration_since(held_from)
    );
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test]
async fn the_agent_client_reaches_a_mutual_tls_port_only_with_its_certificate() {
    let (pki, cfg) = pki();
    let repo = support::repo_copy(&[]);
    let server = support::start(
        repo.path(),
        support::Options {
            load_models: false,
            agents: true,
            tls: Some(cfg),
            ..Default::default()
        },
    )
    .await;
    assert!(server.state.tls.mutual);
    let connect = |identity: Option<(String, String)>| {
        AgentClient::connect(ClientConfig {
            endpoints: vec![format!("https://localhost:{}", server.grpc.port())],
            tls: Some(ClientTls {
                ca_pem: pki.ca_pem.clone().into_bytes(),
                identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
                domain: None,
            }),
            capabilities: vec!["tls".into()],
            ..ClientConfig::default()
        })
        .0
    };

    let good = connect(Some(pki.client.clone()));
    let mut state = good.state();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(*state.borrow_and_update(), LinkState::Established { .. }) {
            state.changed().await.unwrap();
        }
    })
    .await
    .expect("established with a client certificate");

    for identity in [None, Some(pki.stranger.clone())] {
        let refused = connect(identity);
        let mut state = refused.state();
        // It keeps trying: a reconnect attempt after a failed handshake, never
        // an established link.
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let s = state.borrow_and_update().clone();
                assert!(!matches!(s, LinkState::Established { .. }), "{s:?}");
                if matches!(s, LinkState::Reconnecting { attempt } if attempt >= 2) {
                    break;
                }
                state.changed().await.unwrap();
            }
        })
        .await
        .expect("reconnecting after refused handshakes");
        refused.abort();
    }
    good.abort();
    drop(pki.dir);
    server.stop().await;
}
