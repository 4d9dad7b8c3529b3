//! A proxy-wasm host on `wasmtime` that runs the real filter `.wasm` the way Envoy does
//! (ABI v0.2.1): memory protocol, header maps, buffers, properties, shared data with CAS,
//! local replies, `dispatch_http_call`, ticks, metrics and logs.
//!
//! Every emulated behaviour cites its source in a comment: the proxy-wasm spec, the Rust
//! SDK, or Envoy's source/docs, so it can be checked against real Envoy.

pub mod abi;
mod imports;
pub mod shared_data;
pub mod state;
pub mod vm;

pub use abi::{Action, Headers};
pub use shared_data::SharedData;
pub use state::{HttpCall, HttpCallResponse, LocalReply, MetricsStore, StreamState};
pub use vm::{Vm, VmConfig, compile, headers};
