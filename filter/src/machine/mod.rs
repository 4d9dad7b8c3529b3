//! The filter's decisions, independent of the host: one machine per HTTP stream
//! ([`Stream`]) and one per root context ([`Root`]: tick cadence, record batches, the
//! sweep, touches, the draining list). The proxy-wasm layer (`proxy/`) only translates
//! Envoy's callbacks into their events and their actions into host calls.
//!
//! A stream's events in (request headers, a
//! request body chunk, response headers, a control answer, the end of the stream), a
//! [`Step`] out (header changes, calls to control, a local reply, and whether the stream
//! goes on). The proxy-wasm layer (`proxy/http_context.rs`) only translates.
//!
//! The machine encodes the rules real Envoy imposes on a proxy-wasm HTTP filter (checked
//! in proxy-wasm-cpp-host `src/context.cc` and Envoy
//! `source/extensions/common/wasm/context.cc`; each has a unit test below):
//! 1. **A headers `Pause` stops the body too.** `convertVmCallResultToFilterHeadersStatus`
//!    turns StopIteration into `StopAllIterationAndWatermark`: no body event reaches the
//!    filter until it resumes the stream itself. So request headers are never paused to
//!    read the body: a POST without session id goes on at once and its body is copied
//!    chunk by chunk as it streams. Headers are paused only while waiting for control,
//!    and the control answer resumes them.
//! 2. **Request headers are readable only in the request-headers event** (and while that
//!    event's pause holds the stream): Envoy drops its pointer to them once the callback
//!    continued, and a later read fails (the SDK then panics). The `request.*` attributes
//!    go through the same pointer, so they are gone too. The machine gets the request
//!    headers as one serialised map ([`crate::header_map::HeaderPairs`], one host call) and keeps that
//!    buffer when a recovery may need the request later.
//! 3. **A response body cannot be read before deciding on the response headers** (rule 1
//!    on the response side). A small error answer that may mean "session unknown" (400
//!    JSON, as TypeScript-SDK servers answer) is therefore held on its headers while
//!    control verifies the session with a probe ([`crate::recovery::Reason::SessionSuspect`]); alive →
//!    the original answer goes on unchanged.
//! 4. **Response headers are writable only in the response-headers event** or while
//!    paused there (the session id the client sees is rewritten then).
//! 5. **Once the router is done, the rest of the request body never reaches the filter.**
//!    A router local reply (pinned pod gone) or an upstream answer can come before the
//!    body did (HTTP/1.1 clients that write headers and body apart, chunked bodies, HTTP/2
//!    DATA frames); Envoy then reads the body off the connection but calls no decoder
//!    filter with it (`-l trace`: `request end stream timestamp recorded`, no `decode data
//!    called`). So a replay is sent only for a body whose end the filter saw; Envoy's
//!    buffer filter ahead of this one (`envoy/envoy.yaml`) makes that every body.

//!
//! The module's files: [`vm`] (host services, the VM's shared state), [`ops`] (the actions
//! and flow an event returns), `body` (the bounded body copy), `state` (a stream's state),
//! and one file per kind of event: `request`, `response`, `answers`; `tasks` the MCP
//! 2026-07-28 era's task affinity (its requests, answers and answer bodies); [`root`] the
//! root context's machine.

mod answers;
mod body;
pub mod ops;
mod request;
mod response;
pub mod root;
mod state;
mod tasks;
pub mod vm;

pub use self::ops::{Call, ControlAnswer, Resource, Flow, Header, Op, Reply, ResponseHead, Step, WANT_RESPONSE, json};
pub use self::root::{Root, RootCtx, RootHost, tick_change};
pub use self::state::Stream;
pub use self::vm::{Ctx, Env, Vm};

#[cfg(test)]
mod tests;
