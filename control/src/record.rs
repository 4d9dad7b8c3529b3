//! The session record and the request bodies that create and update it are the contract
//! crate's ([`mcp_affinity_proto::sessions`]); this module adds what only the stores need:
//! the precondition of a write.

pub use mcp_affinity_proto::sessions::{
    InvalidField, MAX_BATCH_RECORDS, MAX_SHORT_FIELD_LEN, PatchSession, PutSession, PutSessions, PutSessionsAnswer, RECORD_VERSION, Rejected,
    SessionRecord,
};

/// The precondition of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutCondition {
    /// Write whatever is stored.
    Always,
    /// Write only if the stored generation equals this; `0` means "only if absent".
    IfGeneration(u64),
}

impl PutCondition {
    /// Whether a write may proceed given the current record (`None` = absent).
    pub fn holds(self, current: Option<&SessionRecord>) -> bool {
        match (self, current) {
            (PutCondition::Always, _) => true,
            (PutCondition::IfGeneration(0), None) => true,
            (PutCondition::IfGeneration(_), None) => false,
            (PutCondition::IfGeneration(g), Some(r)) => r.generation == g,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_semantics() {
        let put = PutSession { backend_session_id: None, upstream: "127.0.0.1:8081".into(), generation: None, initialize: "{}".into(), initialized: None, protocol_version: None };
        let r = put.to_record("s1", 1, None);
        assert!(PutCondition::Always.holds(None));
        assert!(PutCondition::Always.holds(Some(&r)));
        assert!(PutCondition::IfGeneration(0).holds(None));
        assert!(!PutCondition::IfGeneration(0).holds(Some(&r)));
        assert!(PutCondition::IfGeneration(1).holds(Some(&r)));
        assert!(!PutCondition::IfGeneration(1).holds(None));
        assert!(!PutCondition::IfGeneration(2).holds(Some(&r)));
    }
}
