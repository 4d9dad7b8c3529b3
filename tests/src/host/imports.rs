//! The host functions a proxy-wasm ABI v0.2.1 module imports (`env.proxy_*`) and the WASI
//! functions a `wasm32-wasip1` Rust module needs, implemented as Envoy implements them.
//!
//! Sources, cited per function below:
//! - [spec] proxy-wasm spec `abi-versions/v0.2.1/README.md` (signatures, status codes);
//! - [sdk] proxy-wasm-rust-sdk `src/hostcalls.rs` (which statuses the SDK accepts; it
//!   panics on others, so answering the wrong status turns into a trap — as in Envoy);
//! - [envoy] Envoy `source/extensions/common/wasm/context.cc` and proxy-wasm-cpp-host
//!   `src/exports.cc` (behaviour behind each call).

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Result, format_err as anyhow};
use wasmtime::{Caller, Extern, Linker, Module, Val, ValType};

use super::abi::{self, BufferType, Headers, MapType, status};
use super::shared_data::SetResult;
use super::state::{HostState, HttpCall, LocalReply, LogLine, Phase};

type C<'a> = Caller<'a, HostState>;

/// Reads `len` bytes at guest address `ptr`.
fn read(c: &mut C, ptr: i32, len: i32) -> Result<Vec<u8>, i32> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = c.get_export("memory").and_then(Extern::into_memory).ok_or(status::INTERNAL_FAILURE)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*c).get(ptr..ptr + len).map(<[u8]>::to_vec).ok_or(status::INVALID_MEMORY_ACCESS)
}

/// Writes `bytes` at guest address `ptr`.
fn write(c: &mut C, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let mem = c.get_export("memory").and_then(Extern::into_memory).ok_or(status::INTERNAL_FAILURE)?;
    let ptr = ptr as u32 as usize;
    mem.data_mut(&mut *c)
        .get_mut(ptr..ptr + bytes.len())
        .ok_or(status::INVALID_MEMORY_ACCESS)?
        .copy_from_slice(bytes);
    Ok(())
}

/// Hands `bytes` to the guest: the host calls `proxy_on_memory_allocate(size)` from inside
/// the host call, copies the bytes there, and writes pointer and length (u32 LE) into the
/// guest's return slots ([spec] "Memory management"; [sdk] `allocator.rs`). An empty
/// value is returned as a null pointer, which the SDK reads as "no data".
fn give(c: &mut C, bytes: &[u8], ret_ptr: i32, ret_len: i32) -> Result<i32> {
    let ptr = if bytes.is_empty() {
        0
    } else {
        let alloc = c
            .get_export("proxy_on_memory_allocate")
            .and_then(Extern::into_func)
            .ok_or_else(|| anyhow!("module does not export proxy_on_memory_allocate"))?
            .typed::<i32, i32>(&*c)?;
        let ptr = alloc.call(&mut *c, bytes.len() as i32)?;
        if ptr == 0 {
            return Ok(status::INTERNAL_FAILURE);
        }
        // The allocation may have grown memory: `write` looks the memory up again.
        if let Err(s) = write(c, ptr, bytes) {
            return Ok(s);
        }
        ptr
    };
    Ok(status_of(write(c, ret_ptr, &(ptr as u32).to_le_bytes()).and_then(|_| write(c, ret_len, &(bytes.len() as u32).to_le_bytes()))))
}

fn status_of(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => status::OK,
        Err(s) => s,
    }
}

/// Turns `Result<i32, i32>` (status either way) into the host call's return value.
macro_rules! st {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return Ok(s),
        }
    };
}

/// The header map a call addresses. Stream maps need a stream context; call-response maps
/// exist only inside `proxy_on_http_call_response` ([envoy] `Context::getMap`).
fn map_mut(s: &mut HostState, raw: i32) -> Result<&mut Headers, i32> {
    let t = MapType::from_raw(raw).ok_or(status::BAD_ARGUMENT)?;
    match t {
        MapType::HttpCallResponseHeaders => s.call_response.as_mut().map(|r| &mut r.headers).ok_or(status::NOT_FOUND),
        MapType::HttpCallResponseTrailers => s.call_response.as_mut().map(|r| &mut r.trailers).ok_or(status::NOT_FOUND),
        _ => {
            let stream = s.stream().ok_or(status::NOT_FOUND)?;
            Ok(match t {
                MapType::RequestHeaders => &mut stream.request_headers,
                MapType::RequestTrailers => &mut stream.request_trailers,
                MapType::ResponseHeaders => &mut stream.response_headers,
                _ => &mut stream.response_trailers,
            })
        }
    }
}

/// A mutable map, refusing request headers that already went upstream: Envoy cannot
/// change them any more and answers BAD_ARGUMENT, on which the SDK panics ([sdk]
/// `set_map_value`, `remove_map_value`; [envoy] `Context::replaceHeaderMapValue`).
fn map_for_write(s: &mut HostState, raw: i32) -> Result<&mut Headers, i32> {
    if raw == 0 && s.stream().is_some_and(|st| st.phase == Phase::RequestHeadersSent) {
        return Err(status::BAD_ARGUMENT);
    }
    map_mut(s, raw)
}

fn key_string(bytes: Vec<u8>) -> Result<String, i32> {
    String::from_utf8(bytes).map(|k| k.to_ascii_lowercase()).map_err(|_| status::BAD_ARGUMENT)
}

fn buffer(s: &mut HostState, raw: i32) -> Result<&mut Vec<u8>, i32> {
    let t = BufferType::from_raw(raw).ok_or(status::BAD_ARGUMENT)?;
    match t {
        BufferType::VmConfiguration => Ok(&mut s.vm_configuration),
        BufferType::PluginConfiguration => Ok(&mut s.plugin_configuration),
        BufferType::HttpCallResponseBody => s.call_response.as_mut().map(|r| &mut r.body).ok_or(status::NOT_FOUND),
        BufferType::RequestBody => s.stream().map(|st| &mut st.request_body).ok_or(status::NOT_FOUND),
        BufferType::ResponseBody => s.stream().map(|st| &mut st.response_body).ok_or(status::NOT_FOUND),
    }
}

/// Properties: the stream's attributes first, then the plugin's ([envoy] attributes
/// reference: `plugin_name`, `plugin_root_id`, `plugin_vm_id`).
fn property(s: &mut HostState, name: &str) -> Option<Vec<u8>> {
    if let Some(v) = s.stream().and_then(|st| st.properties.get(name).cloned()) {
        return Some(v);
    }
    match name {
        "plugin_name" | "plugin_root_id" => Some(s.plugin_name.clone().into_bytes()),
        "plugin_vm_id" => Some(s.vm_id.clone().into_bytes()),
        _ => None,
    }
}

/// Defines every import of `module` on `linker`: the proxy-wasm and WASI functions below,
/// and for anything else a stub answering UNIMPLEMENTED (proxy-wasm) or ENOSYS (WASI),
/// as Envoy's null implementations do for calls it does not support.
pub fn define(linker: &mut Linker<HostState>, module: &Module) -> anyhow::Result<()> {
    let mut defined = HashSet::new();
    macro_rules! env {
        ($name:literal, $f:expr) => {{
            linker.func_wrap("env", $name, $f)?;
            defined.insert(("env".to_string(), $name.to_string()));
        }};
    }
    macro_rules! wasi {
        ($name:literal, $f:expr) => {{
            linker.func_wrap("wasi_snapshot_preview1", $name, $f)?;
            defined.insert(("wasi_snapshot_preview1".to_string(), $name.to_string()));
        }};
    }

    // [spec] proxy_log(level, message_data, message_size).
    env!("proxy_log", |mut c: C, level: i32, ptr: i32, len: i32| -> Result<i32> {
        let msg = st!(read(&mut c, ptr, len));
        let message = String::from_utf8_lossy(&msg).into_owned();
        if c.data().echo_logs {
            tracing::debug!(target: "wasm", level, "{message}");
        }
        c.data_mut().logs.push(LogLine { level, message });
        Ok(status::OK)
    });
    // [spec] proxy_get_log_level(return_level): Envoy's current level; we log everything.
    env!("proxy_get_log_level", |mut c: C, ret: i32| -> Result<i32> {
        Ok(status_of(write(&mut c, ret, &0i32.to_le_bytes())))
    });
    // [spec] proxy_get_current_time_nanoseconds(return_time): wall clock, u64 LE.
    env!("proxy_get_current_time_nanoseconds", |mut c: C, ret: i32| -> Result<i32> {
        let now = SystemTime::now() + c.data().clock_offset;
        let nanos = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        Ok(status_of(write(&mut c, ret, &nanos.to_le_bytes())))
    });
    // [spec] proxy_set_tick_period_milliseconds(period): 0 disables the tick.
    env!("proxy_set_tick_period_milliseconds", |mut c: C, ms: i32| -> Result<i32> {
        let ms = ms as u32;
        c.data_mut().tick_period = (ms > 0).then(|| std::time::Duration::from_millis(ms.into()));
        Ok(status::OK)
    });

    // [spec] proxy_get_buffer_bytes(type, start, max_size, return_data, return_size).
    env!("proxy_get_buffer_bytes", |mut c: C, t: i32, start: i32, max: i32, ret_ptr: i32, ret_len: i32| -> Result<i32> {
        let (start, max) = (start as u32 as usize, max as u32 as usize);
        let bytes = {
            let buf = st!(buffer(c.data_mut(), t));
            if start > buf.len() {
                return Ok(status::BAD_ARGUMENT);
            }
            buf[start..buf.len().min(start.saturating_add(max))].to_vec()
        };
        give(&mut c, &bytes, ret_ptr, ret_len)
    });
    // [spec] proxy_set_buffer_bytes(type, start, size, value_data, value_size), with
    // Envoy's rules ([envoy] `Buffer::copyFrom`): start 0 and size ≥ length replaces the
    // whole buffer; start 0 and size 0 prepends; start ≥ length appends; else BAD_ARGUMENT.
    env!("proxy_set_buffer_bytes", |mut c: C, t: i32, start: i32, size: i32, ptr: i32, len: i32| -> Result<i32> {
        let value = st!(read(&mut c, ptr, len));
        let (start, size) = (start as u32 as usize, size as u32 as usize);
        let buf = st!(buffer(c.data_mut(), t));
        if start == 0 && size == 0 {
            buf.splice(0..0, value);
        } else if start == 0 && size >= buf.len() {
            *buf = value;
        } else if start >= buf.len() {
            buf.extend_from_slice(&value);
        } else {
            return Ok(status::BAD_ARGUMENT);
        }
        Ok(status::OK)
    });

    // [spec] proxy_get_header_map_pairs(type, return_data, return_size): serialised map.
    env!("proxy_get_header_map_pairs", |mut c: C, t: i32, ret_ptr: i32, ret_len: i32| -> Result<i32> {
        let bytes = abi::serialize_map(st!(map_mut(c.data_mut(), t)));
        give(&mut c, &bytes, ret_ptr, ret_len)
    });
    // [spec] proxy_set_header_map_pairs(type, data, size): replaces the whole map.
    env!("proxy_set_header_map_pairs", |mut c: C, t: i32, ptr: i32, len: i32| -> Result<i32> {
        let bytes = st!(read(&mut c, ptr, len));
        let Some(new) = abi::deserialize_map(&bytes) else { return Ok(status::BAD_ARGUMENT) };
        *st!(map_for_write(c.data_mut(), t)) = new;
        Ok(status::OK)
    });
    // [spec] proxy_get_header_map_value(type, key, key_size, return_value, return_size):
    // the first value of the (lowercased) key; NOT_FOUND when absent ([envoy]
    // `Context::getHeaderMapValue`).
    env!("proxy_get_header_map_value", |mut c: C, t: i32, kp: i32, kl: i32, ret_ptr: i32, ret_len: i32| -> Result<i32> {
        let key = st!(read(&mut c, kp, kl).and_then(key_string));
        let value = st!(map_mut(c.data_mut(), t)).iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
        match value {
            Some(v) => give(&mut c, &v, ret_ptr, ret_len),
            None => Ok(status::NOT_FOUND),
        }
    });
    // [spec] proxy_replace_header_map_value: sets the key to one value (Envoy `setCopy`).
    env!("proxy_replace_header_map_value", |mut c: C, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let key = st!(read(&mut c, kp, kl).and_then(key_string));
        let value = st!(read(&mut c, vp, vl));
        let map = st!(map_for_write(c.data_mut(), t));
        match map.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                map[i].1 = value;
                let mut n = 0;
                map.retain(|(k, _)| *k != key || { n += 1; n == 1 });
            }
            None => map.push((key, value)),
        }
        Ok(status::OK)
    });
    // [spec] proxy_remove_header_map_value: removes every value of the key.
    env!("proxy_remove_header_map_value", |mut c: C, t: i32, kp: i32, kl: i32| -> Result<i32> {
        let key = st!(read(&mut c, kp, kl).and_then(key_string));
        st!(map_for_write(c.data_mut(), t)).retain(|(k, _)| *k != key);
        Ok(status::OK)
    });
    // [spec] proxy_add_header_map_value: appends a value.
    env!("proxy_add_header_map_value", |mut c: C, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let key = st!(read(&mut c, kp, kl).and_then(key_string));
        let value = st!(read(&mut c, vp, vl));
        st!(map_for_write(c.data_mut(), t)).push((key, value));
        Ok(status::OK)
    });

    // [spec] proxy_get_property(path, path_size, return_value, return_size): path parts
    // joined by NUL; NOT_FOUND for unknown attributes ([envoy] attributes reference).
    env!("proxy_get_property", |mut c: C, pp: i32, pl: i32, ret_ptr: i32, ret_len: i32| -> Result<i32> {
        let name = abi::property_name(&st!(read(&mut c, pp, pl)));
        match property(c.data_mut(), &name) {
            Some(v) => give(&mut c, &v, ret_ptr, ret_len),
            None => Ok(status::NOT_FOUND),
        }
    });
    // [spec] proxy_set_property: Envoy stores it as filter state of the stream.
    env!("proxy_set_property", |mut c: C, pp: i32, pl: i32, vp: i32, vl: i32| -> Result<i32> {
        let name = abi::property_name(&st!(read(&mut c, pp, pl)));
        let value = st!(read(&mut c, vp, vl));
        match c.data_mut().stream() {
            Some(st) => {
                st.properties.insert(name, value);
                Ok(status::OK)
            }
            None => Ok(status::NOT_FOUND),
        }
    });

    // [spec] proxy_get_shared_data(key, key_size, return_value, return_size, return_cas);
    // [sdk] accepts OK and NOT_FOUND only.
    env!("proxy_get_shared_data", |mut c: C, kp: i32, kl: i32, ret_ptr: i32, ret_len: i32, ret_cas: i32| -> Result<i32> {
        let key = String::from_utf8_lossy(&st!(read(&mut c, kp, kl))).into_owned();
        let found = c.data().shared.get(&c.data().vm_id, &key);
        let Some((value, cas)) = found else { return Ok(status::NOT_FOUND) };
        st!(write(&mut c, ret_cas, &cas.to_le_bytes()).map(|_| 0));
        give(&mut c, &value, ret_ptr, ret_len)
    });
    // [spec] proxy_set_shared_data(key, key_size, value, value_size, cas); [sdk] accepts
    // OK and CAS_MISMATCH only.
    env!("proxy_set_shared_data", |mut c: C, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
        let key = String::from_utf8_lossy(&st!(read(&mut c, kp, kl))).into_owned();
        let value = st!(read(&mut c, vp, vl));
        Ok(match c.data().shared.set(&c.data().vm_id, &key, &value, cas as u32) {
            SetResult::Ok => status::OK,
            SetResult::CasMismatch => status::CAS_MISMATCH,
        })
    });

    // [spec] proxy_continue_stream(stream_type): resume a paused request or response
    // ([envoy] `Context::continueStream` → `continueDecoding` / `continueEncoding`).
    env!("proxy_continue_stream", |mut c: C, t: i32| -> Result<i32> {
        let Some(st) = c.data_mut().stream() else { return Ok(status::NOT_FOUND) };
        match t {
            abi::stream_type::HTTP_REQUEST => st.resume_request = true,
            abi::stream_type::HTTP_RESPONSE => st.resume_response = true,
            _ => return Ok(status::BAD_ARGUMENT),
        }
        Ok(status::OK)
    });
    // [spec] proxy_close_stream(stream_type): Envoy resets the stream.
    env!("proxy_close_stream", |mut c: C, _t: i32| -> Result<i32> {
        let Some(st) = c.data_mut().stream() else { return Ok(status::NOT_FOUND) };
        st.reset = true;
        Ok(status::OK)
    });
    // [spec] proxy_send_local_response(status, details, details_size, body, body_size,
    // headers, headers_size, grpc_status): recorded and applied by the driver after the
    // callback returns ([envoy] `Context::sendLocalResponse`).
    env!(
        "proxy_send_local_response",
        |mut c: C, code: i32, dp: i32, dl: i32, bp: i32, bl: i32, hp: i32, hl: i32, _grpc: i32| -> Result<i32> {
            let details = String::from_utf8_lossy(&st!(read(&mut c, dp, dl))).into_owned();
            let body = st!(read(&mut c, bp, bl));
            let Some(headers) = abi::deserialize_map(&st!(read(&mut c, hp, hl))) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(st) = c.data_mut().stream() else { return Ok(status::NOT_FOUND) };
            st.local_reply = Some(LocalReply { status: code as u16, details, headers, body });
            Ok(status::OK)
        }
    );
    // [spec] proxy_http_call(upstream, upstream_size, headers, headers_size, body,
    // body_size, trailers, trailers_size, timeout_ms, return_token). [envoy]
    // `Context::httpCall`: BAD_ARGUMENT for an unknown cluster or when `:method`, `:path`
    // or `:authority` is missing; the call is asynchronous and answered through
    // `proxy_on_http_call_response`.
    env!(
        "proxy_http_call",
        |mut c: C, up: i32, ul: i32, hp: i32, hl: i32, bp: i32, bl: i32, _tp: i32, _tl: i32, timeout: i32, ret: i32| -> Result<i32> {
            let cluster = String::from_utf8_lossy(&st!(read(&mut c, up, ul))).into_owned();
            let Some(headers) = abi::deserialize_map(&st!(read(&mut c, hp, hl))) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let body = st!(read(&mut c, bp, bl));
            let has = |n: &str| headers.iter().any(|(k, v)| k == n && !v.is_empty());
            if !c.data().clusters.contains(&cluster) || !has(":method") || !has(":path") || !has(":authority") {
                return Ok(status::BAD_ARGUMENT);
            }
            let s = c.data_mut();
            s.next_token += 1;
            let token = s.next_token;
            let call = HttpCall {
                token,
                context_id: s.effective_context,
                cluster,
                headers,
                body,
                timeout: std::time::Duration::from_millis(timeout as u32 as u64),
            };
            s.pending_calls.push(call);
            Ok(status_of(write(&mut c, ret, &token.to_le_bytes())))
        }
    );
    // [spec] proxy_set_effective_context(context_id): BAD_ARGUMENT for an unknown context.
    env!("proxy_set_effective_context", |mut c: C, id: i32| -> Result<i32> {
        let id = id as u32;
        let s = c.data_mut();
        if id != s.root_context_id && !s.streams.contains_key(&id) {
            return Ok(status::BAD_ARGUMENT);
        }
        s.effective_context = id;
        Ok(status::OK)
    });
    // [spec] proxy_call_foreign_function(name, name_size, args, args_size, return_results,
    // return_size). Envoy ≥ 1.33 registers `clear_route_cache` ([envoy] `foreign.cc`);
    // unknown names are NOT_FOUND.
    env!("proxy_call_foreign_function", |mut c: C, np: i32, nl: i32, _ap: i32, _al: i32, _rp: i32, _rl: i32| -> Result<i32> {
        let name = st!(read(&mut c, np, nl));
        if name != b"clear_route_cache" {
            return Ok(status::NOT_FOUND);
        }
        match c.data_mut().stream() {
            Some(st) => {
                st.route_cache_cleared = true;
                Ok(status::OK)
            }
            None => Ok(status::NOT_FOUND),
        }
    });
    // [spec] proxy_done(): acknowledges a deferred on_done; nothing to do here.
    env!("proxy_done", |_c: C| -> Result<i32> { Ok(status::OK) });

    // [spec] proxy_define_metric(type, name, name_size, return_id): counter 0, gauge 1,
    // histogram 2.
    env!("proxy_define_metric", |mut c: C, t: i32, np: i32, nl: i32, ret: i32| -> Result<i32> {
        if !(0..=2).contains(&t) {
            return Ok(status::BAD_ARGUMENT);
        }
        let name = String::from_utf8_lossy(&st!(read(&mut c, np, nl))).into_owned();
        let id = c.data().metrics.define(&name);
        Ok(status_of(write(&mut c, ret, &id.to_le_bytes())))
    });
    // [spec] proxy_get_metric(id, return_value u64).
    env!("proxy_get_metric", |mut c: C, id: i32, ret: i32| -> Result<i32> {
        let Some(v) = c.data().metrics.get(id as u32) else { return Ok(status::NOT_FOUND) };
        Ok(status_of(write(&mut c, ret, &(v as u64).to_le_bytes())))
    });
    // [spec] proxy_record_metric(id, value).
    env!("proxy_record_metric", |c: C, id: i32, value: i64| -> Result<i32> {
        Ok(if c.data().metrics.update(id as u32, |v| *v = value) { status::OK } else { status::NOT_FOUND })
    });
    // [spec] proxy_increment_metric(id, offset).
    env!("proxy_increment_metric", |c: C, id: i32, offset: i64| -> Result<i32> {
        Ok(if c.data().metrics.update(id as u32, |v| *v += offset) { status::OK } else { status::NOT_FOUND })
    });

    // WASI (wasi_snapshot_preview1) used by Rust's std on wasm32-wasip1. Envoy implements
    // these in proxy-wasm-cpp-host `src/exports.cc` (`wasi_unstable_fd_write` logs stdout
    // at info and stderr at error; `environ_get` serves `vm_config.environment_variables`).
    wasi!("fd_write", |mut c: C, fd: i32, iovs: i32, n: i32, ret: i32| -> Result<i32> {
        let mut out = Vec::new();
        for i in 0..n {
            let Ok(iov) = read(&mut c, iovs + i * 8, 8) else { return Ok(21) }; // EFAULT
            let ptr = i32::from_le_bytes(iov[0..4].try_into().unwrap());
            let len = i32::from_le_bytes(iov[4..8].try_into().unwrap());
            let Ok(bytes) = read(&mut c, ptr, len) else { return Ok(21) };
            out.extend_from_slice(&bytes);
        }
        let written = out.len() as u32;
        let message = String::from_utf8_lossy(&out).trim_end().to_string();
        if !message.is_empty() {
            if c.data().echo_logs {
                tracing::info!(target: "wasm", fd, "{message}");
            }
            c.data_mut().logs.push(LogLine { level: if fd == 2 { 4 } else { 2 }, message });
        }
        let _ = write(&mut c, ret, &written.to_le_bytes());
        Ok(0)
    });
    wasi!("environ_sizes_get", |mut c: C, count_ptr: i32, size_ptr: i32| -> Result<i32> {
        let env = &c.data().env;
        let count = env.len() as u32;
        let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let ok = write(&mut c, count_ptr, &count.to_le_bytes()).and_then(|_| write(&mut c, size_ptr, &(size as u32).to_le_bytes()));
        Ok(if ok.is_ok() { 0 } else { 21 })
    });
    wasi!("environ_get", |mut c: C, ptrs: i32, buf: i32| -> Result<i32> {
        let env = c.data().env.clone();
        let mut at = buf;
        for (i, (k, v)) in env.iter().enumerate() {
            let entry = format!("{k}={v}\0");
            if write(&mut c, ptrs + 4 * i as i32, &(at as u32).to_le_bytes()).is_err() || write(&mut c, at, entry.as_bytes()).is_err() {
                return Ok(21);
            }
            at += entry.len() as i32;
        }
        Ok(0)
    });
    wasi!("proc_exit", |_c: C, code: i32| -> Result<()> { Err(anyhow!("guest called proc_exit({code})")) });

    // Everything else the module imports: UNIMPLEMENTED / ENOSYS stubs.
    for import in module.imports() {
        let key = (import.module().to_string(), import.name().to_string());
        if defined.contains(&key) {
            continue;
        }
        let Some(ty) = import.ty().func().cloned() else {
            anyhow::bail!("unsupported non-function import {}.{}", key.0, key.1);
        };
        let code = if key.0 == "env" { status::UNIMPLEMENTED } else { 52 /* ENOSYS */ };
        let result_types: Vec<ValType> = ty.results().collect();
        linker.func_new(&key.0, &key.1, ty, move |_c, _args, results| {
            for (r, t) in results.iter_mut().zip(&result_types) {
                *r = match t {
                    ValType::I64 => Val::I64(code.into()),
                    _ => Val::I32(code),
                };
            }
            Ok(())
        })?;
    }
    Ok(())
}
