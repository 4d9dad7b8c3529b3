//! Host calls whose failure statuses the `proxy-wasm` SDK turns into panics (0.2.5
//! `hostcalls.rs`: "unexpected status"), made directly against the proxy-wasm ABI v0.2.1
//! so the filter sees the status instead. A panic traps the VM and, with
//! `failure_policy: FAIL_CLOSED`, makes that worker answer 503 to everything; the filter
//! must never panic.
//!
//! Envoy answers BAD_ARGUMENT for a header map it no longer holds (request headers after
//! the request-headers callback continued; Envoy `source/extensions/common/wasm/context.cc`,
//! `getMap`) and for a second local reply. The machine is built not to make such calls;
//! these wrappers make a mistake cost a log line instead of the worker.

use std::ptr::null_mut;

use crate::header_map::HeaderPairs;

/// ABI status `OK`.
const OK: u32 = 0;
/// ABI status `NOT_FOUND`.
const NOT_FOUND: u32 = 1;

/// Header maps (ABI `proxy_map_type`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Map {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
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

fn complain(what: &str, status: u32) {
    log::warn!("mcp-affinity: host refused {what}: status {status}");
}

/// A header value; `None` when absent or when the host refused (logged).
pub fn header(map: Map, name: &str) -> Option<Vec<u8>> {
    let (mut ptr, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals; the host writes the result pointer and length.
    let status = unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut ptr, &mut len) };
    match status {
        OK => owned(ptr, len),
        NOT_FOUND => None,
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
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut ptr, &mut len) };
    match status {
        OK => owned(ptr, len),
        s => {
            complain("a header map read", s);
            None
        }
    }
}

/// Sets (replaces) a header; false when the host refused (logged).
pub fn set_header(map: Map, name: &str, value: &str) -> bool {
    // SAFETY: pointers to live slices.
    let status = unsafe { proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    status == OK || {
        complain("a header write", status);
        false
    }
}

/// Removes a header; false when the host refused (logged).
pub fn remove_header(map: Map, name: &str) -> bool {
    // SAFETY: pointer to a live slice.
    let status = unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) };
    status == OK || status == NOT_FOUND || {
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
    let status = unsafe { proxy_get_property(joined.as_ptr(), joined.len(), &mut ptr, &mut len) };
    match status {
        OK => owned(ptr, len),
        NOT_FOUND => None,
        s => {
            log::debug!("mcp-affinity: property {path:?}: status {s}");
            None
        }
    }
}

/// Resumes a held stream (`proxy_continue_stream`).
pub fn resume(stream: StreamType) {
    // SAFETY: no pointers.
    let status = unsafe { proxy_continue_stream(stream as u32) };
    if status != OK {
        complain("a stream resume", status);
    }
}

/// Resets a stream (`proxy_close_stream`; Envoy resets it after the current callback
/// returns, response code details `wasm_close_stream`).
pub fn close(stream: StreamType) {
    // SAFETY: no pointers.
    let status = unsafe { proxy_close_stream(stream as u32) };
    if status != OK {
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
    let s = unsafe { proxy_send_local_response(status, details.as_ptr(), details.len(), body.as_ptr(), body.len(), map.as_ptr(), map.len(), -1) };
    if s != OK {
        complain("a local reply", s);
    }
}
