//! The keys of the Redis store: a session's record and lease keys, the drains hash's key.
//!
//! **Keys.** Each session has two keys that share a Redis Cluster hash tag, so they always
//! live in the same slot: `<prefix>{<id>}:record` (the record JSON, with the idle TTL set
//! again by every `put` and `patch`) and `<prefix>{<id>}:lease` (the recovery lease). In
//! the tag, `%`, `{` and `}` of the session id are percent-encoded (`%25`, `%7B`, `%7D`),
//! so the braces added around it are always the key's hash tag and distinct ids give
//! distinct keys. The prefix may not contain braces (it would move the tag). Every
//! command and script touches exactly one key.

use std::borrow::Cow;

use crate::session_id::SessionId;

/// The key of the record of `id`: `<prefix>{<id>}:record` (see the module documentation).
pub fn record_key(prefix: &str, id: &SessionId) -> String {
    format!("{prefix}{{{}}}:record", hash_tag(id.as_str()))
}

/// The key of the recovery lease of `id`: `<prefix>{<id>}:lease`, in the slot of the
/// record key.
pub fn lease_key(prefix: &str, id: &SessionId) -> String {
    format!("{prefix}{{{}}}:lease", hash_tag(id.as_str()))
}

/// The key of the pin of task `task_id`: `<prefix>{<task id>}:task` (a session's keys end
/// in `:record` or `:lease`, so a task and a session of one id never share a key).
pub fn task_key(prefix: &str, task_id: &str) -> String {
    format!("{prefix}{{{}}}:task", hash_tag(task_id))
}

/// The key of the index of unfinished tasks pinned to `upstream`:
/// `<prefix>{<upstream>}:tasks-on` (a sorted set: task id scored by its pin's expiry, Unix
/// ms). Its suffix differs from every session's and task's key.
pub fn tasks_on_key(prefix: &str, upstream: &str) -> String {
    format!("{prefix}{{{}}}:tasks-on", hash_tag(upstream))
}

/// The key of the drains hash: `<prefix>drains` (one key for every upstream; it never
/// collides with a session's keys, which always carry a `{…}` hash tag).
pub fn drains_key(prefix: &str) -> String {
    format!("{prefix}drains")
}

/// The session id as it appears between the braces: `%`, `{`, `}` percent-encoded.
fn hash_tag(id: &str) -> Cow<'_, str> {
    if !id.contains(['%', '{', '}']) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Checks a key prefix: braces would change which part of the key is its hash tag.
///
/// # Errors
/// A message when `prefix` contains `{` or `}`.
pub fn check_key_prefix(prefix: &str) -> Result<(), String> {
    if prefix.contains(['{', '}']) {
        return Err("the Redis key prefix may not contain `{` or `}` (control adds the hash tag itself)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    /// The hash tag Redis Cluster computes for `key` (the part hashed into a slot).
    fn cluster_tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(len) = key[open + 1..].find('}')
            && len > 0
        {
            return &key[open + 1..open + 1 + len];
        }
        key
    }

    #[test]
    fn keys_share_a_hash_tag() {
        assert_eq!(record_key("mcp-affinity:", &id("abc-123")), "mcp-affinity:{abc-123}:record");
        assert_eq!(lease_key("mcp-affinity:", &id("abc-123")), "mcp-affinity:{abc-123}:lease");
        assert_eq!(task_key("mcp-affinity:", "abc-123"), "mcp-affinity:{abc-123}:task");
        assert_ne!(task_key("p:", "a"), record_key("p:", &id("a")));
        assert_eq!(tasks_on_key("p:", "10.0.0.1:80"), "p:{10.0.0.1:80}:tasks-on");
        assert_ne!(tasks_on_key("p:", "a"), task_key("p:", "a"));
        for raw in ["abc", "}", "{", "{}", "a}b{c", "%7D", "%", "x:record", "}}}{{{"] {
            let (record, lease) = (record_key("p:", &id(raw)), lease_key("p:", &id(raw)));
            assert_eq!(cluster_tag(&record), cluster_tag(&lease), "{raw}: {record} / {lease}");
            assert_ne!(cluster_tag(&record), record, "{raw}: the key must have a hash tag");
            assert_ne!(record, lease);
        }
        // Distinct ids, distinct keys (the escaping is injective).
        let ids = ["}", "%7D", "%257D", "{", "%7B", "%", "%25"];
        let keys: std::collections::BTreeSet<String> = ids.iter().map(|s| record_key("", &id(s))).collect();
        assert_eq!(keys.len(), ids.len(), "{keys:?}");
    }

}
