//! The filter's per-request work, natively: what a request with a session id costs
//! (id validation, pin decode, header value) and what a POST without one costs
//! (`initialize` classification). Prints ns/op; run with `cargo bench -p mcp-affinity-filter`
//! (or `make bench`). Numbers are for comparison between changes, not timed assertions.

use std::hint::black_box;
use std::time::Instant;

use mcp_affinity_filter::jsonrpc;
use mcp_affinity_filter::pin::{Pin, PinEncoding};
use mcp_affinity_filter::session_id;

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
}
