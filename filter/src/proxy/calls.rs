//! The VM's calls to control in flight that streams made: token → stream context id.
//! Envoy attaches every `proxy_http_call` to the root context (proxy-wasm-cpp-host
//! `src/exports.cc`, `http_call` uses `root_context()`), so every answer arrives as the
//! root's `proxy_on_http_call_response`; this table hands a stream's answer to that
//! stream. When the stream has ended, its writes' answers go to the root context to be
//! counted ([`ENDED_STREAM`]); any other answer is dropped.

use std::cell::RefCell;

use hashbrown::HashMap;

thread_local! {
    static CALLS: RefCell<HashMap<u32, u32>> = RefCell::new(HashMap::new());
}

/// The "stream" of a write whose stream has ended ([`answer_at_root`]).
pub const ENDED_STREAM: u32 = 0;

/// Routes the answer to call `token` to stream `context_id`.
pub fn expect_answer(token: u32, context_id: u32) {
    CALLS.with_borrow_mut(|calls| calls.insert(token, context_id));
}

/// Sends the answers to the calls in flight of stream `context_id`, which is ending and
/// whose calls are writes, to the root context to be counted.
pub fn answer_at_root(context_id: u32) {
    CALLS.with_borrow_mut(|calls| calls.values_mut().filter(|id| **id == context_id).for_each(|id| *id = ENDED_STREAM));
}

/// Who waits for the answer to call `token`: a stream's context id, [`ENDED_STREAM`], or
/// `None` for a call the root context made itself.
pub fn take(token: u32) -> Option<u32> {
    CALLS.with_borrow_mut(|calls| calls.remove(&token))
}
