//! A pin: which upstream host serves an MCP session, as kept in Envoy shared data, and how
//! it is written into the routing header.
//!
//! Shared data (proxy-wasm ABI v0.2.1 `proxy_get_shared_data` / `proxy_set_shared_data`)
//! stores bytes per key, process-wide, with a CAS number and no TTL and no delete
//! (proxy-wasm-cpp-host `src/shared_data.cc`). So a pin carries its own last-seen time and
//! a forgotten session is overwritten with an empty value (a tombstone).
//!
//! Value format, version 1 (ASCII, space separated; a session id has no spaces):
//! `1 <upstream ip:port> <generation> <last_seen unix seconds> <flags> <backend session id>`,
//! where flags is `r` once the session's `notifications/initialized` has been recorded
//! with the control service (or the session is past that point), else `-`.
//! Pins are kept in shared-data buckets ([`crate::store`]), one line per session: the
//! client's id, a space, this value — about 60 + 2 × id bytes (130 for a UUID id).

use base64::Engine as _;

/// Where a session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The upstream host (`ip:port`, as Envoy's `upstream.address` property gives it).
    pub upstream: String,
    /// Grows each time the session is re-pinned (by recovery); starts at 1.
    pub generation: u64,
    /// Last time a request used the pin (Unix seconds); drives idle expiry.
    pub last_seen: u64,
    /// The session id the upstream knows. Equals the client's id until a recovery
    /// re-initialises the session on another pod.
    pub backend_session_id: String,
    /// True once the session is past its `notifications/initialized` (recorded with the
    /// control service); until then the filter looks at request bodies for it.
    pub recorded: bool,
}

/// Why stored bytes are not a pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Empty value: the session was forgotten.
    Tombstone,
    /// Bytes of another shape or version.
    Invalid,
}

impl Pin {
    /// Serialises to the version-1 value format described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the version-1 value to `out`, without the formatting machinery: a pin is
    /// written on every `initialize` and every refresh of its last-seen time.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut digits = [0; MAX_DECIMAL];
        out.reserve(self.upstream.len() + self.backend_session_id.len() + 2 * MAX_DECIMAL + 8);
        out.extend_from_slice(b"1 ");
        out.extend_from_slice(self.upstream.as_bytes());
        out.push(b' ');
        out.extend_from_slice(to_decimal(self.generation, &mut digits));
        out.push(b' ');
        out.extend_from_slice(to_decimal(self.last_seen, &mut digits));
        out.extend_from_slice(if self.recorded { b" r " } else { b" - " });
        out.extend_from_slice(self.backend_session_id.as_bytes());
    }

    /// Parses a shared-data value (one pass over the bytes; read on every request).
    pub fn decode(bytes: &[u8]) -> Result<Pin, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Tombstone);
        }
        let mut fields = bytes.split(|b| *b == b' ');
        let (Some(b"1"), Some(upstream), Some(generation), Some(last_seen), Some(flags), Some(backend), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(DecodeError::Invalid);
        };
        let recorded = match flags {
            b"r" => true,
            b"-" => false,
            _ => return Err(DecodeError::Invalid),
        };
        let text = |b: &[u8]| std::str::from_utf8(b).ok().filter(|t| !t.is_empty()).map(str::to_string).ok_or(DecodeError::Invalid);
        Ok(Pin {
            generation: decimal(generation).ok_or(DecodeError::Invalid)?,
            last_seen: decimal(last_seen).ok_or(DecodeError::Invalid)?,
            upstream: text(upstream)?,
            backend_session_id: text(backend)?,
            recorded,
        })
    }

    /// True when the pin has been idle for `ttl_secs` or more at time `now` (Unix seconds).
    pub fn is_expired(&self, now: u64, ttl_secs: u64) -> bool {
        now.saturating_sub(self.last_seen) >= ttl_secs
    }

    /// True when `last_seen` is at least `interval_secs` old, i.e. a refresh is due.
    /// Refreshing at most once per interval keeps shared-data writes off most requests.
    pub fn needs_touch(&self, now: u64, interval_secs: u64) -> bool {
        now.saturating_sub(self.last_seen) >= interval_secs
    }
}

/// Most decimal digits of a `u64`.
pub const MAX_DECIMAL: usize = 20;

/// `n` in decimal ASCII, written at the end of `buf`; returns the digits.
pub fn to_decimal(n: u64, buf: &mut [u8; MAX_DECIMAL]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            return &buf[at..];
        }
    }
}

/// An unsigned decimal (digits only, no sign), `None` when empty, not digits or over `u64`.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let d = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// How the pinned upstream host is written into the routing header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinEncoding {
    /// `ip:port` as is: what an `ORIGINAL_DST` cluster with `use_http_header: true` reads
    /// (Envoy docs, "Original destination" cluster, `original_dst_lb_config`).
    #[default]
    Plain,
    /// Standard base64 of `ip:port`: what Envoy's stateful-session header extension
    /// (`envoy.http.stateful_session.header`) and Istio persistent sessions read.
    Base64,
}

impl PinEncoding {
    /// The routing-header value for `upstream`.
    pub fn header_value(self, upstream: &str) -> String {
        match self {
            PinEncoding::Plain => upstream.to_string(),
            PinEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(upstream),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin() -> Pin {
        Pin { upstream: "10.0.0.7:8080".into(), generation: 3, last_seen: 1_700_000_000, backend_session_id: "b-1".into(), recorded: true }
    }

    #[test]
    fn round_trips() {
        let p = pin();
        assert_eq!(p.encode(), b"1 10.0.0.7:8080 3 1700000000 r b-1");
        assert_eq!(Pin::decode(&p.encode()), Ok(p.clone()));
        let fresh = Pin { recorded: false, ..p };
        assert_eq!(Pin::decode(&fresh.encode()), Ok(fresh));
    }

    #[test]
    fn decimals_round_trip_at_the_edges() {
        let mut buf = [0; MAX_DECIMAL];
        for n in [0, 9, 10, 1_700_000_000, u64::MAX] {
            assert_eq!(to_decimal(n, &mut buf), n.to_string().as_bytes());
            assert_eq!(decimal(&n.to_string().into_bytes()), Some(n));
        }
        let p = Pin { generation: u64::MAX, last_seen: 0, ..pin() };
        let mut out = b"kept ".to_vec();
        p.encode_into(&mut out);
        assert_eq!(out, format!("kept 1 10.0.0.7:8080 {} 0 r b-1", u64::MAX).into_bytes(), "appends");
        assert_eq!(Pin::decode(&out[5..]), Ok(p));
    }

    #[test]
    fn rejects_tombstones_and_garbage() {
        assert_eq!(Pin::decode(b""), Err(DecodeError::Tombstone));
        for bad in [&b"2 a 1 1 r b"[..], b"1 a 1 1 r", b"1 a x 1 r b", b"1 a 1 1 r b extra", b"1  1 1 r b", b"1 a 1 1 x b", b"\xff", b"1 a +1 1 r b", b"1 a 1 99999999999999999999 r b", b"1 \xff 1 1 r b"] {
            assert_eq!(Pin::decode(bad), Err(DecodeError::Invalid), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn expiry_and_touch() {
        let p = pin();
        assert!(!p.is_expired(1_700_000_099, 100));
        assert!(p.is_expired(1_700_000_100, 100));
        assert!(!p.is_expired(0, 100), "a clock behind the pin never expires it");
        assert!(!p.needs_touch(1_700_000_059, 60));
        assert!(p.needs_touch(1_700_000_060, 60));
    }

    #[test]
    fn header_encodings() {
        assert_eq!(PinEncoding::Plain.header_value("10.0.0.7:8080"), "10.0.0.7:8080");
        assert_eq!(PinEncoding::Base64.header_value("10.0.0.7:8080"), "MTAuMC4wLjc6ODA4MA==");
    }
}
