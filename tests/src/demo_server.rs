//! A demo MCP server for tests and `make run`: stateful Streamable HTTP on `rmcp`.
//!
//! **A demo/test server, not a product.** It exists so Envoy with the filter and the
//! end-to-end tests have real MCP pods to talk to.
//!
//! # Behaviour
//! - Streamable HTTP transport of `rmcp` ([`StreamableHttpService`]) in its stateful
//!   ("legacy session") mode, with rmcp's in-memory [`LocalSessionManager`]: `initialize`
//!   creates a session and the response carries `Mcp-Session-Id`; sessions live in this
//!   process only and are lost when it exits (or after rmcp's idle timeout, 5 minutes
//!   without traffic).
//! - **Responses are SSE.** In stateful mode rmcp answers every JSON-RPC request POST
//!   with `Content-Type: text/event-stream`: a priming event (an `id:` and `retry:` line
//!   with empty `data:`), then one event whose `data:` is the JSON-RPC response, then the
//!   stream ends. Notifications and responses get `202 Accepted` with no body. (rmcp's
//!   `json_response` option applies to its stateless mode only.) A GET with the session id
//!   opens the standalone server-to-client SSE stream.
//! - Tools: `echo` (`text`, optional `sleep_ms` to hold the request) returns `text`;
//!   `whoami` returns the server's [`DemoServerOptions::name`].
//! - A request whose `Mcp-Session-Id` this process does not know is answered by a
//!   middleware in front of rmcp, for every method (POST, GET, DELETE), in the configured
//!   [`UnknownSessionStyle`]: `spec` → `404` (what the MCP spec says; also rmcp's own
//!   answer for POST and GET, body `Not Found: Session not found`, `text/plain`), or
//!   `ts-sdk` → `400` with the JSON-RPC error body TypeScript-SDK servers send
//!   ([`TS_SDK_UNKNOWN_SESSION_BODY`]), and with `ts-sdk` every answer to a known session
//!   carries its `Mcp-Session-Id`, as TypeScript-SDK servers do. The middleware exists because rmcp on its own
//!   answers a DELETE of an unknown session with `202` and because `ts-sdk` must differ
//!   from rmcp's default. It asks rmcp's session manager (`has_session`), so a session
//!   that ended (DELETE, idle timeout) is unknown from then on.
//! - `GET /demo/stats` answers `{"initializations": N, "in_flight": M}`: how many sessions
//!   this process created (each `initialize` creates one), and how many tool calls are
//!   running right now. Tests use the first to tell pinning from recovery (steady
//!   traffic, proxy restarts and control lookups must create none) and the second to
//!   stop a draining pod only once its in-flight calls finished (or to kill one while a
//!   call is surely running).
//! - A request of a known session carrying `x-demo-reject: 1` is answered `400` with a
//!   JSON-RPC error body whose message mentions the session
//!   ([`GENUINE_BAD_REQUEST_BODY`]): a genuine client error on a live session, which a
//!   proxy must pass through untouched (not mistake for "session unknown").
//! - `Host` header validation (rmcp's DNS-rebinding guard, loopback names only by
//!   default) is switched off: behind a proxy or a Kubernetes Service the `Host` is
//!   whatever the client used.
//!
//! # Eras ([`Era`], `--era 2025|2026|dual`)
//! - `2025` (the default): the behaviour above, unchanged. (rmcp 3.11 itself already
//!   answers a 2026-07-28 request — no session, `_meta` protocol version — statelessly
//!   on the same endpoint; in this era the server advertises no tasks extension and
//!   lists no `slow_task`, so such requests only see `echo`/`whoami`.)
//! - `dual`: one endpoint for both eras, as real deployments have. 2025 clients
//!   `initialize` and get sessions exactly as above; 2026-07-28 requests (no session,
//!   `MCP-Protocol-Version: 2026-07-28`, `Mcp-Method`/`Mcp-Name` headers,
//!   per-request `_meta`) are served by rmcp's own stateless path, answered as
//!   `application/json` (rmcp's `json_response`, which applies to its stateless path
//!   only) unless [`DemoServerOptions::sse_2026`]. Adds the tasks extension
//!   (`io.modelcontextprotocol/tasks`) and the `slow_task` tool: see [`era2026`].
//! - `2026`: rmcp's stateless mode only (`legacy_session_mode = false`): no sessions at
//!   all, `initialize` is answered without `Mcp-Session-Id`, the unknown-session
//!   middleware is not installed. Same tools and tasks as `dual`.
//!
//! `GET /demo/stats` also answers `"tasks_created"` (tasks this process created),
//! `"tasks_running"` (tasks not yet terminal), `"listens_opened"` and `"listens_open"`
//! (`subscriptions/listen` streams established, and still open). `"initializations"` counts `initialize`
//! requests handled (in the 2025 era that is the sessions created, as before; stateless
//! 2026 requests, for which rmcp builds a handler per request, do not count).
//!
//! # Restart in place
//! A test restarts a pod "in place" (same address, all sessions lost) by killing the
//! process and starting it again with the same `--listen`. The listener is bound with
//! `tokio::net::TcpListener::bind`, which on Unix sets `SO_REUSEADDR`, so the port can
//! be bound again at once even while connections of the old process sit in `TIME_WAIT`.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, GetTaskResult, Implementation,
    InitializeRequestParams, InitializeResult, ServerCapabilities, ServerConfig, SubscriptionFilter, UpdateTaskParams,
};
use rmcp::service::{RequestContext, RoleServer, SubscriptionContext};
use rmcp::task_manager::TaskManager;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, schemars, tool, tool_handler, tool_router};
use tokio_util::sync::CancellationToken;

pub mod era2026;

/// Body of the `400` that TypeScript-SDK based servers send for a missing or unknown
/// session id (the SDK's example servers), used by [`UnknownSessionStyle::TsSdk`].
pub const TS_SDK_UNKNOWN_SESSION_BODY: &str =
    r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#;

/// Body of the `400` a known session gets for a request with `x-demo-reject: 1`: it looks
/// like a session error (code -32000, the word "session") but the session is alive.
pub const GENUINE_BAD_REQUEST_BODY: &str =
    r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: the session is fine, this request is rejected"},"id":null}"#;

/// Path of the demo server's own counters (JSON).
pub const STATS_PATH: &str = "/demo/stats";

/// Body of the `404` for an unknown session in [`UnknownSessionStyle::Spec`] (the same
/// text rmcp itself sends).
pub const SPEC_UNKNOWN_SESSION_BODY: &str = "Not Found: Session not found";

/// How the server answers a request carrying an `Mcp-Session-Id` it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UnknownSessionStyle {
    /// `404 Not Found` (MCP spec, Streamable HTTP "session management"), body
    /// [`SPEC_UNKNOWN_SESSION_BODY`] as `text/plain`.
    #[default]
    Spec,
    /// Imitate TypeScript-SDK servers: `400 Bad Request`, `application/json` body
    /// [`TS_SDK_UNKNOWN_SESSION_BODY`] (JSON-RPC error -32000). Like them, every answer to
    /// a known session carries its `Mcp-Session-Id` (the SDK's `StreamableHTTPServerTransport`
    /// sets it on every response after initialisation), not only the `initialize` answer.
    TsSdk,
}

/// Which MCP revisions the server speaks (see the module docs, "Eras").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Era {
    /// 2025-era only (sessions via `initialize`); no tasks extension. The default.
    #[default]
    #[value(name = "2025")]
    V2025,
    /// 2026-07-28 only: rmcp's stateless mode, tasks extension, `slow_task`.
    #[value(name = "2026")]
    V2026,
    /// Both on one endpoint: 2025 sessions and stateless 2026-07-28 requests with tasks.
    Dual,
}

impl Era {
    /// `true` if the server speaks 2026-07-28 with the tasks extension (`2026`, `dual`).
    pub fn has_tasks(self) -> bool {
        self != Era::V2025
    }
}

/// Options of the demo server.
#[derive(Debug, Clone)]
pub struct DemoServerOptions {
    /// What the `whoami` tool returns (and the `serverInfo.name` suffix), e.g. `pod-a`.
    pub name: String,
    /// HTTP path of the MCP endpoint, e.g. `/mcp`. Other paths get `404`.
    pub path: String,
    /// Answer to requests with an unknown `Mcp-Session-Id`.
    pub unknown_session: UnknownSessionStyle,
    /// Which revisions the server speaks; [`Era::V2025`] by default.
    pub era: Era,
    /// In eras `2026`/`dual`: answer 2026-07-28 requests as SSE (rmcp's default for its
    /// stateless path: `200`, `text/event-stream`, one event `data: <JSON-RPC response>`,
    /// no priming event, no event id) instead of `application/json`. JSON-RPC errors rmcp
    /// maps to a non-200 status (-32020/-32021/-32022 → 400, -32601 → 404) are
    /// `application/json` either way; -32602 (unknown task) is a `200` and follows this
    /// option.
    pub sse_2026: bool,
}

impl Default for DemoServerOptions {
    fn default() -> Self {
        DemoServerOptions {
            name: "demo".to_string(),
            path: "/mcp".to_string(),
            unknown_session: UnknownSessionStyle::Spec,
            era: Era::V2025,
            sse_2026: false,
        }
    }
}

/// Arguments of the `echo` tool.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// The text to return.
    pub text: String,
    /// Optional: wait this many milliseconds before answering (to hold a request open).
    #[serde(default)]
    pub sleep_ms: Option<u64>,
}

/// The process's counters behind `/demo/stats`.
#[derive(Debug, Default)]
struct Stats {
    initializations: AtomicU64,
    in_flight: AtomicU64,
    tasks_created: AtomicU64,
    listens_opened: AtomicU64,
    listens_open: AtomicU64,
}

/// Counts one running tool call for as long as it lives.
struct Running(Arc<Stats>);

impl Running {
    fn start(stats: &Arc<Stats>) -> Running {
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Running(stats.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The MCP handler: one instance per session (rmcp calls the factory per session), and
/// one per stateless (2026-07-28) request. All share the process's [`TaskManager`].
#[derive(Clone)]
struct DemoHandler {
    name: Arc<str>,
    stats: Arc<Stats>,
    era: Era,
    tasks: TaskManager,
    tool_router: ToolRouter<Self>,
}

impl DemoHandler {
    fn new(name: Arc<str>, stats: Arc<Stats>, era: Era, tasks: TaskManager) -> Self {
        let mut tool_router = Self::tool_router();
        if era.has_tasks() {
            tool_router.merge(Self::era2026_tool_router());
        }
        DemoHandler { name, stats, era, tasks, tool_router }
    }
}

#[tool_router]
impl DemoHandler {
    #[tool(description = "Return the given text (optionally after sleep_ms milliseconds)")]
    async fn echo(&self, Parameters(EchoArgs { text, sleep_ms }): Parameters<EchoArgs>) -> String {
        let _running = Running::start(&self.stats);
        if let Some(ms) = sleep_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        text
    }

    #[tool(description = "Return the name of this server (pod)")]
    async fn whoami(&self) -> String {
        let _running = Running::start(&self.stats);
        self.name.to_string()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for DemoHandler {
    fn get_info(&self) -> ServerConfig {
        let (capabilities, instructions) = if self.era.has_tasks() {
            (
                ServerCapabilities::builder().enable_tools().enable_tool_list_changed().enable_tasks().build(),
                "mcp-affinity demo/test server: tools echo, whoami and slow_task (tasks extension); subscriptions/listen",
            )
        } else {
            (ServerCapabilities::builder().enable_tools().build(), "mcp-affinity demo/test server: tools echo and whoami")
        };
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new(
                format!("mcp-affinity-demo-server/{}", self.name),
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(instructions)
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        self.stats.initializations.fetch_add(1, Ordering::Relaxed);
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if let Some(task) = self.call_tool_as_task(&request, &context)? {
            return Ok(task);
        }
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        self.tool_router.call(tcc).await
    }

    async fn get_task(&self, request: GetTaskParams, _: RequestContext<RoleServer>) -> Result<GetTaskResult, ErrorData> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(&self, request: UpdateTaskParams, _: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.tasks.update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(&self, request: CancelTaskParams, _: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        self.tasks.cancel_task(&request.task_id)
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        self.era.has_tasks().then(|| requested.clone())
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        self.hold_listen(context).await
    }
}

#[derive(Clone)]
struct GuardState {
    sessions: Arc<LocalSessionManager>,
    style: UnknownSessionStyle,
}

/// Answers requests with an unknown `Mcp-Session-Id` in the configured style before
/// they reach rmcp; everything else passes through unchanged.
async fn unknown_session_guard(State(state): State<GuardState>, request: Request, next: Next) -> Response {
    if let Some(value) = request.headers().get("mcp-session-id") {
        // rmcp ignores a non-UTF-8 header value (treats it as absent); such an id can
        // never name a session, so it is unknown.
        let known = match value.to_str() {
            Ok(id) => state.sessions.has_session(&Arc::from(id)).await.unwrap_or(false),
            Err(_) => false,
        };
        if !known {
            tracing::debug!(method = %request.method(), "unknown session id");
            return unknown_session_response(state.style);
        }
        if request.headers().contains_key("x-demo-reject") {
            return Response::builder()
                .status(400)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(GENUINE_BAD_REQUEST_BODY))
                .expect("valid response");
        }
        if state.style == UnknownSessionStyle::TsSdk {
            let value = value.clone();
            let mut response = next.run(request).await;
            response.headers_mut().entry("mcp-session-id").or_insert(value);
            return response;
        }
    }
    next.run(request).await
}

fn unknown_session_response(style: UnknownSessionStyle) -> Response {
    let (status, content_type, body) = match style {
        UnknownSessionStyle::Spec => (404, "text/plain; charset=utf-8", SPEC_UNKNOWN_SESSION_BODY),
        UnknownSessionStyle::TsSdk => (400, "application/json", TS_SDK_UNKNOWN_SESSION_BODY),
    };
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .expect("valid response")
}

/// The axum router of the demo server: the MCP endpoint at `options.path`, behind the
/// unknown-session middleware (not in era `2026`), and [`STATS_PATH`]. `ct` ends all
/// sessions and their SSE streams, and aborts running tasks, when cancelled. Must be
/// called inside a Tokio runtime (it spawns the task that waits for `ct`).
pub fn router(options: &DemoServerOptions, ct: CancellationToken) -> axum::Router {
    let sessions = Arc::new(LocalSessionManager::default());
    let name: Arc<str> = Arc::from(options.name.as_str());
    let stats = Arc::new(Stats::default());
    let counted = stats.clone();
    let era = options.era;
    // One task store for the process: every handler (per session, per stateless
    // request) shares it, so a task created by one request is seen by later ones.
    let tasks = TaskManager::new();
    let handler_tasks = tasks.clone();
    let mut config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .with_cancellation_token(ct.clone());
    if era.has_tasks() {
        // `json_response` only applies to rmcp's stateless path (2026-07-28 requests);
        // 2025 sessions keep their SSE answers.
        config = config.with_json_response(!options.sse_2026);
    }
    if era == Era::V2026 {
        config = config.with_legacy_session_mode(false);
    }
    let service = StreamableHttpService::new(
        move || Ok(DemoHandler::new(name.clone(), counted.clone(), era, handler_tasks.clone())),
        sessions.clone(),
        config,
    );
    // Running tasks end with the server.
    let shutdown_tasks = tasks.clone();
    tokio::spawn(async move {
        ct.cancelled().await;
        shutdown_tasks.shutdown();
    });
    let endpoint = axum::routing::any_service(service);
    let endpoint = if era == Era::V2026 {
        endpoint
    } else {
        let guard = GuardState { sessions, style: options.unknown_session };
        endpoint.layer(axum::middleware::from_fn_with_state(guard, unknown_session_guard))
    };
    let path = if options.path.is_empty() { "/" } else { options.path.as_str() };
    let stats = axum::routing::get(move || {
        let body = serde_json::json!({
            "initializations": stats.initializations.load(Ordering::Relaxed),
            "in_flight": stats.in_flight.load(Ordering::SeqCst),
            "tasks_created": stats.tasks_created.load(Ordering::SeqCst),
            "listens_opened": stats.listens_opened.load(Ordering::SeqCst),
            "listens_open": stats.listens_open.load(Ordering::SeqCst),
            "tasks_running": tasks.running_task_count(),
        });
        async move { axum::Json(body) }
    });
    axum::Router::new().route(path, endpoint).route(STATS_PATH, stats)
}

/// Serves the demo server on `listener` until the process ends.
pub async fn serve(options: DemoServerOptions, listener: tokio::net::TcpListener) -> Result<()> {
    serve_with_shutdown(options, listener, std::future::pending()).await
}

/// Serves the demo server on `listener` until `shutdown` completes; then all sessions
/// are closed, open SSE streams end, and in-flight requests get up to 5 s to finish.
pub async fn serve_with_shutdown(
    options: DemoServerOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ct = CancellationToken::new();
    let app = router(&options, ct.child_token());
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, name = %options.name, path = %options.path, unknown_session = ?options.unknown_session, era = ?options.era, "demo MCP server listening");
    let stop = ct.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        // Ends sessions and SSE streams so graceful shutdown is not held by them.
        stop.cancel();
    });
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res.context("serve")?,
        _ = async {
            ct.cancelled().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => tracing::warn!("graceful shutdown took over 5 s; stopping"),
    }
    Ok(())
}
