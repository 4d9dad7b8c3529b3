//! `subscriptions/listen` (MCP 2026-07-28): one long-lived POST whose answer is an SSE
//! stream of server notifications, first `notifications/subscriptions/acknowledged`. It
//! cannot be resumed: a client whose stream ends listens again (rmcp reports
//! `SubscriptionEnd::Abrupt`, the Python SDK raises `SubscriptionLost`; both leave the
//! re-listen to the application, which is what [`listen`] callers do).

use std::time::Duration;

use serde_json::{Value, json};

use super::{Error, NEXT_ID, Options, request_body, request_headers};
use crate::mcp_client::sse_data;

/// The acknowledgment notification that establishes a listen stream.
pub const ACKNOWLEDGED: &str = "notifications/subscriptions/acknowledged";

/// An established listen stream.
#[derive(Debug)]
pub struct Listening {
    response: reqwest::Response,
    /// The acknowledged filter (`params.notifications` of the acknowledgment).
    pub accepted: Value,
}

/// Opens a listen stream on `url` asking for `notifications` (a `SubscriptionFilter`
/// object, e.g. `{"toolsListChanged": true}`) and waits up to `timeout` for its
/// acknowledgment.
///
/// Errors: [`Error::Http`] for a non-2xx answer, [`Error::Rpc`] for a JSON-RPC error,
/// [`Error::Transport`] when the stream fails or ends before the acknowledgment, or
/// `timeout` passes.
pub async fn listen(url: &str, notifications: Value, timeout: Duration) -> Result<Listening, Error> {
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let params = json!({"notifications": notifications});
    let transport = |e: &dyn std::fmt::Display| Error::Transport(e.to_string());
    let headers = request_headers("subscriptions/listen", &params, &Options::default()).map_err(|e| transport(&e))?;
    let body = request_body(id, "subscriptions/listen", params, false);
    // No overall timeout: the stream lives until one side ends it.
    let http = reqwest::Client::builder().no_proxy().http1_only().connect_timeout(timeout).build().map_err(|e| transport(&e))?;
    let mut response = http.post(url).headers(headers).body(body.to_string()).send().await.map_err(|e| transport(&e))?;
    if !response.status().is_success() {
        let (status, headers) = (response.status(), response.headers().clone());
        return Err(Error::Http { status, body: response.text().await.unwrap_or_default(), headers });
    }
    let mut text = String::new();
    let acknowledged = tokio::time::timeout(timeout, async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(None) => return Err(Error::Transport(format!("the listen stream ended before its acknowledgment: {text:?}"))),
                Err(e) => return Err(transport(&e)),
            }
            let Some(end) = text.rfind("\n\n") else { continue };
            for message in sse_data(&text[..end + 2]).iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()) {
                if message.get("error").is_some() {
                    return Err(Error::Rpc(super::RpcError::from_message(response.status(), &message["error"])));
                }
                if message["method"] == ACKNOWLEDGED {
                    return Ok(message["params"]["notifications"].clone());
                }
            }
        }
    })
    .await
    .map_err(|_| Error::Transport(format!("no acknowledgment within {timeout:?}")))??;
    Ok(Listening { response, accepted: acknowledged })
}

impl Listening {
    /// Reads the stream until it ends; `Ok` when it ended cleanly (end of body), `Err`
    /// with the reason when it was cut (reset, a proxy's `proxy_close_stream`).
    pub async fn ended(mut self) -> Result<(), String> {
        loop {
            match self.response.chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("{e:#}")),
            }
        }
    }
}
