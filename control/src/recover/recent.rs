//! The last recover calls this instance decided, for the status page
//! ([`crate::status_page`]): a bounded ring buffer in memory, newest first, lost on restart
//! and not shared between instances.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Outcome, Reason};

/// How many recover calls [`RecentRecoveries`] keeps by default.
pub const RECENT_RECOVERIES: usize = 50;

/// Characters of a session id kept in a [`RecentRecovery`]: enough to tell sessions apart
/// on a page, not the whole id (which is the client's credential-like handle).
pub const SESSION_PREFIX_CHARS: usize = 8;

/// One decided recover call: a recovery of a failure, or a drain-move (reason `draining`,
/// outcome `moved` / `stayed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentRecovery {
    /// When it was decided, Unix milliseconds.
    pub at_ms: u64,
    /// The session id's first [`SESSION_PREFIX_CHARS`] characters, then `…` if longer.
    pub session: String,
    /// Why the filter asked (`connect_failure`, `session_unknown`, …, `draining`).
    pub reason: Reason,
    /// The upstream the filter reported as failed (or draining), as it sent it.
    pub failed_upstream: String,
    /// The upstream the session is pinned to after the call; `None` when it failed.
    pub new_upstream: Option<String>,
    /// What happened (`replayed`, `not_replayed`, `failed`, `alive`, `moved`, `stayed`).
    pub outcome: Outcome,
    /// How long the call took, in milliseconds.
    pub elapsed_ms: u64,
}

/// `id` cut to [`SESSION_PREFIX_CHARS`] characters, `…` appended when it was longer.
pub fn truncate_session(id: &str) -> String {
    match id.char_indices().nth(SESSION_PREFIX_CHARS) {
        Some((at, _)) => format!("{}…", &id[..at]),
        None => id.to_string(),
    }
}

/// The last `capacity` recover calls, oldest dropped first.
#[derive(Debug)]
pub struct RecentRecoveries {
    capacity: usize,
    ring: Mutex<VecDeque<RecentRecovery>>,
}

impl Default for RecentRecoveries {
    fn default() -> Self {
        Self::new(RECENT_RECOVERIES)
    }
}

impl RecentRecoveries {
    /// An empty buffer of `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentRecoveries {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    /// Adds `entry`, dropping the oldest one when full.
    pub fn push(&self, entry: RecentRecovery) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    /// Every kept entry, newest first.
    pub fn newest_first(&self) -> Vec<RecentRecovery> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64) -> RecentRecovery {
        RecentRecovery {
            at_ms,
            session: truncate_session("session"),
            reason: Reason::ConnectFailure,
            failed_upstream: "10.0.0.1:80".into(),
            new_upstream: None,
            outcome: Outcome::Failed,
            elapsed_ms: 1,
        }
    }

    #[test]
    fn keeps_the_newest_capacity_entries_newest_first() {
        let recent = RecentRecoveries::new(3);
        assert!(recent.newest_first().is_empty());
        for at in 1..=5 {
            recent.push(entry(at));
        }
        let kept: Vec<u64> = recent.newest_first().iter().map(|e| e.at_ms).collect();
        assert_eq!(kept, [5, 4, 3]);
        let default = RecentRecoveries::default();
        for at in 0..(RECENT_RECOVERIES as u64 + 7) {
            default.push(entry(at));
        }
        assert_eq!(default.newest_first().len(), RECENT_RECOVERIES);
        assert_eq!(RecentRecoveries::new(0).capacity, 1);
    }

    #[test]
    fn truncates_session_ids_on_characters() {
        assert_eq!(truncate_session("abc"), "abc");
        assert_eq!(truncate_session("12345678"), "12345678");
        assert_eq!(truncate_session("123456789"), "12345678…");
        assert_eq!(truncate_session("ééééééééé"), "éééééééé…");
    }
}
