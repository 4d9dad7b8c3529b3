//! Property tests of everything control parses from outside: request bodies (`PUT`,
//! `PATCH`, `recover`), session ids in paths, and records read back from Redis. No input
//! panics; every rejection is an error value; and a stored record reads back as itself.

use mcp_affinity_control::record::{PatchSession, PutSession, SessionRecord};
use mcp_affinity_control::recover::{Recovery, RecoverRequest};
use mcp_affinity_control::session_id::SessionId;
use proptest::prelude::*;

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop::sample::select(vec!["upstream", "initialize", "generation", "backend_session_id", "initialized", "protocol_version", "reason", "request", "method", "path", "body", "x"]),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

fn visible(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(0x21u8..=0x7e, 1..=max).prop_map(|b| String::from_utf8(b).unwrap())
}

proptest! {
    #[test]
    fn request_bodies_of_any_shape_parse_or_fail_cleanly(v in json(), bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let body = serde_json::to_vec(&v).unwrap();
        for b in [&body[..], &bytes[..]] {
            if let Ok(put) = serde_json::from_slice::<PutSession>(b) {
                let _ = put.validate();
            }
            if let Ok(patch) = serde_json::from_slice::<PatchSession>(b) {
                let _ = patch.validate();
            }
            if let Ok(req) = serde_json::from_slice::<RecoverRequest>(b) {
                let _ = Recovery::validate(&req);
            }
            let _ = serde_json::from_slice::<SessionRecord>(b);
        }
    }

    #[test]
    fn session_ids_in_paths_are_checked(id in ".{0,300}") {
        match SessionId::parse(&id) {
            Ok(s) => {
                prop_assert_eq!(s.as_str(), id.as_str());
                prop_assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn valid_puts_make_records_that_round_trip_through_storage(
        id in visible(64),
        upstream in visible(40),
        generation in 1u64..u64::MAX,
        version in proptest::option::of(visible(20)),
        now in any::<u32>(),
    ) {
        let put = PutSession {
            backend_session_id: None,
            upstream,
            generation: Some(generation),
            initialize: r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#.into(),
            initialized: None,
            protocol_version: version,
        };
        prop_assert!(put.validate().is_ok());
        let id = SessionId::parse(&id).unwrap();
        let record = put.to_record(&id, u64::from(now), None);
        // What the Redis store writes (JSON text) reads back as the same record.
        let stored = serde_json::to_string(&record).unwrap();
        prop_assert_eq!(serde_json::from_str::<SessionRecord>(&stored).unwrap(), record);
    }
}
