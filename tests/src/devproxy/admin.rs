//! A tiny admin endpoint like Envoy's (`GET /stats`): the filter's metrics as
//! `wasmcustom.<name>: <value>` lines (Envoy prefixes wasm-defined metrics with
//! `wasmcustom.`; Envoy docs, "Wasm" extension statistics).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::host::MetricsStore;

/// Renders metrics in Envoy's `/stats` text format.
pub fn render(metrics: &MetricsStore) -> String {
    metrics.snapshot().into_iter().map(|(name, v)| format!("wasmcustom.{name}: {v}\n")).collect()
}

/// Parses `/stats` text back into `(name, value)` (tests read metrics through this).
pub fn parse(text: &str) -> Vec<(String, i64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Serves `GET /stats` on `listener` forever.
pub async fn serve(metrics: MetricsStore, listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/stats" { render(&metrics) } else { String::new() };
                let status = if req.uri().path() == "/stats" { 200 } else { 404 };
                async move {
                    Ok::<_, Infallible>(hyper::Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap())
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
