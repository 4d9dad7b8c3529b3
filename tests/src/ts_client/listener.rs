//! The official TypeScript SDK v2 client (npm `@modelcontextprotocol/client`, pinned in
//! `tests/clients/ts/package.json`) as an MCP 2026-07-28 listener:
//! `tests/clients/ts/listen2026.mjs` negotiates 2026-07-28 (`versionNegotiation: auto`),
//! holds a `subscriptions/listen` stream and listens again whenever it ends, printing one
//! JSON event per line, which [`TsListener`] collects in the background.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use super::node;

/// A running `listen2026.mjs`; killed when dropped.
pub struct TsListener {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl TsListener {
    /// Starts the listener against `url` and waits (up to `timeout`) for its first stream.
    ///
    /// # Errors
    /// Node or the SDK is missing (`make setup-ts-client`), the client could not connect or
    /// negotiate 2026-07-28 (it exits), or no stream was acknowledged in time.
    pub async fn start(url: &str, timeout: Duration) -> Result<TsListener> {
        let mut child = node("listen2026.mjs", "client", url, Stdio::inherit())?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().unwrap().push(event);
            }
        });
        let mut listener = TsListener { child, events };
        let deadline = Instant::now() + timeout;
        while listener.count("acknowledged") == 0 {
            if let Some(status) = listener.child.try_wait()? {
                bail!("the TypeScript listener exited ({status}) before listening");
            }
            if Instant::now() >= deadline {
                bail!("the TypeScript listener had no stream acknowledged within {timeout:?}: {:?}", listener.events());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(listener)
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// How many events of kind `event` (`acknowledged`, `closed`, `error`) so far.
    pub fn count(&self, event: &str) -> usize {
        self.events.lock().unwrap().iter().filter(|e| e["event"] == event).count()
    }

    /// Whether a stream is open now: every closed stream was followed by a new one.
    pub fn listening(&self) -> bool {
        self.count("acknowledged") == self.count("closed") + 1
    }
}
