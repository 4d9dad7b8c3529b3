//! Property tests of everything the filter parses from outside: session ids (clients),
//! request bodies (clients), shared-data values (other VMs, older versions), the plugin
//! configuration (operators), header maps (the host), control's records and recover
//! answers (the network). No input panics; every rejection is a value, not a crash; and
//! what the filter writes, it reads back. The shared-data buckets behave as a model of
//! them does under any sequence of writes.

use mcp_affinity_filter::config::FilterConfig;
use mcp_affinity_filter::header_map::HeaderPairs;
use mcp_affinity_filter::jsonrpc::{self, BodyKind};
use mcp_affinity_filter::pin::{DecodeError, Pin};
use mcp_affinity_filter::recovery::parse_answer;
use mcp_affinity_filter::session_id::{self, MAX_SESSION_ID_LEN};
use mcp_affinity_filter::store::memory::MemorySharedData;
use mcp_affinity_filter::store::{self, Layout, Updated};
use mcp_affinity_proto::sessions::SessionRecord;
use proptest::prelude::*;

/// A write to the pin store: put a pin (session, last seen), refresh it, or forget it.
#[derive(Debug, Clone)]
enum Write {
    Put(u8, u64),
    Touch(u8, u64),
    Forget(u8),
}

fn write() -> impl Strategy<Value = Write> {
    prop_oneof![
        (0u8..12, 0u64..50).prop_map(|(s, t)| Write::Put(s, t)),
        (0u8..12, 0u64..50).prop_map(|(s, t)| Write::Touch(s, t)),
        (0u8..12).prop_map(Write::Forget),
    ]
}

/// What a write does to a session's current pin.
type Change = Box<dyn Fn(Option<Pin>) -> Option<Pin>>;

fn model_pin(last_seen: u64) -> Pin {
    Pin { upstream: "10.0.0.1:80".into(), generation: 1, last_seen, backend_session_id: "b".into(), recorded: false }
}

/// A valid session id: 1..=64 visible ASCII bytes.
fn session_id() -> impl Strategy<Value = String> {
    proptest::collection::vec(0x21u8..=0x7e, 1..=64).prop_map(|b| String::from_utf8(b).unwrap())
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6).prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn session_ids_are_accepted_exactly_when_visible_ascii_and_short_enough(id in proptest::collection::vec(any::<u8>(), 0..300)) {
        let ok = !id.is_empty() && id.len() <= MAX_SESSION_ID_LEN && id.iter().all(|b| (0x21..=0x7e).contains(b));
        match session_id::validate(&id, MAX_SESSION_ID_LEN) {
            Ok(s) => { prop_assert!(ok); prop_assert_eq!(s.as_bytes(), &id[..]); }
            Err(e) => { prop_assert!(!ok); prop_assert!(!e.to_string().is_empty()); }
        }
    }

    #[test]
    fn any_body_classifies_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = jsonrpc::classify(&body);
        let _ = jsonrpc::method(&body);
    }

    #[test]
    fn valid_json_is_never_called_malformed(v in json()) {
        let body = serde_json::to_vec(&v).unwrap();
        prop_assert_ne!(jsonrpc::classify(&body), BodyKind::Malformed);
    }

    #[test]
    fn initialize_is_recognised_whatever_else_the_message_holds(id in any::<i64>(), params in json(), batch_before in 0usize..3) {
        let init = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": params});
        prop_assert_eq!(jsonrpc::classify(&serde_json::to_vec(&init).unwrap()), BodyKind::Initialize);
        let mut batch = vec![serde_json::json!({"jsonrpc": "2.0", "method": "notifications/x"}); batch_before];
        batch.push(init);
        prop_assert_eq!(jsonrpc::classify(&serde_json::to_vec(&batch).unwrap()), BodyKind::Initialize);
    }

    #[test]
    fn pins_round_trip(upstream in "[0-9a-f.:\\[\\]]{1,40}", generation in any::<u64>(), last_seen in any::<u64>(), backend in session_id(), recorded in any::<bool>()) {
        let backend = backend.replace(' ', "_");
        let pin = Pin { upstream, generation, last_seen, backend_session_id: backend, recorded };
        prop_assert_eq!(Pin::decode(&pin.encode()).unwrap(), pin);
    }

    /// Buckets as lists in write order: a pin replaced in place, a new pin appended, a full
    /// bucket's least recently used pin (first of equals) evicted for a new one.
    #[test]
    fn the_pin_store_behaves_as_its_model(writes in proptest::collection::vec(write(), 0..60)) {
        let layout = Layout { buckets: 3, capacity: 3 };
        let mut shared = MemorySharedData::default();
        let mut model: Vec<Vec<(String, Pin)>> = vec![Vec::new(); 3];
        for w in writes {
            let (id, f): (String, Change) = match w {
                Write::Put(s, t) => (format!("s{s}"), Box::new(move |_| Some(model_pin(t)))),
                Write::Touch(s, t) => (format!("s{s}"), Box::new(move |p: Option<Pin>| p.map(|p| Pin { last_seen: t.max(p.last_seen), ..p }))),
                Write::Forget(s) => (format!("s{s}"), Box::new(|_| None)),
            };
            let bucket = &mut model[layout.bucket(&id) as usize];
            let at = bucket.iter().position(|(k, _)| *k == id);
            let expected = match (at, f(at.map(|i| bucket[i].1.clone()))) {
                (Some(i), Some(pin)) => { bucket[i].1 = pin; Updated::Done }
                (Some(i), None) => { bucket.remove(i); Updated::Done }
                (None, Some(pin)) if bucket.len() >= layout.capacity => {
                    let oldest = (0..bucket.len()).min_by_key(|&i| bucket[i].1.last_seen).unwrap();
                    bucket.remove(oldest);
                    bucket.push((id.clone(), pin));
                    Updated::Evicted
                }
                (None, Some(pin)) => { bucket.push((id.clone(), pin)); Updated::Done }
                (None, None) => Updated::Done,
            };
            prop_assert_eq!(store::update(&mut shared, layout, &id, f), expected);
            for (n, bucket) in model.iter().enumerate() {
                let lines: Vec<String> = bucket.iter().map(|(k, p)| format!("{k} {}", String::from_utf8(p.encode()).unwrap())).collect();
                let stored = shared_value(&shared, n as u32);
                prop_assert_eq!(stored, lines.join("\n"), "bucket {}", n);
            }
        }
    }

    #[test]
    fn any_shared_data_value_decodes_or_is_rejected(value in proptest::collection::vec(any::<u8>(), 0..128)) {
        match Pin::decode(&value) {
            Ok(pin) => prop_assert_eq!(Pin::decode(&pin.encode()).unwrap(), pin),
            Err(DecodeError::Tombstone) => prop_assert!(value.is_empty()),
            Err(DecodeError::Invalid) => {}
        }
    }

    #[test]
    fn any_plugin_configuration_parses_or_names_the_problem(v in json()) {
        if let Err(e) = FilterConfig::parse(&serde_json::to_vec(&v).unwrap()) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn any_configuration_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = FilterConfig::parse(&bytes);
    }

    #[test]
    fn header_maps_round_trip_and_garbage_is_rejected(
        pairs in proptest::collection::vec(("[a-z:-]{1,12}", "[ -~]{0,20}"), 0..12),
        garbage in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let map = HeaderPairs::from_pairs(&refs);
        for (k, _) in &pairs {
            let first = pairs.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_bytes());
            prop_assert_eq!(map.get(k), first);
        }
        if let Ok(m) = HeaderPairs::parse(garbage) {
            let _ = m.get(":method");
        }
    }

    #[test]
    fn control_answers_of_any_shape_are_values(v in json(), bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let body = serde_json::to_vec(&v).unwrap();
        let _ = SessionRecord::parse(&body);
        let _ = parse_answer(&body);
        let _ = SessionRecord::parse(&bytes);
        let _ = parse_answer(&bytes);
    }
}

/// Deep nesting cannot overflow the stack: serde_json skips values it does not need
/// iteratively (and stops typed parsing at its recursion limit), however deep a client
/// nests. Deep JSON is still JSON; `initialize` with deep `params` is still `initialize`.
#[test]
fn deeply_nested_bodies_do_not_overflow() {
    for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
        let body = format!("{}1{}", open.repeat(100_000), close.repeat(100_000));
        assert_eq!(jsonrpc::classify(body.as_bytes()), BodyKind::Other);
        let wrapped = format!("{{\"method\":\"initialize\",\"params\":{}1{}}}", open.repeat(100_000), close.repeat(100_000));
        assert_eq!(jsonrpc::classify(wrapped.as_bytes()), BodyKind::Initialize);
        let unclosed = format!("{{\"method\":\"initialize\",\"params\":{}1", open.repeat(100_000));
        assert_eq!(jsonrpc::classify(unclosed.as_bytes()), BodyKind::Malformed);
    }
}

/// Huge numbers are JSON like any other.
#[test]
fn huge_numbers_are_not_malformed() {
    let body = format!(r#"{{"jsonrpc":"2.0","id":{},"method":"initialize"}}"#, "9".repeat(400));
    assert_eq!(jsonrpc::classify(body.as_bytes()), BodyKind::Initialize);
}

/// The value of bucket `n` ("" when never written).
fn shared_value(shared: &MemorySharedData, n: u32) -> String {
    use mcp_affinity_filter::store::SharedData;
    shared.get(&Layout::key(n)).map(|(v, _)| String::from_utf8(v).unwrap()).unwrap_or_default()
}
