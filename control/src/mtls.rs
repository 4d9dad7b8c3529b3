//! Mutual TLS on the replay listener: the credential Envoy presents and pods never see.
//!
//! The replay listener ([`crate::replay_listener`]) answers requests without a bearer token: Envoy
//! forwards the client's own request there when it retries. With
//! `--replay-tls-cert`, `--replay-tls-key` and `--replay-client-ca`, it speaks TLS and
//! completes a handshake only with a client whose certificate chains to that CA — the one
//! Envoy's `mcp_service` cluster presents to the replay endpoint alone
//! (`transport_socket_matches`, `envoy/envoy-stateful-session.yaml`). A pod, or anybody
//! else who can reach the port, gets no HTTP exchange at all: plain HTTP, TLS without a
//! certificate and a certificate of another CA all fail the handshake.
//!
//! Certificates are PEM files (`scripts/replay-certs.sh` makes a CA, control's server
//! certificate and Envoy's client certificate). Connections are HTTP/1.1 (Envoy's upstream
//! default), served by hyper with the replay router.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The replay listener's TLS files (`--replay-tls-cert`, `--replay-tls-key`,
/// `--replay-client-ca`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Control's certificate chain, PEM (leaf first).
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA that signs the client certificates accepted (Envoy's), PEM.
    pub client_ca: PathBuf,
}

/// A rustls server configuration that requires a client certificate signed by
/// `files.client_ca` (rustls `WebPkiClientVerifier`), offering HTTP/1.1 (ALPN).
///
/// # Errors
/// A file cannot be read or holds no certificate / key, or the key does not match the
/// certificate; the message names the file.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| format!("--replay-tls-key {}: no private key", files.key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&files.client_ca)? {
        roots.add(ca).with_context(|| format!("--replay-client-ca {}: not a CA certificate", files.client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .with_context(|| format!("--replay-tls-key {} does not match --replay-tls-cert {}", files.key.display(), files.cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", path.display());
    Ok(certs)
}

/// Serves `app` on `listener` over TLS with `config` until `stopped` completes; then each
/// open connection finishes its request in flight and closes. A failed handshake (no
/// client certificate, an unknown CA, plain HTTP) closes that connection and is logged at
/// debug level.
///
/// # Errors
/// None in practice: accept errors are logged and the loop goes on.
pub async fn serve<F, Fut>(listener: TcpListener, config: Arc<rustls::ServerConfig>, app: Router, stopped: F) -> Result<()>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(config);
    let mut connections = tokio::task::JoinSet::new();
    let stop = stopped();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "replay listener: accept");
                    continue;
                }
            },
        };
        let (acceptor, app, stopped) = (acceptor.clone(), app.clone(), stopped.clone());
        connections.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "replay listener: TLS handshake refused");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                () = stopped() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "replay listener: connection");
            }
        });
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}
