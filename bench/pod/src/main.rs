//! `mcp-affinity-bench-pod`: a canned MCP Streamable-HTTP server for `make bench-envoy`.
//!
//! One thread (tokio current-thread runtime, hyper HTTP/1.1 with keep-alive), no JSON
//! parsing, so that the proxy in front of it dominates what a benchmark measures:
//! - `POST` without `Mcp-Session-Id` (an `initialize`): 200 `application/json`, a canned
//!   `InitializeResult` and `Mcp-Session-Id: <new id>`. Every id is distinct: a UUID-shaped
//!   `<random per process>-<pod id>-4000-8000-<counter>`, so N initializes make N sessions.
//! - `POST` with `Mcp-Session-Id`: 200 `application/json`, a canned `tools/call` result.
//! - `POST` without `Mcp-Session-Id` whose `Mcp-Method` is not `initialize` (MCP
//!   2026-07-28, no sessions): 200 `application/json`, a canned `tools/list` result, no
//!   session id.
//! - `DELETE`: 200, empty. `GET /sessions`: the number of session ids issued so far
//!   (text; the benchmark waits on it while it creates sessions). Anything else: 405.
//!
//! Every answer carries `x-pod: <pod id>`, so a client can see which pod answered (the
//! benchmark checks pinning with it). The request body is read in full and ignored.
//!
//! Usage: `mcp-affinity-bench-pod --listen 127.0.0.1:8081 --id 1`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const INITIALIZE_RESULT: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{"listChanged":false}},"serverInfo":{"name":"mcp-affinity-bench-pod","version":"0.1.0"}}}"#;
const TOOLS_CALL_RESULT: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}"#;
const TOOLS_LIST_RESULT: &str = r#"{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"echo","inputSchema":{"type":"object"}}],"resultType":"complete"}}"#;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

struct Pod {
    id: u16,
    prefix: u32,
    pod_header: HeaderValue,
}

impl Pod {
    fn session_id(&self) -> String {
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{:04x}-4000-8000-{:012x}", self.prefix, self.id, n & 0xffff_ffff_ffff)
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let method = req.method().clone();
        let sessions_path = req.uri().path() == "/sessions";
        let has_session = req.headers().contains_key("mcp-session-id");
        let stateless = req.headers().get("mcp-method").is_some_and(|m| m.as_bytes() != b"initialize");
        // Read the whole body so that the connection stays reusable; its content is ignored.
        let _ = req.into_body().collect().await;
        let mut resp = match method {
            Method::POST if has_session => json(TOOLS_CALL_RESULT),
            Method::POST if stateless => json(TOOLS_LIST_RESULT),
            Method::POST => {
                let mut r = json(INITIALIZE_RESULT);
                let sid = HeaderValue::from_str(&self.session_id()).expect("session ids are ASCII");
                r.headers_mut().insert("mcp-session-id", sid);
                r
            }
            Method::DELETE => Response::new(Full::new(Bytes::new())),
            Method::GET if sessions_path => Response::new(Full::new(Bytes::from(SESSIONS.load(Ordering::Relaxed).to_string()))),
            _ => {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                r
            }
        };
        resp.headers_mut().insert("x-pod", self.pod_header.clone());
        Ok(resp)
    }
}

fn json(body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn usage() -> ! {
    eprintln!("usage: mcp-affinity-bench-pod --listen IP:PORT [--id N]  (N: 0..=65535, default 1)");
    std::process::exit(2)
}

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut id: u16 = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = Some(args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())),
            "--id" => id = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    let Some(listen) = listen else { usage() };
    // Distinct ids across runs and pods without a random number crate.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let prefix = nanos ^ std::process::id().rotate_left(16);
    let pod: &'static Pod = Box::leak(Box::new(Pod { id, prefix, pod_header: HeaderValue::from_str(&format!("pod-{id}")).expect("ASCII") }));

    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap_or_else(|e| {
            eprintln!("mcp-affinity-bench-pod: bind {listen}: {e}");
            std::process::exit(1)
        });
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mcp-affinity-bench-pod: accept: {e}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let conn = http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service_fn(|req| pod.handle(req)));
                let _ = conn.await;
            });
        }
    });
}
