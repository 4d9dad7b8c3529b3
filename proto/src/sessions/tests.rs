use super::*;

fn put() -> PutSession {
    PutSession {
        backend_session_id: None,
        upstream: "127.0.0.1:8081".into(),
        generation: None,
        initialize: r#"{"jsonrpc":"2.0","id":1,"method":"initialize"}"#.into(),
        initialized: None,
        protocol_version: None,
    }
}

fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug>(value: &T) {
    let text = serde_json::to_string(value).unwrap();
    assert_eq!(&serde_json::from_str::<T>(&text).unwrap(), value, "{text}");
}

#[test]
fn every_message_round_trips() {
    let mut full = put();
    full.backend_session_id = Some("b".into());
    full.generation = Some(3);
    full.initialized = Some("{}".into());
    full.protocol_version = Some("2025-06-18".into());
    round_trip(&put());
    round_trip(&full);
    round_trip(&put().to_record("s1", 7, None));
    round_trip(&PutSessions { records: [("a/b".to_string(), put()), ("c".to_string(), full)].into() });
    round_trip(&PutSessionsAnswer { written: 1, kept: 2, rejected: [("x".to_string(), Rejected { code: "invalid_body".into(), message: "m".into() })].into() });
    round_trip(&PatchSession::default());
    round_trip(&PatchSession { initialized: Some("{}".into()), protocol_version: Some("2025-06-18".into()) });
}

#[test]
fn a_borrowed_batch_is_the_same_text_as_an_owned_one() {
    let (a, c) = (put(), PutSession { generation: Some(2), ..put() });
    let owned = serde_json::to_vec(&PutSessions { records: [("a/b".to_string(), a.clone()), ("c".to_string(), c.clone())].into() }).unwrap();
    assert_eq!(PutSessions::body([("c", &c), ("a/b", &a)]), owned);
}

#[test]
fn bodies_leave_out_what_is_not_given() {
    assert_eq!(serde_json::to_string(&PatchSession::default()).unwrap(), "{}");
    assert_eq!(serde_json::to_string(&PatchSession { protocol_version: Some("2025-06-18".into()), ..Default::default() }).unwrap(), r#"{"protocol_version":"2025-06-18"}"#);
    let put = PutSession { backend_session_id: Some("s".into()), upstream: "10.0.0.1:80".into(), generation: Some(1), initialize: "{\"id\":1}".into(), initialized: None, protocol_version: None };
    assert_eq!(serde_json::to_string(&put).unwrap(), r#"{"backend_session_id":"s","upstream":"10.0.0.1:80","generation":1,"initialize":"{\"id\":1}"}"#);
    // Unknown fields are refused; nulls are the same as absent.
    assert!(serde_json::from_str::<PatchSession>(r#"{"x":1}"#).is_err());
    assert_eq!(serde_json::from_str::<PatchSession>(r#"{"initialized":null}"#).unwrap(), PatchSession::default());
}

#[test]
fn paths_encode_reserved_characters() {
    assert_eq!(session_path("/v1", "abc-123_X.~"), "/v1/sessions/abc-123_X.~");
    assert_eq!(session_path("/v1", "a/b?c#d%e"), "/v1/sessions/a%2Fb%3Fc%23d%25e");
}

#[test]
fn defaults_backend_id_and_generation_and_keeps_created_at() {
    let first = put().to_record("s1", 1000, None);
    assert_eq!(first.backend_session_id, "s1");
    assert_eq!(first.generation, 1);
    assert_eq!((first.created_at_ms, first.last_seen_ms), (1000, 1000));
    let second = PutSession { generation: Some(2), backend_session_id: Some("b2".into()), ..put() }.to_record("s1", 2000, Some(&first));
    assert_eq!((second.created_at_ms, second.last_seen_ms), (1000, 2000));
    assert_eq!((second.generation, second.backend_session_id.as_str()), (2, "b2"));
}

#[test]
fn validation_names_the_field() {
    assert!(put().validate().is_ok());
    assert!(PutSession { generation: Some(0), ..put() }.validate().unwrap_err().0.contains("generation"));
    assert!(PutSession { upstream: "".into(), ..put() }.validate().unwrap_err().0.contains("upstream"));
    assert!(PutSession { initialize: "{not json".into(), ..put() }.validate().unwrap_err().0.contains("initialize"));
    assert!(PutSession { backend_session_id: Some("has space".into()), ..put() }.validate().unwrap_err().0.contains("backend_session_id"));
    assert!(PatchSession { initialized: Some("nope".into()), protocol_version: None }.validate().is_err());
    let mut r = put().to_record("s1", 1, None);
    assert!(r.check().is_ok());
    r.upstream = String::new();
    assert!(r.check().unwrap_err().0.contains("upstream"));
    r.upstream = "10.0.0.1:80".into();
    r.backend_session_id = "a b".into();
    assert!(r.check().unwrap_err().0.contains("backend_session_id"));
}

#[test]
fn patch_touches_and_fills() {
    let r = put().to_record("s1", 1000, None);
    let p = PatchSession { initialized: Some("{}".into()), protocol_version: Some("2025-06-18".into()) };
    let out = p.apply(&r, 1500);
    assert_eq!(out.last_seen_ms, 1500);
    assert_eq!(out.initialized.as_deref(), Some("{}"));
    assert_eq!(out.protocol_version.as_deref(), Some("2025-06-18"));
    assert_eq!(out.created_at_ms, 1000);
    // An empty patch only touches; time never goes backwards.
    let out2 = PatchSession::default().apply(&out, 1200);
    assert_eq!(out2.last_seen_ms, 1500);
    assert_eq!(out2.initialized.as_deref(), Some("{}"));
}

#[test]
fn record_json_shape() {
    let v = serde_json::to_value(put().to_record("s1", 7, None)).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    for k in ["version", "session_id", "backend_session_id", "upstream", "generation", "initialize", "initialized", "protocol_version", "created_at_ms", "last_seen_ms"] {
        assert!(keys.contains(&k), "missing {k}");
    }
    assert_eq!(keys.len(), 10);
    assert_eq!(v["version"], 1);
    assert!(v["initialized"].is_null());
}
