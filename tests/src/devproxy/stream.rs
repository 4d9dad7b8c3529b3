//! One downstream request through the filter, in Envoy's order (HTTP connection manager,
//! `source/common/http/filter_manager.cc`):
//!
//! 1. `on_request_headers`; then, if there is a body, `on_request_body` — Envoy hands the
//!    body to the filter even while it holds the headers. Pause from either holds the
//!    request until `proxy_continue_stream` (after an HTTP call) or a local reply.
//! 2. Routing on the (possibly rewritten) headers; the upstream's answer, or the router's
//!    local reply when no host could be reached (`response.code_details`,
//!    `response.flags` set like Envoy's).
//! 3. `on_response_headers`, then `on_response_body` per chunk: Continue streams the chunk
//!    on; Pause buffers (Envoy calls again with the cumulative body).
//! 4. `on_done`, `on_log`, `on_delete`.
//!
//! Local replies (`proxy_send_local_response`) are applied after the callback returns and
//! pass through the encoder path, so the filter's response callbacks see them too
//! (`FilterManager::sendLocalReply`).

use std::net::SocketAddr;
use std::sync::{Arc, MutexGuard};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use super::Inner;
use super::routing::Target;
use super::upstream::{self, RouterReply};
use crate::host::{Action, Headers, LocalReply, StreamState, Vm};

/// The downstream response body type.
pub type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn plain(status: u16, text: String) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(full(text))
        .expect("valid response")
}

fn i64_le(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Serves one request. Never fails: errors become responses, as in Envoy.
pub async fn handle(
    inner: Arc<Inner>,
    worker: Option<usize>,
    req: http::Request<Incoming>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> http::Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(400, format!("reading the request body failed: {e}\n")),
    };
    let headers = request_headers(&parts);
    let Some(worker) = worker else {
        return unfiltered(&inner, headers, body).await;
    };
    let mut s = FilterStream { inner: inner.clone(), worker, id: 0 };
    match s.run(headers, body, &parts, peer, local).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!("filter stream failed: {e:#}");
            s.end();
            // Envoy with `fail_open: false` answers a failed VM with a 5xx local reply.
            plain(500, format!("mcp-affinity dev proxy: wasm filter failed: {e:#}\n"))
        }
    }
}

/// `--no-filter`: route and forward as Envoy would without the filter.
async fn unfiltered(inner: &Inner, headers: Headers, body: Bytes) -> http::Response<Body> {
    let pin = headers.iter().find(|(k, _)| *k == inner.pin_header).map(|(_, v)| v.as_slice());
    let reply = match inner.router.route(pin) {
        Target::NoHealthyUpstream => upstream::NO_HEALTHY_UPSTREAM,
        Target::Host(addr) => match upstream::build_request(addr, &headers, body) {
            Err(e) => return plain(400, format!("{e}\n")),
            Ok(req) => match upstream::send(&inner.client, req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let mut out = http::Response::builder().status(parts.status);
                    for (k, v) in &parts.headers {
                        if !upstream::is_hop_by_hop(k.as_str()) {
                            out = out.header(k, v);
                        }
                    }
                    return out.body(body.map_err(std::io::Error::other).boxed()).expect("valid response");
                }
                Err(reply) => reply,
            },
        },
    };
    plain(reply.status, reply.body.to_string())
}

/// Request headers as Envoy's header map holds them: pseudo-headers first.
fn request_headers(parts: &http::request::Parts) -> Headers {
    let authority = parts
        .headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes().to_vec())
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes().to_vec()))
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut h: Headers = vec![
        (":authority".into(), authority),
        (":path".into(), path.as_bytes().to_vec()),
        (":method".into(), parts.method.as_str().as_bytes().to_vec()),
        (":scheme".into(), b"http".to_vec()),
    ];
    for (k, v) in &parts.headers {
        if k != http::header::HOST {
            h.push((k.as_str().to_string(), v.as_bytes().to_vec()));
        }
    }
    h
}

/// Where the response body comes from.
enum Source {
    Upstream(Incoming),
    Local(Bytes),
    /// Already fed to the filter whole (end of stream delivered).
    Done,
}

struct FilterStream {
    inner: Arc<Inner>,
    worker: usize,
    id: u32,
}

impl FilterStream {
    fn vm(&self) -> MutexGuard<'_, Vm> {
        self.inner.workers[self.worker].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self) {
        if self.id != 0 {
            let _ = self.vm().end_stream(self.id);
        }
    }

    /// Runs `f` on the VM and returns its action and any local reply it requested.
    fn callback(&self, f: impl FnOnce(&mut Vm) -> Result<Action>) -> Result<(Action, Option<LocalReply>)> {
        let mut vm = self.vm();
        let action = f(&mut vm)?;
        let reply = vm.stream(self.id).local_reply.take();
        Ok((action, reply))
    }

    /// Waits, performing the stream's HTTP calls, until `resumed` holds or the filter
    /// sends a local reply. Another stream's callback may resume this one (the filter
    /// switches context with `proxy_set_effective_context`), so a stream with no call of
    /// its own waits for the worker's wake-up, sent after every delivered call response.
    async fn wait(&self, resumed: fn(&mut StreamState) -> bool) -> Result<Option<LocalReply>> {
        loop {
            let wakeup = self.inner.wakeups[self.worker].notified();
            tokio::pin!(wakeup);
            wakeup.as_mut().enable();
            let calls = {
                let mut vm = self.vm();
                let st = vm.stream(self.id);
                if let Some(reply) = st.local_reply.take() {
                    return Ok(Some(reply));
                }
                if resumed(st) {
                    return Ok(None);
                }
                vm.take_http_calls(self.id)
            };
            if calls.is_empty() {
                // Envoy would hold the stream until its timeouts; we fail loudly instead.
                if tokio::time::timeout(STALL_LIMIT, wakeup).await.is_err() {
                    bail!("the filter paused the stream and nothing resumed it within {STALL_LIMIT:?}");
                }
                continue;
            }
            for call in calls {
                deliver(&self.inner, self.worker, call).await?;
            }
        }
    }

    async fn run(
        &mut self,
        headers: Headers,
        body: Bytes,
        parts: &http::request::Parts,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) -> Result<http::Response<Body>> {
        self.id = {
            let mut vm = self.vm();
            let id = vm.create_stream()?;
            let st = vm.stream(id);
            st.request_headers = headers;
            // Envoy request attributes (Envoy docs, "Attributes": request.*).
            let p = &mut st.properties;
            p.insert("request.path".into(), parts.uri.path_and_query().map_or("/", |q| q.as_str()).into());
            p.insert("request.url_path".into(), parts.uri.path().into());
            p.insert("request.method".into(), parts.method.as_str().into());
            p.insert("request.scheme".into(), b"http".to_vec());
            p.insert("request.protocol".into(), b"HTTP/1.1".to_vec());
            p.insert("request.size".into(), i64_le(body.len() as i64));
            p.insert("source.address".into(), peer.to_string().into_bytes());
            if let Some(l) = local {
                p.insert("destination.address".into(), l.to_string().into_bytes());
            }
            id
        };

        // 1. Request path.
        let (mut action, mut reply) = self.callback(|vm| vm.on_request_headers(self.id, body.is_empty()))?;
        if reply.is_none() && !body.is_empty() {
            self.vm().stream(self.id).request_body = body.to_vec();
            (action, reply) = self.callback(|vm| vm.on_request_body(self.id, true))?;
        }
        if reply.is_none() && action == Action::Pause {
            reply = self.wait(|st| std::mem::take(&mut st.resume_request)).await?;
        }
        if let Some(reply) = reply {
            return self.respond_local(reply).await;
        }

        // 2. Route and forward the request as the filter left it.
        let (headers, body) = {
            let mut vm = self.vm();
            let st = vm.stream(self.id);
            (st.request_headers.clone(), Bytes::from(std::mem::take(&mut st.request_body)))
        };
        let pin = headers.iter().find(|(k, _)| *k == self.inner.pin_header).map(|(_, v)| v.as_slice());
        let target = self.inner.router.route(pin);
        let outcome = match target {
            Target::NoHealthyUpstream => Err(upstream::NO_HEALTHY_UPSTREAM),
            Target::Host(addr) => {
                // `upstream.address` is set once a host is selected, even if connecting fails.
                self.vm().stream(self.id).properties.insert("upstream.address".into(), addr.to_string().into_bytes());
                upstream::send(&self.inner.client, upstream::build_request(addr, &headers, body)?).await
            }
        };
        match outcome {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut h: Headers = vec![(":status".into(), parts.status.as_str().as_bytes().to_vec())];
                for (k, v) in &parts.headers {
                    if !upstream::is_hop_by_hop(k.as_str()) {
                        h.push((k.as_str().to_string(), v.as_bytes().to_vec()));
                    }
                }
                self.set_response_info(parts.status.as_u16(), "via_upstream", 0);
                self.respond(h, Source::Upstream(body), false).await
            }
            Err(reply) => self.router_reply(reply).await,
        }
    }

    fn set_response_info(&self, status: u16, details: &str, flags: i64) {
        let mut vm = self.vm();
        let p = &mut vm.stream(self.id).properties;
        p.insert("response.code".into(), i64_le(status.into()));
        p.insert("response.code_details".into(), details.as_bytes().to_vec());
        p.insert("response.flags".into(), i64_le(flags));
    }

    /// A router local reply (upstream unreachable), passed through the filter.
    async fn router_reply(&mut self, r: RouterReply) -> Result<http::Response<Body>> {
        self.set_response_info(r.status, r.details, r.flags);
        let headers: Headers = vec![
            (":status".into(), r.status.to_string().into_bytes()),
            ("content-type".into(), b"text/plain".to_vec()),
            ("content-length".into(), r.body.len().to_string().into_bytes()),
        ];
        self.respond(headers, Source::Local(Bytes::from_static(r.body.as_bytes())), false).await
    }

    /// The filter's own local reply, passed through its response callbacks once.
    async fn respond_local(&mut self, r: LocalReply) -> Result<http::Response<Body>> {
        let details = if r.details.is_empty() { "wasm_local_reply" } else { r.details.as_str() };
        self.set_response_info(r.status, details, 0);
        let mut headers: Headers = vec![(":status".into(), r.status.to_string().into_bytes())];
        headers.extend(r.headers);
        headers.push(("content-length".into(), r.body.len().to_string().into_bytes()));
        self.respond(headers, Source::Local(Bytes::from(r.body)), true).await
    }

    /// 3. Response path: headers through the filter, then the body streamed through it.
    ///
    /// When the headers callback pauses, Envoy holds the headers: if the filter dispatched
    /// a call it waits for `proxy_continue_stream` or a local reply; otherwise body data keeps
    /// flowing into `on_response_body` (buffered) until that continues or replies
    /// (`FilterManager::encodeHeaders` / `encodeData` with StopIteration). A local reply
    /// while the headers are still held replaces the response.
    async fn respond(&mut self, headers: Headers, mut source: Source, is_local: bool) -> Result<http::Response<Body>> {
        let end_of_stream = matches!(&source, Source::Local(b) if b.is_empty());
        self.vm().stream(self.id).response_headers = headers;
        let (action, mut reply) = self.callback(|vm| vm.on_response_headers(self.id, end_of_stream))?;
        let mut held = Bytes::new();
        if reply.is_none() && action == Action::Pause {
            if self.vm().has_http_calls(self.id) {
                reply = self.wait(|st| std::mem::take(&mut st.resume_response)).await?;
            } else {
                (held, reply) = self.hold_body(&mut source).await?;
            }
        }
        if let Some(reply) = reply {
            if is_local {
                bail!("the filter sent a local reply while its own local reply was being encoded");
            }
            return Box::pin(self.respond_local(reply)).await;
        }
        let headers = self.vm().stream(self.id).response_headers.clone();
        let mut out = http::Response::builder();
        for (k, v) in &headers {
            if k == ":status" {
                out = out.status(std::str::from_utf8(v)?.parse::<u16>()?);
            } else if !k.starts_with(':') && k != "content-length" {
                out = out.header(k.as_str(), v.as_slice());
            }
        }
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
        let pump = BodyPump { stream: FilterStream { inner: self.inner.clone(), worker: self.worker, id: self.id }, tx };
        self.id = 0; // the pump ends the stream
        tokio::spawn(pump.run(held, source));
        Ok(out.body(BodyExt::boxed(StreamBody::new(rx)))?)
    }

    /// Headers are held and nothing is in flight: feed the body to the filter until it
    /// continues (the buffered body goes out first), replies locally, or pauses at the
    /// end with a call in flight (then wait for it).
    async fn hold_body(&self, source: &mut Source) -> Result<(Bytes, Option<LocalReply>)> {
        loop {
            let (chunk, eos) = next_chunk(source).await?;
            let (action, reply) = {
                let mut vm = self.vm();
                vm.stream(self.id).response_body.extend_from_slice(&chunk);
                let action = vm.on_response_body(self.id, eos)?;
                (action, vm.stream(self.id).local_reply.take())
            };
            if reply.is_some() {
                return Ok((Bytes::new(), reply));
            }
            if action == Action::Pause && !eos {
                continue;
            }
            let reply = if action == Action::Pause { self.wait(|st| std::mem::take(&mut st.resume_response)).await? } else { None };
            let held = Bytes::from(std::mem::take(&mut self.vm().stream(self.id).response_body));
            return Ok((held, reply));
        }
    }
}

/// The next piece of a response body and whether it is the last; a consumed source
/// yields an empty last piece once and then stays `Done`.
async fn next_chunk(source: &mut Source) -> Result<(Bytes, bool)> {
    match source {
        Source::Local(bytes) => {
            let b = std::mem::take(bytes);
            *source = Source::Done;
            Ok((b, true))
        }
        Source::Done => Ok((Bytes::new(), true)),
        Source::Upstream(body) => loop {
            match body.frame().await.transpose().map_err(|e| anyhow!("upstream body: {e}"))? {
                Some(f) => match f.into_data() {
                    Ok(d) => return Ok((d, false)),
                    Err(_) => continue, // trailers: not used by MCP
                },
                None => {
                    *source = Source::Done;
                    return Ok((Bytes::new(), true));
                }
            }
        },
    }
}

/// Streams the response body through `on_response_body` and downstream.
struct BodyPump {
    stream: FilterStream,
    tx: mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
}

impl BodyPump {
    async fn run(mut self, held: Bytes, source: Source) {
        if let Err(e) = self.pump(held, source).await {
            tracing::debug!("response body: {e:#}");
            let _ = self.tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        self.stream.end();
    }

    /// Feeds one chunk (or the end) to the filter; returns what may go downstream now.
    fn feed(&self, chunk: &[u8], end_of_stream: bool) -> Result<Option<Bytes>> {
        let mut vm = self.stream.vm();
        let id = self.stream.id;
        vm.stream(id).response_body.extend_from_slice(chunk);
        let action = vm.on_response_body(id, end_of_stream)?;
        let st = vm.stream(id);
        if st.local_reply.take().is_some() {
            bail!("local reply after response headers were sent: Envoy resets the stream");
        }
        Ok(match action {
            Action::Continue => Some(Bytes::from(std::mem::take(&mut st.response_body))),
            Action::Pause => None,
        })
    }

    async fn pump(&mut self, held: Bytes, mut source: Source) -> Result<()> {
        self.send(Some(held)).await?;
        while !matches!(source, Source::Done) {
            let (chunk, eos) = next_chunk(&mut source).await?;
            let out = self.feed(&chunk, eos)?;
            self.send(out).await?;
        }
        Ok(())
    }

    async fn send(&mut self, out: Option<Bytes>) -> Result<()> {
        if let Some(bytes) = out.filter(|b| !b.is_empty()) {
            self.tx.send(Ok(Frame::data(bytes))).await.map_err(|_| anyhow!("downstream went away"))?;
        }
        Ok(())
    }
}

/// Calls `proxy_on_tick` on worker `w` at the period the filter asked for, and performs
/// the root context's HTTP calls.
pub async fn tick_loop(inner: Arc<Inner>, w: usize) {
    loop {
        let period = inner.workers[w].lock().unwrap().tick_period();
        let Some(period) = period else {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        };
        tokio::time::sleep(period).await;
        let calls = {
            let mut vm = inner.workers[w].lock().unwrap();
            if vm.is_failed() || vm.tick().is_err() {
                return;
            }
            let root = vm.root_context_id();
            vm.take_http_calls(root)
        };
        for call in calls {
            let _ = deliver(&inner, w, call).await;
        }
    }
}

/// How long a paused stream may wait for another stream's callback to resume it.
const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Performs `call` against its cluster (an unknown cluster fails the call) and delivers the
/// answer to the VM, then wakes the worker's waiting streams.
async fn deliver(inner: &Inner, w: usize, call: crate::host::HttpCall) -> Result<()> {
    let response = match inner.clusters.get(&call.cluster) {
        Some(addr) => upstream::perform_call(&inner.client, *addr, &call).await,
        None => None,
    };
    let r = inner.workers[w].lock().unwrap_or_else(|p| p.into_inner()).on_http_call_response(&call, response);
    inner.wakeups[w].notify_waiters();
    r
}
