//! The real rmcp Streamable HTTP client, for tests that must show a standard MCP client
//! works (through the proxy, across pod loss, ...).
//!
//! rmcp's client re-initializes by itself when a request that carried a session id gets
//! `404` (its `SessionExpired` handling: new `initialize`, `notifications/initialized`,
//! then the failed request is retried once). A `400` is an error to it.

use anyhow::{Context, Result, anyhow};
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

/// A connected rmcp client (the `initialize` handshake is done).
pub struct RmcpClient {
    service: RunningService<RoleClient, ClientConfig>,
}

/// What [`check`] observed.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Names of the tools `tools/list` returned (sorted).
    pub tools: Vec<String>,
    /// What `whoami` returned.
    pub whoami: String,
    /// What `echo` returned for the text given to [`check`].
    pub echo: String,
}

impl RmcpClient {
    /// Connects to the MCP endpoint `url` (e.g. `http://127.0.0.1:10000/mcp`) and runs
    /// the `initialize` handshake.
    pub async fn connect(url: &str) -> Result<RmcpClient> {
        let transport = StreamableHttpClientTransport::from_uri(url.to_string());
        let service = ClientConfig::default()
            .serve(transport)
            .await
            .with_context(|| format!("rmcp client: connect to {url}"))?;
        Ok(RmcpClient { service })
    }

    /// Names of all tools (all pages), sorted.
    pub async fn list_tools(&self) -> Result<Vec<String>> {
        let tools = self.service.list_all_tools().await.context("rmcp client: tools/list")?;
        let mut names: Vec<String> = tools.into_iter().map(|t| t.name.to_string()).collect();
        names.sort();
        Ok(names)
    }

    /// Calls tool `name` with `arguments` (a JSON object) and returns the text of its
    /// first content block; a tool error (`isError`) is an error.
    pub async fn call_text(&self, name: &str, arguments: Value) -> Result<String> {
        let args = match arguments {
            Value::Object(map) => map,
            Value::Null => Default::default(),
            other => return Err(anyhow!("tool arguments must be an object, got {other}")),
        };
        let result = self
            .service
            .call_tool(CallToolRequestParams::new(name.to_string()).with_arguments(args))
            .await
            .with_context(|| format!("rmcp client: tools/call {name}"))?;
        if result.is_error == Some(true) {
            return Err(anyhow!("rmcp client: tool {name} failed: {result:?}"));
        }
        result
            .content
            .iter()
            .find_map(|c| c.as_text().map(|t| t.text.clone()))
            .ok_or_else(|| anyhow!("rmcp client: tool {name} returned no text: {result:?}"))
    }

    /// The demo server's `whoami`.
    pub async fn whoami(&self) -> Result<String> {
        self.call_text("whoami", json!({})).await
    }

    /// The demo server's `echo`.
    pub async fn echo(&self, text: &str) -> Result<String> {
        self.call_text("echo", json!({"text": text})).await
    }

    /// Closes the client (rmcp sends `DELETE` for the session).
    pub async fn close(self) -> Result<()> {
        self.service.cancel().await.context("rmcp client: close")?;
        Ok(())
    }
}

/// Connects the rmcp client to `url`, lists the tools, calls `whoami` and `echo(echo_text)`,
/// and closes. Fails on the first error.
pub async fn check(url: &str, echo_text: &str) -> Result<CheckReport> {
    let client = RmcpClient::connect(url).await?;
    let tools = client.list_tools().await?;
    let whoami = client.whoami().await?;
    let echo = client.echo(echo_text).await?;
    client.close().await?;
    Ok(CheckReport { tools, whoami, echo })
}
