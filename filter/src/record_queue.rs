//! The records of new sessions waiting to be written to control (`initialize_write:
//! async`, the default). A stream that pinned a new session queues its record in the VM
//! instead of making a call; the root context sends the queue to control on its tick
//! (every `control.record_flush_ms` while records wait) as one `POST {prefix}/sessions`
//! per batch (control's API: `{"records": {"<session id>": <PUT body>, …}}`). A call
//! through Envoy's HTTP client costs the worker about as much as the `initialize` it
//! records; a batch pays that once for every session the VM pinned since the last tick.
//! Control creates each record only where none of its id exists, so a batch sent again
//! never overwrites a newer record (one a recovery re-pinned meanwhile).
//!
//! Bounded: at most [`MAX_QUEUED`] records wait; a record that finds the queue full is
//! dropped and counted (`control_errors`). A batch that failed without an answer from
//! control (unreachable, timeout, 5xx) is queued again, and the queue is held until the
//! root context's next periodic tick (`sweep_period_ms`, default 1 s): a control service
//! that is back within about `(MAX_ATTEMPTS - 1) × sweep_period_ms` still gets every
//! record. A record is sent at most [`MAX_ATTEMPTS`] times, then dropped and counted
//! likewise. A record not in control still works through the proxy that pinned it (the
//! pin is in its shared data); another proxy's lookup gets 404 for it.

use std::collections::VecDeque;

use mcp_affinity_proto::sessions::{PutSession, PutSessions};

pub use mcp_affinity_proto::sessions::PutSessionsAnswer;

/// Most records waiting in one VM.
pub const MAX_QUEUED: usize = 16_384;
/// Most records per call (control accepts up to `sessions::MAX_BATCH_RECORDS`, 1024).
pub const MAX_BATCH_RECORDS: usize = 256;
const _: () = assert!(MAX_BATCH_RECORDS <= mcp_affinity_proto::sessions::MAX_BATCH_RECORDS);
/// A batch stops growing once its body passes this many bytes (a single larger record
/// still goes alone; control's `--max-body-bytes`, default 1 MiB, bounds it).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Sends of one record before it is dropped.
pub const MAX_ATTEMPTS: u8 = 5;

/// The record of a session pinned by an `initialize` answer: the session id and control's
/// `PUT` body ([`PutSession`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// The client's `Mcp-Session-Id`.
    pub session_id: String,
    /// What control stores: backend session id, upstream host, generation, the raw
    /// `initialize` request body.
    pub put: PutSession,
    /// Sends so far.
    attempts: u8,
}

impl NewRecord {
    /// The record of session `session_id` (known to `upstream` as `backend_session_id`)
    /// created by the `initialize` request body `initialize`.
    pub fn new(session_id: &str, backend_session_id: &str, upstream: &str, generation: u64, initialize: String) -> NewRecord {
        let put = PutSession {
            backend_session_id: Some(backend_session_id.to_string()),
            upstream: upstream.to_string(),
            generation: Some(generation),
            initialize,
            initialized: None,
            protocol_version: None,
        };
        NewRecord { session_id: session_id.to_string(), put, attempts: 0 }
    }

    /// Rough size of its part of a batch body, bytes.
    fn size(&self) -> usize {
        self.session_id.len() * 2 + self.put.upstream.len() + self.put.initialize.len() + 96
    }
}

/// One call's worth of records and its body.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<NewRecord>,
    /// JSON body of `POST {prefix}/sessions`.
    pub body: Vec<u8>,
}

/// What became of a batch that control did not take ([`RecordQueue::retry`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Retried {
    pub queued: usize,
    pub dropped: usize,
}

/// The VM's queue of records to write.
#[derive(Debug, Default)]
pub struct RecordQueue {
    waiting: VecDeque<NewRecord>,
    /// A batch failed: nothing is sent until [`RecordQueue::release`].
    held: bool,
}

impl RecordQueue {
    /// Queues a record; false (dropped) when [`MAX_QUEUED`] records wait already.
    pub fn push(&mut self, record: NewRecord) -> bool {
        if self.waiting.len() >= MAX_QUEUED {
            return false;
        }
        self.waiting.push_back(record);
        true
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Records wait and may be sent now (the queue is not held after a failure).
    pub fn ready(&self) -> bool {
        !self.held && !self.waiting.is_empty()
    }

    /// Ends the hold of a failed batch (on the periodic tick).
    pub fn release(&mut self) {
        self.held = false;
    }

    /// The oldest records, up to [`MAX_BATCH_RECORDS`] and about [`MAX_BATCH_BYTES`] (at
    /// least one), with their body; `None` when nothing waits or the queue is held.
    pub fn take_batch(&mut self) -> Option<Batch> {
        if self.held {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        for r in &self.waiting {
            if n == MAX_BATCH_RECORDS || (n > 0 && bytes + r.size() > MAX_BATCH_BYTES) {
                break;
            }
            bytes += r.size();
            n += 1;
        }
        if n == 0 {
            return None;
        }
        let mut records: Vec<NewRecord> = self.waiting.drain(..n).collect();
        for r in &mut records {
            r.attempts += 1;
        }
        let body = PutSessions::body(records.iter().map(|r| (r.session_id.as_str(), &r.put)));
        Some(Batch { records, body })
    }

    /// Queues the records of a batch control did not take again, ahead of newer ones, and
    /// holds the queue until [`RecordQueue::release`]; drops those sent [`MAX_ATTEMPTS`]
    /// times, and any that do not fit.
    pub fn retry(&mut self, records: Vec<NewRecord>) -> Retried {
        self.held = true;
        let total = records.len();
        let room = MAX_QUEUED.saturating_sub(self.waiting.len());
        let again: Vec<NewRecord> = records.into_iter().filter(|r| r.attempts < MAX_ATTEMPTS).take(room).collect();
        let queued = again.len();
        for r in again.into_iter().rev() {
            self.waiting.push_front(r);
        }
        Retried { queued, dropped: total - queued }
    }
}

/// Parses a 200 answer of `POST {prefix}/sessions` ([`PutSessionsAnswer`]: records
/// created, records kept because one of that id existed, and the ids control rejected with
/// their reason, never sent again). Errors are strings for logs.
pub fn parse_answer(body: &[u8]) -> Result<PutSessionsAnswer, String> {
    serde_json::from_slice(body).map_err(|e| format!("control batch answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, initialize: &str) -> NewRecord {
        NewRecord::new(id, id, "10.0.0.1:80", 1, initialize.to_string())
    }

    fn ids(records: &[NewRecord]) -> Vec<&str> {
        records.iter().map(|r| r.session_id.as_str()).collect()
    }

    #[test]
    fn a_batch_is_controls_body_with_the_oldest_records() {
        let mut q = RecordQueue::default();
        assert!(q.take_batch().is_none());
        assert!(q.push(rec("a/b", r#"{"id":1}"#)));
        assert!(q.push(rec("c", "{}")));
        let b = q.take_batch().unwrap();
        assert!(q.is_empty());
        let body: serde_json::Value = serde_json::from_slice(&b.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"records": {
                "a/b": {"backend_session_id": "a/b", "upstream": "10.0.0.1:80", "generation": 1, "initialize": "{\"id\":1}"},
                "c": {"backend_session_id": "c", "upstream": "10.0.0.1:80", "generation": 1, "initialize": "{}"},
            }})
        );
        assert_eq!(ids(&b.records), ["a/b", "c"]);
    }

    #[test]
    fn batches_are_bounded_in_records_and_bytes() {
        let mut q = RecordQueue::default();
        for i in 0..MAX_BATCH_RECORDS + 5 {
            q.push(rec(&format!("s{i}"), "{}"));
        }
        assert_eq!(q.take_batch().unwrap().records.len(), MAX_BATCH_RECORDS);
        assert_eq!(q.take_batch().unwrap().records.len(), 5);
        q.push(rec("big", &"x".repeat(MAX_BATCH_BYTES)));
        q.push(rec("small", "{}"));
        assert_eq!(ids(&q.take_batch().unwrap().records), ["big"], "a large record goes alone");
        assert_eq!(ids(&q.take_batch().unwrap().records), ["small"]);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut q = RecordQueue::default();
        for i in 0..MAX_QUEUED {
            assert!(q.push(rec(&format!("s{i}"), "{}")));
        }
        assert!(!q.push(rec("one-more", "{}")), "full: dropped");
        assert_eq!(q.len(), MAX_QUEUED);
    }

    #[test]
    fn a_failed_batch_waits_for_the_release_goes_first_and_is_dropped_after_its_last_attempt() {
        let mut q = RecordQueue::default();
        q.push(rec("old", "{}"));
        let batch = q.take_batch().unwrap();
        q.push(rec("new", "{}"));
        assert_eq!(q.retry(batch.records), Retried { queued: 1, dropped: 0 });
        assert!(!q.ready() && q.take_batch().is_none(), "held until the periodic tick");
        q.release();
        assert!(q.ready());
        let mut records = q.take_batch().unwrap().records;
        assert_eq!(ids(&records), ["old", "new"], "retried records go first");
        // Fail until "old" has had its last attempt ("new" is one behind).
        for _ in 2..MAX_ATTEMPTS {
            assert_eq!(q.retry(records).queued, 2);
            q.release();
            records = q.take_batch().unwrap().records;
        }
        assert_eq!(records.iter().map(|r| r.attempts).collect::<Vec<_>>(), [MAX_ATTEMPTS, MAX_ATTEMPTS - 1]);
        assert_eq!(q.retry(records), Retried { queued: 1, dropped: 1 }, "old is dropped after its last attempt");
        q.release();
        assert_eq!(ids(&q.take_batch().unwrap().records), ["new"]);
    }

    #[test]
    fn answers_parse() {
        let a = parse_answer(br#"{"written":2,"kept":1,"rejected":{}}"#).unwrap();
        assert_eq!((a.written, a.kept), (2, 1));
        let a = parse_answer(br#"{"written":0,"rejected":{"x y":{"code":"invalid_session_id","message":"m"}}}"#).unwrap();
        assert_eq!(a.rejected.len(), 1);
        assert!(parse_answer(b"not json").is_err());
    }
}
