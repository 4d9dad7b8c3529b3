//! A fixed number of requests one after the other on one keep-alive HTTP/1.1 connection —
//! what wrk cannot do — for the instruction counts, and the single requests that open and
//! check sessions. Blocking (std `TcpStream`): run it on a blocking thread from async code.
//!
//! The requests are byte for byte those of the Python client (`http.client`) the published
//! instruction counts were first measured with: `Host`, `Accept-Encoding: identity`,
//! `Content-Length`, `Content-Type`, `Accept`, then for a session `MCP-Protocol-Version` and
//! `Mcp-Session-Id`, so that the instructions Envoy spends parsing them compare.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// The steady request's body (`bench/lua/steady.lua`'s).
pub const STEADY: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"}}}"#;
/// The `initialize` body (`bench/lua/initialize.lua`'s).
pub const INITIALIZE: &str =
    r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"wrk","version":"4"}}}"#;
/// `notifications/initialized`.
pub const INITIALIZED: &str = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
/// An MCP 2026-07-28 request without session: `tools/list`, its protocol version and
/// client capabilities in `_meta` (sent with [`STATELESS_HEADERS`]).
pub const STATELESS: &str = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"wrk","version":"4"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#;
/// The SEP-2243 headers of [`STATELESS`] (no `Mcp-Name`: `tools/list` has none).
pub const STATELESS_HEADERS: &str = "MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/list\r\n";

/// What the bench reads of an answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `x-pod` (the canned pods name themselves in it).
    pub pod: Option<String>,
    /// `Mcp-Session-Id`.
    pub session: Option<String>,
    /// The body as text.
    pub body: String,
}

/// One HTTP/1.1 connection to `host:port`, reused for every request; a connection the peer
/// closed is an error, never silently reopened.
pub struct Connection {
    host: String,
    path: String,
    reader: BufReader<TcpStream>,
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`).
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    Ok((host.to_string(), path))
}

impl Connection {
    /// Connects to `url`'s host; every read and write times out after `timeout`.
    pub fn open(url: &str, timeout: Duration) -> Result<Connection> {
        let (host, path) = split_url(url)?;
        let stream = TcpStream::connect(&host).with_context(|| format!("connect {host}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Connection { host, path, reader: BufReader::new(stream) })
    }

    /// `POST` of `body` (JSON) to the URL's path, with `session` as `Mcp-Session-Id`.
    pub fn post(&mut self, body: &str, session: Option<&str>) -> Result<Answer> {
        self.post_with(body, session, "")
    }

    /// [`Connection::post`] with `extra` header lines (each ending in `\r\n`) after the others.
    pub fn post_with(&mut self, body: &str, session: Option<&str>, extra: &str) -> Result<Answer> {
        let mut req = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nAccept-Encoding: identity\r\nContent-Length: {}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n",
            self.path,
            self.host,
            body.len()
        );
        if let Some(sid) = session {
            req.push_str(&format!("MCP-Protocol-Version: 2025-06-18\r\nMcp-Session-Id: {sid}\r\n"));
        }
        req.push_str(extra);
        req.push_str("\r\n");
        req.push_str(body);
        self.reader.get_mut().write_all(req.as_bytes()).context("send the request")?;
        read_answer(&mut self.reader)
    }

    /// `GET path` on this connection.
    pub fn get(&mut self, path: &str) -> Result<Answer> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.reader.get_mut().write_all(req.as_bytes()).context("send the request")?;
        read_answer(&mut self.reader)
    }
}

/// Reads one HTTP/1.1 response (`Content-Length` or chunked body). Errors on EOF before a
/// whole response (the peer closed the connection) or a malformed one.
pub fn read_answer(r: &mut impl BufRead) -> Result<Answer> {
    let mut line = String::new();
    ensure!(r.read_line(&mut line)? > 0, "the connection was closed before an answer");
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("bad status line {line:?}"))?;
    let mut answer = Answer { status, ..Answer::default() };
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        ensure!(r.read_line(&mut line)? > 0, "the connection was closed in the headers");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { bail!("bad header line {l:?}") };
        let v = v.trim().to_string();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(v.parse::<usize>().with_context(|| format!("content-length {v}"))?),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "x-pod" => answer.pod = Some(v),
            "mcp-session-id" => answer.session = Some(v),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            ensure!(r.read_line(&mut line)? > 0, "the connection was closed in a chunk");
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16).with_context(|| format!("chunk size {line:?}"))?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).context("the connection was closed in the body")?;
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// One `POST` on a new connection (closed after it).
pub fn post_once(url: &str, body: &str, session: Option<&str>, timeout: Duration) -> Result<Answer> {
    Connection::open(url, timeout)?.post(body, session)
}

/// What a sequential run saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Run {
    /// Requests sent (each answered 200).
    pub requests: u64,
    /// The distinct `x-pod` values, in order of first appearance.
    pub pods: Vec<String>,
    /// Distinct session ids issued (initialize runs).
    pub sessions: usize,
    /// Wall time of the whole run, s.
    pub seconds: f64,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "requests={} connections=1 pods={} sessions={} seconds={:.3}", self.requests, self.pods.join(","), self.sessions, self.seconds)
    }
}

/// `count` steady requests of session `sid` through `url` on one connection. Errors on an
/// answer other than 200 or a closed connection (either makes the count meaningless).
pub fn steady(url: &str, sid: &str, count: u64) -> Result<Run> {
    run(url, count, Kind::Steady(sid))
}

/// `count` `initialize` requests through `url` on one connection, each answered 200 with a
/// new `Mcp-Session-Id` (errors otherwise, or on a closed connection).
pub fn initialize(url: &str, count: u64) -> Result<Run> {
    run(url, count, Kind::Initialize)
}

/// `count` MCP 2026-07-28 requests without session ([`STATELESS`]) through `url` on one
/// connection, each answered 200 without `Mcp-Session-Id` (errors otherwise).
pub fn stateless(url: &str, count: u64) -> Result<Run> {
    run(url, count, Kind::Stateless)
}

/// What a sequential run sends.
enum Kind<'a> {
    Steady(&'a str),
    Initialize,
    Stateless,
}

fn run(url: &str, count: u64, kind: Kind) -> Result<Run> {
    let mut conn = Connection::open(url, Duration::from_secs(60))?;
    let (body, sid, extra) = match kind {
        Kind::Steady(sid) => (STEADY, Some(sid), ""),
        Kind::Initialize => (INITIALIZE, None, ""),
        Kind::Stateless => (STATELESS, None, STATELESS_HEADERS),
    };
    let (mut pods, mut sessions) = (Vec::<String>::new(), HashSet::new());
    let t0 = Instant::now();
    for i in 1..=count {
        let a = conn.post_with(body, sid, extra).with_context(|| format!("request {i}/{count} through {url}"))?;
        ensure!(a.status == 200, "request {i}/{count} through {url} answered {}", a.status);
        if matches!(kind, Kind::Stateless) {
            ensure!(a.session.is_none(), "request {i}/{count} through {url}: a 2026-era answer with a session id");
        } else if sid.is_none() {
            let new = a.session.as_deref().filter(|s| !sessions.contains(*s));
            let Some(new) = new else { bail!("request {i}/{count} through {url}: answer without a new Mcp-Session-Id ({:?})", a.session) };
            sessions.insert(new.to_string());
        }
        let pod = a.pod.unwrap_or_else(|| "-".into());
        if !pods.contains(&pod) {
            pods.push(pod);
        }
    }
    Ok(Run { requests: count, pods, sessions: sessions.len(), seconds: t0.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_length_and_chunked_answers() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nX-Pod: 2\r\nmcp-session-id: abc\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut r = BufReader::new(raw.as_bytes());
        let a = read_answer(&mut r).unwrap();
        assert_eq!(a, Answer { status: 200, pod: Some("2".into()), session: Some("abc".into()), body: "hello".into() });
        let b = read_answer(&mut r).unwrap();
        assert_eq!((b.status, b.body.as_str(), b.pod), (503, "abcde", None));
        assert!(read_answer(&mut r).unwrap_err().to_string().contains("closed"));
        let mut cut = BufReader::new("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort".as_bytes());
        assert!(read_answer(&mut cut).is_err());
    }

    #[test]
    fn splits_urls() {
        assert_eq!(split_url("http://127.0.0.1:8080/mcp").unwrap(), ("127.0.0.1:8080".into(), "/mcp".into()));
        assert_eq!(split_url("http://127.0.0.1:8080").unwrap(), ("127.0.0.1:8080".into(), "/".into()));
        assert!(split_url("https://x/").is_err());
    }
}
