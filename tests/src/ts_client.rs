//! The official TypeScript MCP SDK clients. [`TsListener`]: the v2 client as an MCP
//! 2026-07-28 listener (`listener.rs`). [`TsClient`]: the 1.x client (npm
//! `@modelcontextprotocol/sdk`, pinned in
//! `tests/clients/ts/package.json`, installed by `make setup-ts-client` into
//! `tests/clients/ts/node_modules`), driven as a process: a second real client beside
//! rmcp, with the SDK's own HTTP stack (Node's fetch), session handling and error paths.
//!
//! `tests/clients/ts/client.mjs` connects, prints the session id, then answers one JSON
//! command per line; [`TsClient`] speaks that protocol. The process is killed when the
//! [`TsClient`] is dropped.

mod listener;

pub use listener::TsListener;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// How long one command (connect, a tool call) may take before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// `tests/clients/ts`.
pub fn client_dir() -> PathBuf {
    crate::envoy::workspace_root().join("tests/clients/ts")
}

/// One TypeScript SDK client holding one MCP session.
pub struct TsClient {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// The `Mcp-Session-Id` the SDK holds after `initialize`.
    pub session_id: String,
}

/// Starts `node SCRIPT URL` in `tests/clients/ts` with piped standard input and output,
/// killed when dropped; `package` (`sdk`, `client`) must be installed under
/// `node_modules/@modelcontextprotocol/`.
///
/// # Errors
/// The package is missing (`make setup-ts-client`), or node does not start.
fn node(script: &str, package: &str, url: &str, stderr: Stdio) -> Result<Child> {
    let dir = client_dir();
    if !dir.join("node_modules/@modelcontextprotocol").join(package).is_dir() {
        bail!("the TypeScript MCP SDK package @modelcontextprotocol/{package} is not installed in {}: run `make setup-ts-client`", dir.display());
    }
    Command::new("node")
        .arg(dir.join(script))
        .arg(url)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start node {script} (the TypeScript MCP SDK)"))
}

impl TsClient {
    /// Starts the client against `url` and waits for its session.
    ///
    /// # Errors
    /// Node or the SDK is missing (`make setup-ts-client`), or the client could not
    /// connect (its standard error is in the message).
    pub async fn connect(url: &str) -> Result<TsClient> {
        let mut child = node("client.mjs", "sdk", url, Stdio::piped())?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut c = TsClient { child, stdin, stdout, session_id: String::new() };
        let hello = match c.read().await {
            Ok(v) => v,
            Err(e) => {
                let mut err = String::new();
                if let Some(mut stderr) = c.child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut err)).await;
                }
                bail!("TypeScript client did not connect to {url}: {e}: {err}");
            }
        };
        c.session_id = hello["session_id"].as_str().ok_or_else(|| anyhow!("no session id from the TypeScript client: {hello}"))?.to_string();
        Ok(c)
    }

    async fn read(&mut self) -> Result<Value> {
        let line = tokio::time::timeout(COMMAND_TIMEOUT, self.stdout.next_line())
            .await
            .context("TypeScript client: no answer in time")??
            .ok_or_else(|| anyhow!("TypeScript client exited"))?;
        serde_json::from_str(&line).with_context(|| format!("TypeScript client said {line:?}"))
    }

    async fn send(&mut self, command: Value) -> Result<Value> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.context("write to the TypeScript client")?;
        self.read().await
    }

    /// `tools/call` of `tool` with `arguments`: the text of the result's first text block.
    /// The SDK's session id must not have changed (a client keeps its session through
    /// recovery).
    ///
    /// # Errors
    /// The SDK's error (an HTTP error status, a JSON-RPC error, a tool error), as text.
    pub async fn call(&mut self, tool: &str, arguments: Value) -> Result<String> {
        let answer = self.send(json!({"tool": tool, "arguments": arguments})).await?;
        if answer["session_id"].as_str() != Some(self.session_id.as_str()) {
            bail!("the TypeScript client's session id changed from {} to {}", self.session_id, answer["session_id"]);
        }
        match answer["ok"].as_bool() {
            Some(true) => Ok(answer["text"].as_str().unwrap_or_default().to_string()),
            _ => Err(anyhow!("{}", answer["error"].as_str().unwrap_or("unknown error"))),
        }
    }

    /// Ends the session (the SDK's DELETE) and waits for the process to exit.
    pub async fn close(mut self) -> Result<()> {
        self.send(json!({"close": true})).await?;
        tokio::time::timeout(COMMAND_TIMEOUT, self.child.wait()).await.context("TypeScript client did not exit")??;
        Ok(())
    }
}
