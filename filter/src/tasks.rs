//! The MCP 2026-07-28 era and its tasks extension, as far as routing needs them: which
//! requests belong to the era without sessions (headers only), which concern a task, and
//! the task a `tools/call` answer created.
//!
//! Sources: MCP 2026-07-28 changelog (no sessions, no `initialize`; every POST carries
//! `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name`, SEP-2243); the extension
//! `io.modelcontextprotocol/tasks` (repository `modelcontextprotocol/ext-tasks`,
//! `specification/draft/tasks.md`): a server may answer a `tools/call` with a
//! `CreateTaskResult` (`result.resultType: "task"`, `result.taskId`, `result.ttlMs`); the
//! client then sends `tasks/get`, `tasks/update` and `tasks/cancel` with `params.taskId`
//! and sets `Mcp-Name` to that id "so that load balancers can route them to the server
//! instance holding its state". An `Mcp-Name` value that is not a plain header token is
//! sent as `=?base64?<standard base64 of the UTF-8 value>?=` (rmcp
//! `transport/common/mcp_headers.rs`).

use base64::Engine as _;
use serde::Deserialize;

/// The first protocol version without sessions.
pub const STATELESS_SINCE: &str = "2026-07-28";

/// The only method whose answer may create a task (tasks extension, "Supported Methods").
pub const TOOLS_CALL: &str = "tools/call";

/// The 2026-era long-lived POST stream of server notifications (no resumption: a client
/// whose stream ends re-listens, rmcp `SubscriptionEnd::Abrupt`, Python SDK
/// `SubscriptionLost`).
pub const SUBSCRIPTIONS_LISTEN: &str = "subscriptions/listen";

/// Task statuses after which a task never changes (tasks extension, "Task Status").
pub const TERMINAL_STATUSES: [&str; 3] = ["completed", "failed", "cancelled"];

/// Methods about an existing task; `Mcp-Name` carries its id.
pub const TASK_METHODS: [&str; 3] = ["tasks/get", "tasks/update", "tasks/cancel"];

/// Longest task id the filter keeps a pin for, bytes (a larger one is routed like any
/// request).
pub const MAX_TASK_ID_LEN: usize = 256;

/// The spec's answer for a task id the server does not know: JSON-RPC "Invalid params".
pub const UNKNOWN_TASK_CODE: i32 = crate::jsonrpc::code::INVALID_PARAMS;

/// Whether `MCP-Protocol-Version` names the era without sessions: versions are dates
/// (`YYYY-MM-DD`), so they compare as text.
pub fn is_stateless(version: &[u8]) -> bool {
    version.len() == STATELESS_SINCE.len() && version >= STATELESS_SINCE.as_bytes()
}

/// Whether `Mcp-Method` names a request about an existing task.
pub fn is_task_method(method: &[u8]) -> bool {
    TASK_METHODS.iter().any(|m| m.as_bytes() == method)
}

/// The task id an `Mcp-Name` header carries: its value, or the decoded `=?base64?…?=`
/// form; `None` when empty, longer than [`MAX_TASK_ID_LEN`], or not valid base64 UTF-8.
pub fn task_id(name: &[u8]) -> Option<String> {
    let id = match name.strip_prefix(b"=?base64?").and_then(|n| n.strip_suffix(b"?=")) {
        Some(encoded) => String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).ok()?).ok()?,
        None => std::str::from_utf8(name).ok()?.to_string(),
    };
    (!id.is_empty() && id.len() <= MAX_TASK_ID_LEN).then_some(id)
}

/// The shared-data key of a task's pin. Session ids are visible ASCII without spaces, so
/// no session id is ever equal to a task's key.
pub fn pin_key(task_id: &str) -> String {
    let mut key = String::with_capacity(PIN_KEY_PREFIX.len() + task_id.len());
    key.push_str(PIN_KEY_PREFIX);
    key.push_str(task_id);
    key
}

/// The start of every task pin's key ([`pin_key`]).
pub const PIN_KEY_PREFIX: &str = "task ";

/// A task a `tools/call` answer created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedTask {
    pub task_id: String,
    /// `ttlMs`: the server may discard the task this long after its creation; `None`
    /// (`null`): no limit.
    pub ttl_ms: Option<u64>,
    /// Created in a terminal status already.
    pub terminal: bool,
}

#[derive(Deserialize)]
struct Response {
    result: Option<TaskResult>,
    error: Option<RpcError>,
}

#[derive(Deserialize)]
struct RpcError {
    code: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskResult {
    result_type: Option<String>,
    task_id: Option<String>,
    ttl_ms: Option<u64>,
    status: Option<String>,
}

impl TaskResult {
    fn terminal(&self) -> bool {
        self.status.as_deref().is_some_and(|s| TERMINAL_STATUSES.contains(&s))
    }
}

/// The task a `tools/call` answer created, if it did: the JSON-RPC response is the body
/// (`application/json`) or the `data:` of one event of an SSE body
/// (`text/event-stream`, events separated by a blank line, multi-line `data:` joined
/// with `\n`). Anything else — a standard result, an error, malformed JSON — is `None`.
pub fn created_task(body: &[u8], sse: bool) -> Option<CreatedTask> {
    find_response(body, sse, |r| {
        let result = r.result?;
        let terminal = result.terminal();
        let task_id = result.task_id.filter(|_| result.result_type.as_deref() == Some("task"))?;
        (!task_id.is_empty() && task_id.len() <= MAX_TASK_ID_LEN).then_some(CreatedTask { task_id, ttl_ms: result.ttl_ms, terminal })
    })
}

/// Whether the answer of a `tasks/get|update|cancel` says the task is over for its pod:
/// `result.status` is terminal ([`TERMINAL_STATUSES`]), or the error is -32602 (the pod
/// does not know the task: never created there, or discarded after its TTL). `false` for
/// anything else, malformed JSON included. Same body shapes as [`created_task`].
pub fn answer_is_terminal(body: &[u8], sse: bool) -> bool {
    find_response(body, sse, |r| match (r.result, r.error) {
        (Some(result), _) if result.terminal() => Some(()),
        (_, Some(e)) if e.code == i64::from(UNKNOWN_TASK_CODE) => Some(()),
        _ => None,
    })
    .is_some()
}

/// The first JSON-RPC response of `body` (the body itself, or one SSE event's `data:`)
/// that `pick` accepts.
fn find_response<T>(body: &[u8], sse: bool, pick: impl Fn(Response) -> Option<T>) -> Option<T> {
    let parse = |json: &[u8]| serde_json::from_slice::<Response>(json).ok().and_then(&pick);
    if !sse {
        return parse(body);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split("\n\n").flat_map(|e| e.split("\r\n\r\n")).find_map(|event| {
        let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
        (!data.is_empty()).then(|| parse(data.join("\n").as_bytes())).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_era_is_told_by_the_protocol_version() {
        assert!(is_stateless(b"2026-07-28") && is_stateless(b"2027-01-01"));
        assert!(!is_stateless(b"2025-11-25") && !is_stateless(b"2025-06-18") && !is_stateless(b"") && !is_stateless(b"2026-07-28x"));
        assert!(is_task_method(b"tasks/get") && is_task_method(b"tasks/cancel") && !is_task_method(b"tasks/list") && !is_task_method(b"tools/call"));
    }

    #[test]
    fn task_ids_come_plain_or_base64() {
        assert_eq!(task_id(b"786512e2-9e0d").as_deref(), Some("786512e2-9e0d"));
        assert_eq!(task_id(b"=?base64?dMOkc2s=?=").as_deref(), Some("täsk"));
        assert_eq!(task_id(b"=?base64?not base64?="), None);
        assert_eq!(task_id(b""), None);
        assert_eq!(task_id(&[b'a'; MAX_TASK_ID_LEN + 1]), None);
        assert_eq!(pin_key("t1"), "task t1");
    }

    #[test]
    fn a_task_answer_is_found_in_json_and_sse() {
        let json = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"t-1","status":"working","ttlMs":60000,"pollIntervalMs":500}}"#;
        let task = CreatedTask { task_id: "t-1".into(), ttl_ms: Some(60000), terminal: false };
        assert_eq!(created_task(json, false), Some(task.clone()));
        let sse = format!("id: 0\nretry: 3000\ndata:\n\nevent: message\ndata: {}\n\n", std::str::from_utf8(json).unwrap());
        assert_eq!(created_task(sse.as_bytes(), true), Some(task));
        let unlimited = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"t-2","status":"working","ttlMs":null}}"#;
        assert_eq!(created_task(unlimited, false).unwrap().ttl_ms, None);
    }

    #[test]
    fn terminal_answers_are_told_from_working_ones() {
        let get = |status: &str| format!(r#"{{"jsonrpc":"2.0","id":3,"result":{{"resultType":"complete","taskId":"t","status":"{status}","ttlMs":1}}}}"#);
        for status in TERMINAL_STATUSES {
            assert!(answer_is_terminal(get(status).as_bytes(), false), "{status}");
            assert!(answer_is_terminal(format!("data: {}\n\n", get(status)).as_bytes(), true), "{status} in SSE");
        }
        for status in ["working", "input_required"] {
            assert!(!answer_is_terminal(get(status).as_bytes(), false), "{status}");
        }
        assert!(answer_is_terminal(br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"unknown task: t"}}"#, false));
        assert!(!answer_is_terminal(br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32603,"message":"internal"}}"#, false));
        assert!(!answer_is_terminal(b"not json", false) && !answer_is_terminal(b"", true));
        let done = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":"t-3","status":"completed"}}"#;
        assert!(created_task(done, false).unwrap().terminal, "created terminal");
    }

    #[test]
    fn other_answers_create_no_task() {
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","taskId":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32021,"message":"Missing required client capability"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"task","taskId":""}}"#,
            b"not json",
        ] {
            assert_eq!(created_task(body, false), None, "{}", String::from_utf8_lossy(body));
            assert_eq!(created_task(&[b"data: ", body, b"\n\n"].concat(), true), None);
        }
    }
}
