//! The filter's per-request work, natively: what a request with a session id costs
//! (id validation, pin decode, header value) and what a POST without one costs
//! (`initialize` classification); then whole events of the stream machine as a worker VM
//! runs them (a new session's request headers, body and response headers; a pinned
//! request), with in-memory shared data standing in for the host's. Prints ns/op; run with
//! `cargo bench -p mcp-affinity-filter` (or `make bench`). Numbers are for comparison
//! between changes, not timed assertions. Under `valgrind --tool=callgrind` the machine
//! cases name the functions a new session or a pinned request spends its instructions in
//! (the wasm build runs the same code, without symbols in Envoy's profile).

use std::hint::black_box;
use std::time::Instant;

use mcp_affinity_filter::config::{ControlConfig, FilterConfig};
use mcp_affinity_filter::header_map::HeaderPairs;
use mcp_affinity_filter::jsonrpc;
use mcp_affinity_filter::metrics::Counter;
use mcp_affinity_filter::pin::{Pin, PinEncoding};
use mcp_affinity_filter::session_id;
use mcp_affinity_filter::store::SharedData;
use mcp_affinity_filter::store::memory::MemorySharedData;
use mcp_affinity_filter::machine::{Ctx, Env, ResponseHead, Stream, Vm};

/// Host services in memory: shared data, a fixed clock, counters dropped.
#[derive(Default)]
struct BenchEnv {
    shared: MemorySharedData,
}

impl Env for BenchEnv {
    fn shared(&mut self) -> &mut dyn SharedData {
        &mut self.shared
    }
    fn now_secs(&self) -> u64 {
        1_700_000_000
    }
    fn count(&mut self, c: Counter) {
        black_box(c);
    }
    fn pins_changed(&self) -> u64 {
        0
    }
}

/// A pod's answer: `Mcp-Session-Id` (a new id each time, as a pod issues them) from
/// upstream host 10.12.3.45:8080.
struct Answer {
    session_id: Vec<u8>,
}

impl ResponseHead for Answer {
    fn status(&self) -> u16 {
        200
    }
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        (name == "mcp-session-id").then(|| self.session_id.clone())
    }
    fn code_details(&self) -> Option<Vec<u8>> {
        Some(b"via_upstream".to_vec())
    }
    fn flags(&self) -> u64 {
        0
    }
    fn upstream_address(&self) -> Option<Vec<u8>> {
        Some(b"10.12.3.45:8080".to_vec())
    }
    fn attempt_count(&self) -> u64 {
        1
    }
}

/// One plugin configuration and its worker VM's state.
struct World {
    cfg: FilterConfig,
    vm: Vm,
    env: BenchEnv,
    next_id: u64,
}

impl World {
    fn new(control: bool) -> World {
        let mut cfg = FilterConfig::default();
        if control {
            cfg.control = Some(ControlConfig::default());
        }
        World { cfg, vm: Vm::default(), env: BenchEnv::default(), next_id: 0 }
    }

    fn cx(&mut self) -> Ctx<'_> {
        Ctx { control: self.cfg.control.is_some(), cfg: &self.cfg, vm: &mut self.vm, env: &mut self.env }
    }

    /// A POST `initialize` without session id and its answer with a new session id: the
    /// events Envoy delivers (request headers, one body chunk, response headers, the end).
    /// Returns the new session's id. With control, the record is queued; the queue is
    /// emptied here as the root context's tick would.
    fn new_session(&mut self, head: &HeaderPairs, body: &[u8]) -> String {
        self.next_id += 1;
        let id = format!("0b6f2a3e-1c2d-4e5f-8a9b-{:012x}", self.next_id);
        let mut s = Stream::new(1);
        black_box(s.on_request_headers(&mut self.cx(), head.clone(), false));
        black_box(s.on_request_body(&mut self.cx(), &|| body.to_vec(), true));
        black_box(s.on_response_headers(&mut self.cx(), &Answer { session_id: id.as_bytes().to_vec() }));
        black_box(s.on_done(&mut self.cx()));
        black_box(self.vm.records.take_batch());
        id
    }

    /// A POST with the session's id: routed to its pin (request headers, body, the end; the
    /// response matcher spares the steady answer the filter).
    fn pinned_request(&mut self, head: &HeaderPairs, body: &[u8]) {
        let mut s = Stream::new(2);
        black_box(s.on_request_headers(&mut self.cx(), head.clone(), false));
        black_box(s.on_request_body(&mut self.cx(), &|| body.to_vec(), true));
        black_box(s.on_done(&mut self.cx()));
    }
}

fn bench(name: &str, iterations: u32, mut f: impl FnMut()) {
    for _ in 0..iterations / 10 {
        f(); // warm up
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{name:<48} {ns:>9.1} ns/op");
}

fn main() {
    let id = b"0b6f2a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    let pin = Pin {
        upstream: "10.12.3.45:8080".into(),
        generation: 3,
        last_seen: 1_700_000_000,
        backend_session_id: "0b6f2a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
        recorded: true,
    };
    let encoded = pin.encode();
    let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{"roots":{"listChanged":true},"sampling":{}},"clientInfo":{"name":"bench","version":"1.0.0"}}}"#;
    let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello world"}}}"#;

    println!("mcp-affinity filter hot path (native, release)");
    bench("session_id::validate (UUID)", 5_000_000, || {
        black_box(session_id::validate(black_box(id), 256).unwrap());
    });
    bench("Pin::decode (shared-data value)", 2_000_000, || {
        black_box(Pin::decode(black_box(&encoded)).unwrap());
    });
    bench("Pin::encode", 2_000_000, || {
        black_box(black_box(&pin).encode());
    });
    bench("PinEncoding::Plain header value", 5_000_000, || {
        black_box(PinEncoding::Plain.header_value(black_box("10.12.3.45:8080")));
    });
    bench("PinEncoding::Base64 header value", 5_000_000, || {
        black_box(PinEncoding::Base64.header_value(black_box("10.12.3.45:8080")));
    });
    bench("jsonrpc::classify (initialize, 190 B)", 1_000_000, || {
        black_box(jsonrpc::classify(black_box(init)));
    });
    bench("jsonrpc::classify (tools/call, 110 B)", 1_000_000, || {
        black_box(jsonrpc::classify(black_box(call)));
    });

    let head = [(":method", "POST"), (":path", "/mcp"), (":authority", "mcp.example"), ("content-type", "application/json"), ("accept", "application/json, text/event-stream")];
    let new_head = HeaderPairs::from_pairs(&head);
    for control in [false, true] {
        let label = if control { "with control" } else { "no control" };
        let mut w = World::new(control);
        bench(&format!("machine: new session ({label})"), 200_000, || {
            w.new_session(&new_head, init);
        });
        let id = w.new_session(&new_head, init);
        let pinned_head = HeaderPairs::from_pairs(&[head.as_slice(), &[("mcp-session-id", id.as_str())]].concat());
        bench(&format!("machine: pinned request ({label})"), 1_000_000, || {
            w.pinned_request(&pinned_head, call);
        });
    }
}
