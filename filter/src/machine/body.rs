//! A bounded copy of a request body, taken chunk by chunk as it streams upstream (rule 1),
//! and whether it is the whole body the client sent (rule 5).


use crate::header_map::HeaderPairs;
use crate::headers::CONTENT_LENGTH;

/// A bounded copy of a request body, taken chunk by chunk as it streams upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BodyCopy {
    Off,
    On {
        bytes: Vec<u8>,
        limit: usize,
        /// The end of the stream was seen: `bytes` is the whole body the client sent.
        whole: bool,
    },
    /// Went over its limit.
    Over,
}

impl BodyCopy {
    /// A copy of up to `limit` bytes (`Off` for 0); `whole` when the request has no body
    /// (its headers ended the stream).
    pub(super) fn new(limit: usize, whole: bool) -> BodyCopy {
        if limit == 0 { BodyCopy::Off } else { BodyCopy::On { bytes: Vec::new(), limit, whole } }
    }

    pub(super) fn wants(&self) -> bool {
        matches!(self, BodyCopy::On { whole: false, .. })
    }

    /// Appends a chunk (`end_of_stream`: the last one); false when the copy just went over
    /// its limit. The first chunk (the whole body of most requests) becomes the copy
    /// itself: no second allocation.
    pub(super) fn push(&mut self, chunk: Vec<u8>, end_of_stream: bool) -> bool {
        if let BodyCopy::On { bytes, limit, whole } = self {
            if bytes.len() + chunk.len() > *limit {
                *self = BodyCopy::Over;
                return false;
            }
            if bytes.is_empty() {
                *bytes = chunk;
            } else {
                bytes.extend_from_slice(&chunk);
            }
            *whole = end_of_stream;
        }
        true
    }

    /// The whole body the client sent, or `None`: the copy is off, over its limit, still
    /// streaming, or shorter or longer than the request's `content-length` (a replay
    /// carries exactly the client's bytes or nothing).
    pub(super) fn whole(&self, head: &HeaderPairs) -> Option<&[u8]> {
        let BodyCopy::On { bytes, whole: true, .. } = self else { return None };
        let declared = head.get(CONTENT_LENGTH).and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
        match declared {
            Some(n) if n != bytes.len() => {
                log::warn!("mcp-affinity: request body of {} bytes against content-length {n}: not replayable", bytes.len());
                None
            }
            _ => Some(bytes),
        }
    }
}

