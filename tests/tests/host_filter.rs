//! Host-level tests: the real filter `.wasm` driven through Envoy's callbacks by the
//! wasmtime proxy-wasm host (no network).

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mcp_affinity_harness::host::{self, Action, SharedData, Vm, VmConfig};
use mcp_affinity_harness::process::filter_wasm;
use serde_json::Value;

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
const CALL: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}"#;

fn module() -> &'static (wasmtime::Engine, wasmtime::Module) {
    static M: OnceLock<(wasmtime::Engine, wasmtime::Module)> = OnceLock::new();
    M.get_or_init(|| host::compile(&std::fs::read(filter_wasm()).unwrap()).unwrap())
}

fn vm_with(config: &str, shared: SharedData) -> Vm {
    let (engine, module) = module();
    Vm::start(
        engine,
        module,
        VmConfig { vm_id: "mcp-affinity".into(), plugin_configuration: config.as_bytes().to_vec(), shared, ..Default::default() },
    )
    .expect("VM starts")
}

fn vm(config: &str) -> Vm {
    vm_with(config, SharedData::default())
}

fn header(h: &host::Headers, name: &str) -> Option<String> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap())
}

/// Outcome of the request half of a stream.
struct Req {
    id: u32,
    action: Action,
}

/// Runs request headers (and the body, if any) through the filter.
fn request(vm: &mut Vm, method: &str, extra: &[(&str, &str)], body: &str) -> Req {
    let id = vm.create_stream().unwrap();
    let mut h = host::headers([(":method", method), (":path", "/mcp?x=1"), (":authority", "mcp.local"), ("content-type", "application/json")]);
    h.extend(host::headers(extra.iter().copied()));
    vm.stream(id).request_headers = h;
    let mut action = vm.on_request_headers(id, body.is_empty()).unwrap();
    if vm.stream(id).local_reply.is_none() && !body.is_empty() {
        vm.stream(id).request_body = body.as_bytes().to_vec();
        let a = vm.on_request_body(id, true).unwrap();
        action = a;
    }
    Req { id, action }
}

/// Runs response headers through the filter, as if `upstream` answered.
fn respond(vm: &mut Vm, id: u32, upstream: &str, status: u16, extra: &[(&str, &str)]) -> Action {
    let st = vm.stream(id);
    st.properties.insert("upstream.address".into(), upstream.as_bytes().to_vec());
    st.properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    let status = status.to_string();
    let mut h = host::headers([(":status", status.as_str())]);
    h.extend(host::headers(extra.iter().copied()));
    st.response_headers = h;
    let a = vm.on_response_headers(id, true).unwrap();
    vm.end_stream(id).unwrap();
    a
}

/// initialize through `vm`, answered by `upstream` with session id `sid`.
fn initialize(vm: &mut Vm, upstream: &str, sid: &str) {
    let r = request(vm, "POST", &[], INIT);
    assert_eq!(r.action, Action::Continue);
    respond(vm, r.id, upstream, 200, &[("mcp-session-id", sid), ("content-type", "text/event-stream")]);
}

fn metric(vm: &Vm, name: &str) -> i64 {
    vm.metrics().value(&format!("mcp_affinity.{name}"))
}

fn local_reply_json(vm: &mut Vm, id: u32) -> (u16, Value) {
    let reply = vm.stream(id).local_reply.take().expect("a local reply");
    (reply.status, serde_json::from_slice(&reply.body).unwrap())
}

#[test]
fn initialize_pins_the_upstream_and_later_requests_carry_it() {
    let mut vm = vm("");
    // POST without session id: the filter holds the headers to read the body.
    let id = vm.create_stream().unwrap();
    vm.stream(id).request_headers = host::headers([(":method", "POST"), (":path", "/mcp"), ("content-type", "application/json")]);
    assert_eq!(vm.on_request_headers(id, false).unwrap(), Action::Pause, "headers held while the body is inspected");
    vm.stream(id).request_body = INIT.as_bytes().to_vec();
    assert_eq!(vm.on_request_body(id, true).unwrap(), Action::Continue);
    respond(&mut vm, id, "10.1.2.3:8080", 200, &[("mcp-session-id", "sess-1")]);
    assert_eq!((metric(&vm, "initialize_seen"), metric(&vm, "sessions_pinned")), (1, 1));

    let r = request(&mut vm, "POST", &[("mcp-session-id", "sess-1")], CALL);
    assert_eq!(r.action, Action::Continue);
    let h = &vm.stream(r.id).request_headers;
    assert_eq!(header(h, "x-session-pod").as_deref(), Some("10.1.2.3:8080"));
    assert_eq!(header(h, ":path").as_deref(), Some("/mcp?x=1"), "path and query untouched");
    assert_eq!(header(h, "mcp-session-id").as_deref(), Some("sess-1"));
    assert_eq!(metric(&vm, "requests_pinned"), 1);
}

#[test]
fn client_sent_pin_header_is_removed_or_replaced() {
    let mut vm = vm("");
    // Without a session: removed, so Envoy load-balances.
    let r = request(&mut vm, "GET", &[("x-session-pod", "169.254.169.254:80")], "");
    assert_eq!(r.action, Action::Continue);
    assert_eq!(header(&vm.stream(r.id).request_headers, "x-session-pod"), None);
    // With a pinned session: replaced by the pin.
    initialize(&mut vm, "10.0.0.1:80", "s");
    let r = request(&mut vm, "POST", &[("mcp-session-id", "s"), ("x-session-pod", "10.9.9.9:1")], CALL);
    let values: Vec<_> = vm.stream(r.id).request_headers.iter().filter(|(k, _)| k == "x-session-pod").collect();
    assert_eq!(values.len(), 1);
    assert_eq!(values[0].1, b"10.0.0.1:80");
    assert_eq!(metric(&vm, "client_pin_header_removed"), 2);
}

#[test]
fn base64_encoding_for_stateful_session() {
    let mut vm = vm(r#"{"pin_encoding":"base64","pin_header":"x-pod"}"#);
    initialize(&mut vm, "10.0.0.7:8080", "s");
    let r = request(&mut vm, "GET", &[("mcp-session-id", "s")], "");
    assert_eq!(header(&vm.stream(r.id).request_headers, "x-pod").as_deref(), Some("MTAuMC4wLjc6ODA4MA=="));
}

#[test]
fn invalid_session_id_gets_400_and_nothing_is_forwarded() {
    let mut vm = vm("");
    for bad in ["has space", &"x".repeat(257), "tab\there"] {
        let r = request(&mut vm, "POST", &[("mcp-session-id", bad)], CALL);
        assert_eq!(r.action, Action::Pause, "stopped: nothing goes upstream");
        let (status, body) = local_reply_json(&mut vm, r.id);
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], -32600);
        assert!(body["error"]["message"].as_str().unwrap().contains("Mcp-Session-Id"), "{body}");
        assert_eq!(body["jsonrpc"], "2.0");
    }
    assert_eq!(metric(&vm, "invalid_session_id"), 3);
}

#[test]
fn unknown_session_gets_404_by_default_or_passes_through() {
    let mut vm = vm("");
    let r = request(&mut vm, "POST", &[("mcp-session-id", "nobody-knows")], CALL);
    assert_eq!(r.action, Action::Pause);
    let (status, body) = local_reply_json(&mut vm, r.id);
    assert_eq!((status, body["error"]["code"].as_i64()), (404, Some(-32001)));

    let mut vm = self::vm(r#"{"unknown_session":"pass_through"}"#);
    let r = request(&mut vm, "POST", &[("mcp-session-id", "nobody-knows")], CALL);
    assert_eq!(r.action, Action::Continue);
    assert!(vm.stream(r.id).local_reply.is_none());
    assert_eq!(header(&vm.stream(r.id).request_headers, "x-session-pod"), None);
    assert_eq!(metric(&vm, "requests_unpinned"), 1);
}

#[test]
fn oversized_and_malformed_bodies_pass_through_and_are_counted() {
    let mut vm = vm(r#"{"max_body_bytes":64}"#);
    let big = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"pad":"{}"}}}}"#, "x".repeat(100));
    let r = request(&mut vm, "POST", &[], &big);
    assert_eq!(r.action, Action::Continue);
    assert_eq!(vm.stream(r.id).request_body, big.as_bytes(), "body untouched");
    assert_eq!(metric(&vm, "body_too_large"), 1);

    let r = request(&mut vm, "POST", &[], "{not json");
    assert_eq!(r.action, Action::Continue);
    assert!(vm.stream(r.id).local_reply.is_none());
    assert_eq!(metric(&vm, "malformed_body"), 1);
    assert_eq!(metric(&vm, "initialize_seen"), 0);
}

#[test]
fn sessionless_traffic_passes_untouched_and_pins_nothing() {
    // MCP 2026-07-28: no initialize, no session id.
    let shared = SharedData::default();
    let mut vm = vm_with("", shared.clone());
    let r = request(&mut vm, "POST", &[("mcp-method", "tools/call")], CALL);
    assert_eq!(r.action, Action::Continue, "the method hint lets the filter skip the body");
    let before = vm.stream(r.id).request_headers.clone();
    respond(&mut vm, r.id, "10.0.0.1:80", 200, &[("content-type", "application/json")]);
    assert_eq!(before.len(), 5);
    // Same without the hint: the body is read, found not to be initialize.
    let r = request(&mut vm, "POST", &[], CALL);
    assert_eq!(r.action, Action::Continue);
    respond(&mut vm, r.id, "10.0.0.1:80", 200, &[]);
    assert!(shared.is_empty("mcp-affinity"), "nothing stored");
    assert_eq!(metric(&vm, "sessions_pinned"), 0);
}

#[test]
fn delete_answered_2xx_forgets_the_session() {
    let mut vm = vm("");
    initialize(&mut vm, "10.0.0.1:80", "s");
    let r = request(&mut vm, "DELETE", &[("mcp-session-id", "s")], "");
    assert_eq!(header(&vm.stream(r.id).request_headers, "x-session-pod").as_deref(), Some("10.0.0.1:80"), "DELETE is pinned");
    respond(&mut vm, r.id, "10.0.0.1:80", 200, &[]);
    assert_eq!(metric(&vm, "sessions_forgotten"), 1);
    let r = request(&mut vm, "POST", &[("mcp-session-id", "s")], CALL);
    assert_eq!(local_reply_json(&mut vm, r.id).0, 404);
}

#[test]
fn delete_answered_5xx_keeps_the_session() {
    let mut vm = vm("");
    initialize(&mut vm, "10.0.0.1:80", "s");
    let r = request(&mut vm, "DELETE", &[("mcp-session-id", "s")], "");
    respond(&mut vm, r.id, "10.0.0.1:80", 503, &[]);
    let r = request(&mut vm, "POST", &[("mcp-session-id", "s")], CALL);
    assert_eq!(r.action, Action::Continue);
    assert_eq!(metric(&vm, "sessions_forgotten"), 0);
}

#[test]
fn idle_pins_expire_on_tick_and_active_ones_stay() {
    let mut vm = vm(r#"{"session_ttl_secs":100,"touch_interval_secs":10}"#);
    assert_eq!(vm.tick_period(), Some(Duration::from_secs(10)), "sweep period asked of the host");
    initialize(&mut vm, "10.0.0.1:80", "idle");
    initialize(&mut vm, "10.0.0.2:80", "busy");
    vm.advance_clock(Duration::from_secs(60));
    let r = request(&mut vm, "GET", &[("mcp-session-id", "busy")], ""); // refreshes last-seen
    vm.end_stream(r.id).unwrap();
    vm.advance_clock(Duration::from_secs(50)); // idle: 110 s, busy: 50 s
    vm.tick().unwrap();
    assert_eq!(metric(&vm, "sessions_expired"), 1);
    let r = request(&mut vm, "GET", &[("mcp-session-id", "idle")], "");
    assert_eq!(local_reply_json(&mut vm, r.id).0, 404);
    let r = request(&mut vm, "GET", &[("mcp-session-id", "busy")], "");
    assert_eq!(header(&vm.stream(r.id).request_headers, "x-session-pod").as_deref(), Some("10.0.0.2:80"));
}

#[test]
fn pins_are_shared_by_every_worker_vm() {
    let shared = SharedData::default();
    let mut a = vm_with("", shared.clone());
    let mut b = vm_with("", shared);
    initialize(&mut a, "10.0.0.3:80", "s");
    let r = request(&mut b, "POST", &[("mcp-session-id", "s")], CALL);
    assert_eq!(header(&b.stream(r.id).request_headers, "x-session-pod").as_deref(), Some("10.0.0.3:80"));
}

#[test]
fn backend_session_id_is_mapped_both_ways() {
    let shared = SharedData::default();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    // A pin as recovery leaves it: the backend knows the session under another id.
    shared.set("mcp-affinity", "mcp-affinity/pin/client-id", format!("1 10.0.0.4:80 2 {now} r backend-id").as_bytes(), 0);
    let mut vm = vm_with("", shared);
    let r = request(&mut vm, "POST", &[("mcp-session-id", "client-id")], CALL);
    assert_eq!(header(&vm.stream(r.id).request_headers, "mcp-session-id").as_deref(), Some("backend-id"));
    let st = vm.stream(r.id);
    st.response_headers = host::headers([(":status", "200"), ("mcp-session-id", "backend-id")]);
    vm.on_response_headers(r.id, false).unwrap();
    assert_eq!(header(&vm.stream(r.id).response_headers, "mcp-session-id").as_deref(), Some("client-id"));
}

#[test]
fn invalid_plugin_configuration_fails_on_configure_with_a_reason() {
    let (engine, module) = module();
    for (config, reason) in [(r#"{"pin_hedaer":"x"}"#, "unknown field `pin_hedaer`"), ("{", "invalid plugin configuration"), (r#"{"max_body_bytes":0}"#, "max_body_bytes")] {
        let err = Vm::start(engine, module, VmConfig { plugin_configuration: config.into(), ..Default::default() })
            .err()
            .expect("configuration rejected");
        let msg = format!("{err:#}");
        assert!(msg.contains("on_configure") && msg.contains(reason), "{msg}");
    }
}

fn control_vm(shared: SharedData) -> Vm {
    let (engine, module) = module();
    Vm::start(
        engine,
        module,
        VmConfig {
            vm_id: "mcp-affinity".into(),
            plugin_configuration: br#"{"control":{"cluster":"ctl","token":"t0k"}}"#.to_vec(),
            clusters: ["ctl".to_string()].into(),
            shared,
            ..Default::default()
        },
    )
    .unwrap()
}

fn pinned(shared: &SharedData, client: &str, upstream: &str, backend: &str) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    shared.set("mcp-affinity", &format!("mcp-affinity/pin/{client}"), format!("1 {upstream} 1 {now} r {backend}").as_bytes(), 0);
}

#[test]
fn a_404_from_the_pinned_pod_is_recovered_through_control() {
    let shared = SharedData::default();
    pinned(&shared, "c1", "10.0.0.1:80", "c1");
    let mut vm = control_vm(shared.clone());
    let r = request(&mut vm, "POST", &[("mcp-session-id", "c1"), ("authorization", "Bearer user")], CALL);
    assert_eq!(r.action, Action::Continue, "no extra pause on the happy path");
    let st = vm.stream(r.id);
    st.properties.insert("upstream.address".into(), b"10.0.0.1:80".to_vec());
    st.properties.insert("response.code_details".into(), b"via_upstream".to_vec());
    st.response_headers = host::headers([(":status", "404")]);
    assert_eq!(vm.on_response_headers(r.id, false).unwrap(), Action::Pause, "held for control");
    let calls = vm.take_http_calls(r.id);
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(header(&call.headers, ":path").as_deref(), Some("/v1/sessions/c1/recover"));
    assert_eq!(header(&call.headers, "authorization").as_deref(), Some("Bearer t0k"), "control's token, not the user's");
    let sent: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["reason"], "session_unknown");
    assert_eq!(sent["failed_upstream"], "10.0.0.1:80");
    assert_eq!(sent["failed_generation"], 1);
    assert_eq!(sent["request"]["body"], CALL, "the body copied while it streamed");
    assert_eq!(sent["request"]["authorization"], "Bearer user");
    assert_eq!(sent["request"]["path"], "/mcp?x=1");

    let answer = serde_json::json!({"outcome":"replayed","pin":{"upstream":"10.0.0.2:80","backend_session_id":"b2","generation":2},
        "response":{"status":200,"content_type":"text/event-stream","body":"data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{}}\n\n"}});
    vm.on_http_call_response(call, Some(host::HttpCallResponse { headers: host::headers([(":status", "200")]), body: answer.to_string().into_bytes(), trailers: vec![] })).unwrap();
    let reply = vm.stream(r.id).local_reply.take().expect("the client is answered by control's replay");
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply.headers, "mcp-session-id").as_deref(), Some("c1"), "the client keeps its id");
    assert!(String::from_utf8(reply.body).unwrap().contains("\"result\""));
    assert_eq!(metric(&vm, "recoveries_replayed"), 1);

    // The next request goes to the new pod with the backend's id.
    let r = request(&mut vm, "POST", &[("mcp-session-id", "c1")], CALL);
    let h = &vm.stream(r.id).request_headers;
    assert_eq!(header(h, "x-session-pod").as_deref(), Some("10.0.0.2:80"));
    assert_eq!(header(h, "mcp-session-id").as_deref(), Some("b2"));
}

#[test]
fn ts_sdk_400_bodies_are_read_and_other_errors_pass() {
    let shared = SharedData::default();
    pinned(&shared, "c1", "10.0.0.1:80", "c1");
    let mut vm = control_vm(shared);
    for (body, recovers) in [
        (r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#, true),
        (r#"{"jsonrpc":"2.0","error":{"code":-32602,"message":"Invalid params"},"id":2}"#, false),
    ] {
        let r = request(&mut vm, "POST", &[("mcp-session-id", "c1")], CALL);
        let st = vm.stream(r.id);
        st.properties.insert("response.code_details".into(), b"via_upstream".to_vec());
        st.response_headers = host::headers([(":status", "400"), ("content-type", "application/json")]);
        assert_eq!(vm.on_response_headers(r.id, false).unwrap(), Action::Pause, "headers held to read the small body");
        vm.stream(r.id).response_body = body.as_bytes().to_vec();
        let a = vm.on_response_body(r.id, true).unwrap();
        let calls = vm.take_http_calls(r.id);
        if recovers {
            assert_eq!((a, calls.len()), (Action::Pause, 1));
            assert!(String::from_utf8_lossy(&calls[0].body).contains("session_unknown"));
        } else {
            assert_eq!((a, calls.len()), (Action::Continue, 0), "other errors reach the client untouched");
        }
    }
    // 2xx and SSE are never held.
    let r = request(&mut vm, "POST", &[("mcp-session-id", "c1")], CALL);
    vm.stream(r.id).response_headers = host::headers([(":status", "200"), ("content-type", "text/event-stream")]);
    assert_eq!(vm.on_response_headers(r.id, false).unwrap(), Action::Continue);
}

#[test]
fn a_connect_failure_local_reply_triggers_recovery_and_delete_never_does() {
    let shared = SharedData::default();
    pinned(&shared, "c1", "10.0.0.1:80", "c1");
    let mut vm = control_vm(shared);
    let r = request(&mut vm, "POST", &[("mcp-session-id", "c1")], CALL);
    let st = vm.stream(r.id);
    st.properties.insert("response.code_details".into(), b"upstream_reset_before_response_started{remote_connection_failure}".to_vec());
    st.properties.insert("response.flags".into(), 0x20u64.to_le_bytes().to_vec());
    st.response_headers = host::headers([(":status", "503")]);
    assert_eq!(vm.on_response_headers(r.id, false).unwrap(), Action::Pause);
    let calls = vm.take_http_calls(r.id);
    assert!(String::from_utf8_lossy(&calls[0].body).contains("connect_failure"));
    // Control unreachable: the original answer goes through.
    vm.on_http_call_response(&calls[0], None).unwrap();
    assert!(vm.stream(r.id).resume_response, "resumed with the upstream's answer");
    assert!(vm.stream(r.id).local_reply.is_none());

    let r = request(&mut vm, "DELETE", &[("mcp-session-id", "c1")], "");
    let st = vm.stream(r.id);
    st.properties.insert("response.code_details".into(), b"upstream_reset_before_response_started{remote_connection_failure}".to_vec());
    st.response_headers = host::headers([(":status", "503")]);
    vm.on_response_headers(r.id, false).unwrap();
    assert!(vm.take_http_calls(r.id).iter().all(|c| !String::from_utf8_lossy(&c.body).contains("recover")), "DELETE is never recovered");
}
