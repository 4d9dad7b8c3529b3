//! The proxy-wasm ABI v0.2.1 host calls the filter makes, declared here and wrapped so that
//! every status the host can answer is a value, never a panic. The filter does not use the
//! `proxy-wasm` SDK: the SDK panics on statuses it does not expect (0.2.5 `hostcalls.rs`:
//! "unexpected status"), and a panic traps the VM (with `failure_policy: FAIL_CLOSED`, that
//! worker then answers 503 to everything); and its dispatcher exports every callback of the
//! ABI, so Envoy calls into the VM for events the filter never looks at (see
//! [`super::exports`]).
//!
//! Envoy answers BAD_ARGUMENT for a header map it no longer holds (request headers after
//! the request-headers callback continued; Envoy `source/extensions/common/wasm/context.cc`,
//! `getMap`) and for a second local reply. The machine is built not to make such calls;
//! these wrappers make a mistake cost a log line instead of the worker.

use std::ptr::{null, null_mut};
use std::time::Duration;

use crate::header_map::HeaderPairs;

/// A host call's result (proxy-wasm ABI v0.2.1 `proxy_status_t`), as a value: every status
/// the host may return is handled where the call is made, never a panic (the SDK panics on
/// statuses it does not expect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotFound,
    BadArgument,
    SerializationFailure,
    ParseFailure,
    InvalidMemoryAccess,
    Empty,
    CasMismatch,
    InternalFailure,
    Unimplemented,
    /// A code the ABI version does not define.
    Other(u32),
}

impl From<u32> for Status {
    fn from(code: u32) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            6 => Status::InvalidMemoryAccess,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        }
    }
}

/// Buffers (ABI `proxy_buffer_type`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Buffer {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

/// Log levels (ABI `proxy_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Header maps (ABI `proxy_map_type`); the names are the ABI's.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
#[allow(clippy::enum_variant_names)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
}

/// What a stream callback tells Envoy (ABI `proxy_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// Streams (ABI `proxy_stream_type`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum StreamType {
    Request = 0,
    Response = 1,
}

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_header_map_pairs(map: u32, value: *mut *mut u8, value_len: *mut usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_len: usize, value: *mut *mut u8, value_len: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_len: usize, value: *const u8, value_len: usize) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_len: usize, value: *mut *mut u8, value_len: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_len: usize, value: *const u8, value_len: usize) -> u32;
    fn proxy_get_buffer_bytes(buffer: u32, start: usize, max_size: usize, value: *mut *mut u8, value_len: *mut usize) -> u32;
    fn proxy_get_shared_data(key: *const u8, key_len: usize, value: *mut *mut u8, value_len: *mut usize, cas: *mut u32) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_len: usize, value: *const u8, value_len: usize, cas: u32) -> u32;
    fn proxy_define_metric(metric_type: u32, name: *const u8, name_len: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_get_metric(id: u32, value: *mut u64) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_log(level: u32, message: *const u8, message_len: usize) -> u32;
    fn proxy_get_log_level(level: *mut u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_http_call(
        upstream: *const u8,
        upstream_len: usize,
        headers: *const u8,
        headers_len: usize,
        body: *const u8,
        body_len: usize,
        trailers: *const u8,
        trailers_len: usize,
        timeout_ms: u32,
        token: *mut u32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_close_stream(stream: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_len: usize,
        body: *const u8,
        body_len: usize,
        headers: *const u8,
        headers_len: usize,
        grpc_status: i32,
    ) -> u32;
}

/// Takes ownership of bytes the host allocated in guest memory (through the SDK's
/// `proxy_on_memory_allocate`, a `Vec::with_capacity`).
fn owned(ptr: *mut u8, len: usize) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the host wrote `len` bytes into a buffer of capacity `len` it obtained from
    // the guest allocator for this call; nothing else owns it.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

fn complain(what: &str, status: Status) {
    log::warn!("mcp-affinity: host refused {what}: status {status:?}");
}

/// A header value; `None` when absent or when the host refused (logged).
pub fn header(map: Map, name: &str) -> Option<Vec<u8>> {
    let (mut ptr, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals; the host writes the result pointer and length.
    let status = Status::from(unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut ptr, &mut len) });
    match status {
        Status::Ok => owned(ptr, len),
        Status::NotFound => None,
        s => {
            complain("a header read", s);
            None
        }
    }
}

/// A whole header map, serialised as the ABI does (see [`crate::header_map`]); `None`
/// when the host refused (logged).
pub fn pairs(map: Map) -> Option<Vec<u8>> {
    let (mut ptr, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals; the host writes the result pointer and length.
    let status = Status::from(unsafe { proxy_get_header_map_pairs(map as u32, &mut ptr, &mut len) });
    match status {
        Status::Ok => owned(ptr, len),
        s => {
            complain("a header map read", s);
            None
        }
    }
}

/// Sets (replaces) a header; false when the host refused (logged).
pub fn set_header(map: Map, name: &str, value: &str) -> bool {
    // SAFETY: pointers to live slices.
    let status = Status::from(unsafe { proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) });
    status == Status::Ok || {
        complain("a header write", status);
        false
    }
}

/// Removes a header; false when the host refused (logged).
pub fn remove_header(map: Map, name: &str) -> bool {
    // SAFETY: pointer to a live slice.
    let status = Status::from(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) });
    status == Status::Ok || status == Status::NotFound || {
        complain("a header removal", status);
        false
    }
}

/// An Envoy attribute (`proxy_get_property`), path parts joined by `\0`; `None` when
/// unknown or refused.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let mut joined = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            joined.push(0);
        }
        joined.extend_from_slice(part.as_bytes());
    }
    let (mut ptr, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals.
    let status = Status::from(unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut ptr, &mut len) });
    match status {
        Status::Ok => owned(ptr, len),
        Status::NotFound => None,
        s => {
            log::debug!("mcp-affinity: property {path:?}: status {s:?}");
            None
        }
    }
}

/// Sets a property of the stream (`proxy_set_property`): Envoy stores `value` as the
/// filter state `wasm.<path>` (a `CelState`, life span of the filter chain). False when
/// refused.
pub fn set_property(path: &str, value: &[u8]) -> bool {
    // SAFETY: pointers to live slices.
    let status = Status::from(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) });
    if status != Status::Ok {
        log::debug!("mcp-affinity: set property {path}: status {status:?}");
    }
    status == Status::Ok
}

/// Resumes a held stream (`proxy_continue_stream`).
pub fn resume(stream: StreamType) {
    // SAFETY: no pointers.
    let status = Status::from(unsafe { proxy_continue_stream(stream as u32) });
    if status != Status::Ok {
        complain("a stream resume", status);
    }
}

/// Resets a stream (`proxy_close_stream`; Envoy resets it after the current callback
/// returns, response code details `wasm_close_stream`).
pub fn close(stream: StreamType) {
    // SAFETY: no pointers.
    let status = Status::from(unsafe { proxy_close_stream(stream as u32) });
    if status != Status::Ok {
        complain("a stream close", status);
    }
}

/// Sends a local reply (`proxy_send_local_response`; Envoy applies it after the current
/// callback returns). Headers are serialised as the ABI's header map pairs.
pub fn local_reply(status: u32, headers: &[(&str, &str)], body: &[u8]) {
    let map = HeaderPairs::from_pairs(headers);
    let map = map.as_bytes();
    let details = "mcp_affinity";
    // SAFETY: pointers to live slices.
    let s = Status::from(unsafe { proxy_send_local_response(status, details.as_ptr(), details.len(), body.as_ptr(), body.len(), map.as_ptr(), map.len(), -1) });
    if s != Status::Ok {
        complain("a local reply", s);
    }
}

/// Bytes of a buffer (`proxy_get_buffer_bytes`): `max_size` bytes from `start`; empty when
/// the buffer is absent or the host refused.
pub fn buffer(buffer: Buffer, start: usize, max_size: usize) -> Vec<u8> {
    let (mut ptr, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals; the host writes the result pointer and length.
    let status = Status::from(unsafe { proxy_get_buffer_bytes(buffer as u32, start, max_size, &mut ptr, &mut len) });
    match status {
        Status::Ok => owned(ptr, len).unwrap_or_default(),
        Status::NotFound => Vec::new(),
        s => {
            complain("a buffer read", s);
            Vec::new()
        }
    }
}

/// A shared-data value and its CAS number (`proxy_get_shared_data`); `None` when the key
/// is unknown or the host refused.
pub fn shared_data(key: &str) -> Option<(Vec<u8>, Option<u32>)> {
    let (mut ptr, mut len, mut cas) = (null_mut(), 0, 0);
    // SAFETY: pointers to live locals.
    let status = Status::from(unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) });
    match status {
        Status::Ok => Some((owned(ptr, len).unwrap_or_default(), (cas != 0).then_some(cas))),
        Status::NotFound => None,
        s => {
            complain("a shared-data read", s);
            None
        }
    }
}

/// Writes a shared-data value (`proxy_set_shared_data`), guarded by `cas` when given;
/// false on CAS_MISMATCH (another writer was first) or when the host refused (logged).
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    // SAFETY: pointers to live slices.
    let status = Status::from(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) });
    match status {
        Status::Ok => true,
        Status::CasMismatch => false,
        s => {
            complain("a shared-data write", s);
            false
        }
    }
}

/// Defines a counter (`proxy_define_metric`, type 0); its id, 0 when refused.
pub fn define_counter(name: &str) -> u32 {
    let mut id = 0;
    // SAFETY: pointers to a live slice and local.
    let status = Status::from(unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) });
    if status == Status::Ok { id } else { 0 }
}

/// Adds `n` to a counter (`proxy_increment_metric`); a refusal is ignored.
pub fn increment(id: u32, n: u64) {
    // SAFETY: no pointers.
    let _ = unsafe { proxy_increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX)) };
}

/// A metric's value, process-wide (`proxy_get_metric`: written to a local, no bytes copied
/// into the VM); 0 when refused.
pub fn metric(id: u32) -> u64 {
    let mut value = 0;
    // SAFETY: pointer to a live local.
    let status = Status::from(unsafe { proxy_get_metric(id, &mut value) });
    if status == Status::Ok { value } else { 0 }
}

/// Wall clock since the Unix epoch (`proxy_get_current_time_nanoseconds`); zero when refused.
pub fn now() -> Duration {
    let mut nanos = 0;
    // SAFETY: pointer to a live local.
    let _ = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    Duration::from_nanos(nanos)
}

/// Calls the root context's `proxy_on_tick` every `period` (`proxy_set_tick_period_milliseconds`).
pub fn set_tick_period(period: Duration) {
    // SAFETY: no pointers.
    let status = Status::from(unsafe { proxy_set_tick_period_milliseconds(u32::try_from(period.as_millis()).unwrap_or(u32::MAX)) });
    if status != Status::Ok {
        complain("a tick period", status);
    }
}

/// Makes later host calls of this callback act on `context_id` (`proxy_set_effective_context`);
/// false when the context is gone.
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: no pointers.
    Status::from(unsafe { proxy_set_effective_context(context_id) }) == Status::Ok
}

/// Writes a log line at `level` (`proxy_log`).
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer to a live slice.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// The host's log level for this VM (`proxy_get_log_level`), `None` when refused.
pub fn log_level() -> Option<LogLevel> {
    let mut level = 0;
    // SAFETY: pointer to a live local.
    let status = Status::from(unsafe { proxy_get_log_level(&mut level) });
    if status != Status::Ok {
        return None;
    }
    Some(match level {
        0 => LogLevel::Trace,
        1 => LogLevel::Debug,
        2 => LogLevel::Info,
        3 => LogLevel::Warn,
        4 => LogLevel::Error,
        _ => LogLevel::Critical,
    })
}

/// Sends an HTTP request to `cluster` (`proxy_http_call`; headers as the ABI's serialised
/// map, which must hold `:method`, `:path` and `:authority`); the call's token, or the
/// host's status when it refused (BAD_ARGUMENT: unknown cluster or missing pseudo-header;
/// INTERNAL_FAILURE). The answer arrives in `proxy_on_http_call_response` of the root
/// context.
pub fn http_call(cluster: &str, headers: &[(&str, &str)], body: Option<&[u8]>, timeout: Duration) -> Result<u32, Status> {
    let map = HeaderPairs::from_pairs(headers);
    let map = map.as_bytes();
    let (body_ptr, body_len) = body.map_or((null(), 0), |b| (b.as_ptr(), b.len()));
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let trailers = HeaderPairs::from_pairs(&[]);
    let trailers = trailers.as_bytes();
    let mut token = 0;
    // SAFETY: pointers to live slices and a live local.
    let status = Status::from(unsafe {
        proxy_http_call(cluster.as_ptr(), cluster.len(), map.as_ptr(), map.len(), body_ptr, body_len, trailers.as_ptr(), trailers.len(), timeout_ms, &mut token)
    });
    if status == Status::Ok { Ok(token) } else { Err(status) }
}
