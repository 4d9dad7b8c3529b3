//! Task pins (MCP 2026-07-28 era, extension `io.modelcontextprotocol/tasks`): which upstream
//! host holds a task. The filter that saw the `tools/call` answer creating a task writes
//! its pin through to control (`PUT {prefix}/tasks/{id}`); another Envoy, or this one after
//! a restart, reads it back (`GET {prefix}/tasks/{id}`) when a `tasks/get` names a task it
//! holds no pin for (`docs/control-api.md`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::sessions::{InvalidField, encode_segment};

/// Longest task id accepted, bytes.
pub const MAX_TASK_ID_LEN: usize = 256;

/// `{prefix}/tasks/{percent-encoded id}`: the path of one task's pin.
pub fn task_path(prefix: &str, task_id: &str) -> String {
    format!("{prefix}/tasks/{}", encode_segment(task_id))
}

/// Whether `id` is an acceptable task id: 1..=[`MAX_TASK_ID_LEN`] bytes of UTF-8 without
/// control characters (the extension leaves ids to the server; they are UUIDs in practice).
pub fn is_valid_task_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TASK_ID_LEN && !id.chars().any(char::is_control)
}

/// Body of `PUT /v1/tasks/{id}`: the task lives on `upstream`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutTask {
    /// The upstream host whose answer created the task, `ip:port`.
    pub upstream: String,
    /// The task's `ttlMs` (the server may discard it this long after its creation); `None`
    /// (`null`) when unlimited. Control keeps the pin this long, at most its own cap.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// The task reached a terminal status (`completed`, `failed`, `cancelled`; the filter
    /// saw it in a `tasks/get` or `tasks/cancel` answer): it no longer counts as unfinished
    /// on its upstream ([`crate::draining::Drain::tasks`]). An existing pin keeps its
    /// expiry; `ttl_ms` applies only when there is none.
    #[serde(default, skip_serializing_if = "is_false")]
    pub terminal: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl PutTask {
    /// Checks `upstream`: 1..=256 bytes of visible ASCII.
    ///
    /// # Errors
    /// [`InvalidField`] naming it.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let u = &self.upstream;
        if u.is_empty() || u.len() > 256 || !u.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(InvalidField("`upstream` must be 1..=256 bytes of visible ASCII".into()));
        }
        Ok(())
    }
}

/// A task's pin as control keeps it (`GET /v1/tasks/{id}` answers it). Times are Unix
/// milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub upstream: String,
    pub created_at_ms: u64,
    /// When control forgets the pin: creation plus the task's `ttlMs`, at most control's cap.
    pub expires_at_ms: u64,
    /// A terminal status was seen ([`PutTask::terminal`]).
    #[serde(default)]
    pub terminal: bool,
}

impl TaskRecord {
    /// Parses and checks a record (a `GET /v1/tasks/{id}` 200 body).
    ///
    /// # Errors
    /// [`InvalidField`] saying what is wrong.
    pub fn parse(body: &[u8]) -> Result<TaskRecord, InvalidField> {
        let r: TaskRecord = serde_json::from_slice(body).map_err(|e| InvalidField(format!("not a task record: {e}")))?;
        PutTask { upstream: r.upstream.clone(), ttl_ms: None, terminal: false }.validate()?;
        Ok(r)
    }
}

impl fmt::Display for TaskRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {} on {}", self.task_id, self.upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_records_round_trip_and_are_checked() {
        let put = PutTask { upstream: "10.0.0.1:80".into(), ttl_ms: Some(60_000), terminal: false };
        assert_eq!(serde_json::from_str::<PutTask>(&serde_json::to_string(&put).unwrap()).unwrap(), put);
        assert!(!serde_json::to_string(&put).unwrap().contains("terminal"), "sent only when true");
        let done = PutTask { terminal: true, ..put.clone() };
        assert_eq!(serde_json::from_str::<PutTask>(&serde_json::to_string(&done).unwrap()).unwrap(), done);
        assert_eq!(serde_json::from_str::<PutTask>(r#"{"upstream":"10.0.0.1:80"}"#).unwrap().ttl_ms, None);
        assert!(PutTask { upstream: "a b".into(), ttl_ms: None, terminal: false }.validate().is_err());
        let r = TaskRecord { task_id: "t/1".into(), upstream: "10.0.0.1:80".into(), created_at_ms: 1, expires_at_ms: 2, terminal: true };
        assert_eq!(TaskRecord::parse(serde_json::to_string(&r).unwrap().as_bytes()).unwrap(), r);
        assert!(TaskRecord::parse(br#"{"task_id":"t","upstream":"","created_at_ms":1,"expires_at_ms":2}"#).is_err());
        assert_eq!(task_path("/v1", "t/1"), "/v1/tasks/t%2F1");
        assert!(is_valid_task_id("786512e2-9e0d") && is_valid_task_id("täsk"));
        assert!(!is_valid_task_id("") && !is_valid_task_id("a\nb") && !is_valid_task_id(&"a".repeat(257)));
    }
}
