//! Constants and encodings of the proxy-wasm ABI v0.2.1.
//!
//! Sources: proxy-wasm spec `abi-versions/v0.2.1/README.md`; proxy-wasm-rust-sdk
//! `src/types.rs` (enum values) and `src/hostcalls.rs` (`utils::serialize_map`,
//! `deserialize_map`, `serialize_property_path`).

/// `proxy_status_t` values (spec v0.2.1, "Status codes"; SDK `types::Status`).
#[allow(missing_docs)]
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const SERIALIZATION_FAILURE: i32 = 3;
    pub const PARSE_FAILURE: i32 = 4;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
    pub const INTERNAL_FAILURE: i32 = 10;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// What a stream callback returned (SDK `types::Action`; Envoy's
/// `FilterHeadersStatus::Continue` / `StopIteration` family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on to the next filter / upstream.
    Continue,
    /// Stop iteration: headers are held, and a body callback that pauses buffers the body.
    Pause,
}

impl Action {
    /// Decodes the i32 a callback returned; anything but 0 stops iteration, as in Envoy
    /// (`source/extensions/common/wasm/context.cc`, `convertFilterHeadersStatus`).
    pub fn from_raw(raw: i32) -> Action {
        if raw == 0 { Action::Continue } else { Action::Pause }
    }
}

/// `proxy_map_type_t` (SDK `types::MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    /// Decodes a raw map type; gRPC metadata maps (4, 5) are not supported.
    pub fn from_raw(raw: i32) -> Option<MapType> {
        Some(match raw {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t` (SDK `types::BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    /// Decodes a raw buffer type; network-filter and gRPC buffers are not supported.
    pub fn from_raw(raw: i32) -> Option<BufferType> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t` for `proxy_continue_stream` / `proxy_close_stream`.
pub mod stream_type {
    pub const HTTP_REQUEST: i32 = 0;
    pub const HTTP_RESPONSE: i32 = 1;
}

/// A header map: lowercase names, byte values, in order (Envoy `HeaderMap`).
pub type Headers = Vec<(String, Vec<u8>)>;

/// Serialises a header map the way the SDK deserialises it: u32 count; count × (u32
/// key_len, u32 value_len); then each `key\0value\0` (all little-endian).
pub fn serialize_map(map: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialised header map (inverse of [`serialize_map`]). `None` on any
/// inconsistency (the host then answers BAD_ARGUMENT).
pub fn deserialize_map(bytes: &[u8]) -> Option<Headers> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(0)?;
    let mut sizes = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut map = Vec::with_capacity(sizes.len());
    for (klen, vlen) in sizes {
        let key = bytes.get(at..at + klen)?;
        at += klen + 1;
        let value = bytes.get(at..at + vlen)?;
        at += vlen + 1;
        map.push((String::from_utf8(key.to_vec()).ok()?.to_ascii_lowercase(), value.to_vec()));
    }
    Some(map)
}

/// A property path as the SDK sends it (parts joined by `\0`), as a dotted name
/// (`upstream\0address` → `upstream.address`).
pub fn property_name(path: &[u8]) -> String {
    String::from_utf8_lossy(path).trim_end_matches('\0').replace('\0', ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip() {
        let map: Headers = vec![(":path".into(), b"/mcp".to_vec()), ("x".into(), b"".to_vec())];
        let bytes = serialize_map(&map);
        assert_eq!(&bytes[..4], &2u32.to_le_bytes());
        assert_eq!(deserialize_map(&bytes), Some(map));
        assert_eq!(deserialize_map(&bytes[..bytes.len() - 2]), None);
    }

    #[test]
    fn property_names() {
        assert_eq!(property_name(b"upstream\0address"), "upstream.address");
        assert_eq!(property_name(b"plugin_name"), "plugin_name");
    }
}
