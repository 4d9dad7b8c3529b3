//! The module's exports: the proxy-wasm ABI v0.2.1 callbacks Envoy calls into the VM, and
//! only those the filter uses. proxy-wasm-cpp-host calls a callback only when the module
//! exports it (`src/context.cc`: `if (!wasm_->on_response_body_) return Continue;` and the
//! same for every event), and each call into the VM costs a V8 entry and exit. The SDK's
//! dispatcher exports every callback, so a pinned request used to pay for eight of them;
//! here it pays for four (`proxy_on_context_create`, `proxy_on_request_headers`,
//! `proxy_on_response_headers`, `proxy_on_delete`), five with a body
//! (`proxy_on_request_body`); in the shipped Envoy configurations Envoy's response matcher
//! spares the steady request `proxy_on_response_headers` and the response body callbacks
//! too (`envoy/README.md`). `proxy_on_response_body` copies nothing but the answer of a
//! 2026-era `tools/call`, which may create a task ([`crate::tasks`]). Not exported, so
//! never called: trailers, metadata, `proxy_on_log`, `proxy_on_done` (Envoy calls
//! `proxy_on_delete` right after it, `Context::onDestroy`), network-filter, queue, gRPC and
//! foreign-function callbacks.
//!
//! Contexts live in this VM's registry: root contexts (one per plugin configuration that
//! uses the VM) and streams (each with its root's [`super::plugin::Plugin`]); answers to
//! calls go where [`super::calls`] says.
//!
//! Nothing here panics: an unknown context id is a callback to ignore (`Continue`).

use std::cell::RefCell;

use hashbrown::HashMap;

use super::abi::{self, Action};
use super::calls::{self, ENDED_STREAM};
use super::http_context::HttpContext;
use super::log;
use super::root::RootContext;

thread_local! {
    static ROOTS: RefCell<HashMap<u32, RootContext>> = RefCell::new(HashMap::new());
    static STREAMS: RefCell<HashMap<u32, HttpContext>> = RefCell::new(HashMap::new());
}

/// Runs `f` on stream `context_id`, if it exists.
fn with_stream<T>(context_id: u32, f: impl FnOnce(&mut HttpContext) -> T) -> Option<T> {
    STREAMS.with_borrow_mut(|streams| streams.get_mut(&context_id).map(f))
}

fn stream_action(context_id: u32, f: impl FnOnce(&mut HttpContext) -> Action) -> u32 {
    with_stream(context_id, f).unwrap_or(Action::Continue) as u32
}

/// Runs `f` on root context `context_id`, if it exists.
fn with_root(context_id: u32, f: impl FnOnce(&mut RootContext)) {
    ROOTS.with_borrow_mut(|roots| {
        if let Some(root) = roots.get_mut(&context_id) {
            f(root);
        }
    });
}

// ---- module start and memory -----------------------------------------------------------

#[cfg(target_os = "wasi")]
unsafe extern "C" {
    fn __wasm_call_ctors();
}

/// WASI reactor start: runs static constructors, installs the logger and the panic hook.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: called once by the host before any other export, as WASI reactors require.
    unsafe {
        __wasm_call_ctors();
    }
    log::install();
}

/// Marks the ABI version the module speaks (proxy-wasm-cpp-host looks for this export).
#[unsafe(no_mangle)]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates here the bytes it returns (header values, buffers, shared data); the
/// filter takes them back as a `Vec` of exactly `size` bytes ([`abi`]'s `owned`).
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut bytes = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
    bytes.as_mut_ptr()
}

// ---- contexts --------------------------------------------------------------------------

/// A root context (`root_context_id` 0) or a stream of root `root_context_id`. A stream of
/// a root whose configuration was rejected gets no state: its callbacks go on untouched.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_context_create(context_id: u32, root_context_id: u32) {
    if root_context_id == 0 {
        ROOTS.with_borrow_mut(|roots| {
            roots.entry(context_id).or_insert_with(|| RootContext::new(context_id));
        });
        return;
    }
    let plugin = ROOTS.with_borrow(|roots| roots.get(&root_context_id).and_then(|r| r.plugin().cloned()));
    if let Some(plugin) = plugin {
        STREAMS.with_borrow_mut(|streams| streams.insert(context_id, HttpContext::new(plugin, context_id)));
    }
}

/// VM start: nothing to read from the VM configuration; follows the host's log level.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    log::follow_host_level();
    1
}

/// The plugin configuration of a root context; 0 rejects it.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_configure(root_context_id: u32, configuration_size: usize) -> u32 {
    let accepted = ROOTS.with_borrow_mut(|roots| {
        roots.entry(root_context_id).or_insert_with(|| RootContext::new(root_context_id)).on_configure(configuration_size)
    });
    u32::from(accepted)
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_tick(root_context_id: u32) {
    with_root(root_context_id, RootContext::on_tick);
}

/// An answer from control: to the stream that made the call (dropped when it has ended),
/// else to the root that made it.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_http_call_response(context_id: u32, token: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
    let stream_id = calls::take(token);
    if stream_id == Some(ENDED_STREAM) {
        with_root(context_id, |root| root.on_write_answer(num_headers));
        return;
    }
    if let Some(stream_id) = stream_id {
        with_stream(stream_id, |stream| {
            if abi::set_effective_context(stream_id) {
                stream.on_http_call_response(num_headers, body_size);
            }
        });
        return;
    }
    with_root(context_id, |root| root.on_http_call_response(token, num_headers, body_size));
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _num_headers: usize, end_of_stream: u32) -> u32 {
    stream_action(context_id, |s| s.on_request_headers(end_of_stream != 0))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: u32) -> u32 {
    stream_action(context_id, |s| s.on_request_body(body_size, end_of_stream != 0))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: u32) -> u32 {
    stream_action(context_id, |s| s.on_response_body(body_size, end_of_stream != 0))
}

#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_response_headers(context_id: u32, _num_headers: usize, _end_of_stream: u32) -> u32 {
    stream_action(context_id, HttpContext::on_response_headers)
}

/// The end of a context: a stream finishes (waking streams that waited for its control
/// call) and is dropped; a root is dropped.
#[unsafe(no_mangle)]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    if let Some(mut stream) = STREAMS.with_borrow_mut(|streams| streams.remove(&context_id)) {
        stream.on_done();
        return;
    }
    ROOTS.with_borrow_mut(|roots| roots.remove(&context_id));
}
