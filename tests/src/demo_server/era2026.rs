//! The 2026-07-28 part of the demo server: the `slow_task` tool and the tasks extension
//! (`io.modelcontextprotocol/tasks`, SEP-2663), in eras `2026` and `dual`.
//!
//! # What rmcp does, and what this module adds
//! rmcp 3.11 does all of the protocol work:
//! - its Streamable HTTP service routes a 2026-07-28 request (no `initialize`, no session,
//!   `_meta["io.modelcontextprotocol/protocolVersion"]` and
//!   `_meta["io.modelcontextprotocol/clientCapabilities"]` in `params`) to its stateless
//!   path, building a fresh handler for that request; it validates the SEP-2243 headers
//!   against the body (`Mcp-Method` must equal the method; `Mcp-Name` must equal
//!   `params.name` for `tools/call`, `params.taskId` for `tasks/get|update|cancel`,
//!   Base64-wrapped as `=?base64?…?=` only when needed): a missing or wrong one is JSON-RPC
//!   error -32020 (HTTP 400);
//! - its `ServerHandler` dispatch gates `tasks/*` on the request's declared tasks
//!   extension (-32021 "missing required client capability", HTTP 400, when the request
//!   does not declare it) and refuses a `CreateTaskResult` to a request that did not
//!   declare it;
//! - its [`TaskManager`](rmcp::task_manager::TaskManager) keeps the tasks in process memory, runs them, answers `tasks/get`
//!   (status, and the inlined `result`/`error` once terminal), `tasks/update` and
//!   cooperative `tasks/cancel`, and answers -32602 (invalid params, `unknown task: <id>`)
//!   for a task id it does not hold (another pod's, or one evicted after its TTL).
//!
//! This module only decides *when* a `tools/call` becomes a task: `slow_task` called by a
//! request that declares the tasks extension is spawned on the process's [`TaskManager`](rmcp::task_manager::TaskManager)
//! and answered at once with rmcp's `CreateTaskResult` (`resultType: "task"`, `taskId`,
//! `status: "working"`, `ttlMs`, `pollIntervalMs`, ...). Without the extension (or from a
//! 2025 session) `slow_task` runs synchronously: the call sleeps `ms` and answers the
//! result directly. The task (or the synchronous call) sleeps `ms` milliseconds, then
//! completes with one text content: the server's
//! [`DemoServerOptions::name`](super::DemoServerOptions::name), so a test sees which pod
//! ran it. A task cancelled
//! with `tasks/cancel` stops sleeping and ends `cancelled`.
//!
//! `subscriptions/listen` (eras `2026` and `dual`): rmcp acknowledges the stream
//! (`notifications/subscriptions/acknowledged`, the accepted filter: whatever the client
//! asked for among `toolsListChanged`) and this module holds it open, sending nothing more,
//! until the client or the proxy ends it; `/demo/stats` counts the streams opened and open.

//!
//! # On the wire (era `dual`, default JSON answers)
//! A task-creating `tools/call` is answered `200`, `Content-Type: application/json`, no
//! `Mcp-Session-Id`, and nothing in the headers names the task or the pod; the body is
//! ```json
//! {"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"d4fc3d7f-82e0-4888-aede-94cca3004755",
//!  "status":"working","statusMessage":"sleeping 300 ms","createdAt":"2026-12-06T10:43:36.540985398+00:00",
//!  "lastUpdatedAt":"2026-12-06T10:43:36.540985398+00:00","ttlMs":300000,"pollIntervalMs":100}}
//! ```
//! `tasks/get` (headers `Mcp-Method: tasks/get`, `Mcp-Name: <taskId>`) is answered with
//! `result.resultType: "complete"`, the task fields and, once completed,
//! `result.result` = the `CallToolResult` (`{"content":[{"type":"text","text":"pod-a"}],
//! "isError":false,"resultType":"complete"}`). An unknown id: `200`,
//! `{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"unknown task: <id>"}}`.
//! With `--sse-2026` the same JSON-RPC messages come as `text/event-stream`, one
//! `data:` event each (no priming event).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, CreateTaskResult};
use rmcp::service::{RequestContext, RoleServer, SubscriptionContext};
use rmcp::task_manager::{TaskExit, TaskOptions};
use rmcp::{ErrorData, schemars, tool, tool_router};

use super::{DemoHandler, Running};

/// Name of the tool that becomes a task when the request declares the tasks extension.
pub const SLOW_TASK_TOOL: &str = "slow_task";

/// `pollIntervalMs` the server suggests for its tasks.
pub const TASK_POLL_INTERVAL_MS: u64 = 100;

/// `ttlMs` of the server's tasks (rmcp's default, 5 minutes): a task still running then
/// is failed; a terminal task is kept one more TTL, then `tasks/get` answers -32602.
pub const TASK_TTL_MS: u64 = rmcp::task_manager::DEFAULT_TASK_TTL_MS;

/// Arguments of the `slow_task` tool.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SlowTaskArgs {
    /// How long the work takes, in milliseconds.
    pub ms: u64,
}

fn pod_result(name: &str) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(name.to_string())])
}

#[tool_router(router = era2026_tool_router, vis = "pub(super)")]
impl DemoHandler {
    /// The synchronous path of `slow_task` (no tasks extension declared).
    #[tool(description = "Sleep ms milliseconds, then return the name of this server (pod). \
        Runs as a task (io.modelcontextprotocol/tasks) when the request declares the extension.")]
    async fn slow_task(&self, Parameters(SlowTaskArgs { ms }): Parameters<SlowTaskArgs>) -> CallToolResult {
        let _running = Running::start(&self.stats);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        pod_result(&self.name)
    }
}

/// Counts one open `subscriptions/listen` stream for as long as it lives.
struct Listening<'a>(&'a AtomicU64);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DemoHandler {
    /// Holds an acknowledged `subscriptions/listen` stream open until it is cancelled (the
    /// client or a proxy ended the HTTP stream), counted in `/demo/stats`.
    pub(super) async fn hold_listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        self.stats.listens_opened.fetch_add(1, Ordering::SeqCst);
        self.stats.listens_open.fetch_add(1, Ordering::SeqCst);
        let _open = Listening(&self.stats.listens_open);
        context.cancelled().await;
        Ok(())
    }
}

impl DemoHandler {
    /// `Some(CreateTaskResult)` if this `tools/call` becomes a task: tool `slow_task`, a
    /// server era with tasks, and a request that declares the tasks extension (in its
    /// `_meta` client capabilities, or a 2025 session's `initialize`). `None`: answer it
    /// synchronously through the tool router.
    pub(super) fn call_tool_as_task(
        &self,
        request: &CallToolRequestParams,
        context: &RequestContext<RoleServer>,
    ) -> Result<Option<CallToolResponse>, ErrorData> {
        let declared = context.client_capabilities().is_some_and(|caps| caps.supports_tasks());
        if !(self.era.has_tasks() && declared && request.name == SLOW_TASK_TOOL) {
            return Ok(None);
        }
        let args: SlowTaskArgs =
            serde_json::from_value(serde_json::Value::Object(request.arguments.clone().unwrap_or_default()))
                .map_err(|e| ErrorData::invalid_params(format!("slow_task arguments: {e}"), None))?;
        let name = self.name.clone();
        let options = TaskOptions::new()
            .with_ttl_ms(TASK_TTL_MS)
            .with_poll_interval_ms(TASK_POLL_INTERVAL_MS)
            .with_status_message(format!("sleeping {} ms", args.ms));
        let task = self.tasks.spawn(options, move |ctx| {
            Box::pin(async move {
                tokio::select! {
                    _ = ctx.cancelled() => Err(TaskExit::Cancelled),
                    _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(pod_result(&name)),
                }
            })
        });
        self.stats.tasks_created.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(task_id = %task.task_id, ms = args.ms, "slow_task became a task");
        Ok(Some(CallToolResponse::Task(CreateTaskResult::new(task))))
    }
}
