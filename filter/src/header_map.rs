//! A header map as the proxy-wasm ABI serialises it (`proxy_get_header_map_pairs`, ABI
//! v0.2.1): `u32` count; count × (`u32` name length, `u32` value length); then each
//! `name\0value\0`. All integers little-endian. Envoy gives names in lowercase.
//!
//! The filter reads the request headers with one host call into one buffer and looks
//! names up in it; the buffer is kept (moved, not copied) when a recovery may need the
//! request later, because Envoy forgets the request headers once their callback went on
//! (Envoy `source/extensions/common/wasm/context.cc`: `request_headers_` is cleared, and the
//! `request.*` attributes are read through that same pointer).

/// A serialised header map, validated on construction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderPairs {
    buf: Vec<u8>,
}

/// The bytes are not a well-formed serialised header map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedHeaderMap;

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize)
}

impl HeaderPairs {
    /// Takes a buffer the host serialised. An empty buffer is an empty map.
    ///
    /// # Errors
    /// [`MalformedHeaderMap`] when sizes do not add up or a terminator is missing.
    pub fn parse(buf: Vec<u8>) -> Result<HeaderPairs, MalformedHeaderMap> {
        if !buf.is_empty() {
            let mut check = Pairs::new(&buf).ok_or(MalformedHeaderMap)?;
            for _ in 0..check.count {
                check.next_checked().ok_or(MalformedHeaderMap)?;
            }
        }
        Ok(HeaderPairs { buf })
    }

    /// Serialises `pairs` (tests and tools).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> HeaderPairs {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            buf.extend_from_slice(k.as_bytes());
            buf.push(0);
            buf.extend_from_slice(v.as_bytes());
            buf.push(0);
        }
        HeaderPairs { buf }
    }

    /// The serialised bytes (as `proxy_send_local_response` takes them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The first value of header `name` (exact, lowercase), without copying.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let mut pairs = Pairs::new(&self.buf)?;
        (0..pairs.count).find_map(|_| {
            let (k, v) = pairs.next_checked()?;
            (k == name.as_bytes()).then_some(v)
        })
    }

    /// The value of `name` as UTF-8 text, copied.
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_string)
    }
}

/// A cursor over a serialised map.
struct Pairs<'a> {
    buf: &'a [u8],
    count: usize,
    /// Index of the next size entry.
    index: usize,
    /// Offset of the next name.
    data: usize,
}

impl<'a> Pairs<'a> {
    fn new(buf: &'a [u8]) -> Option<Pairs<'a>> {
        let count = u32_at(buf, 0)?;
        let data = count.checked_mul(8)?.checked_add(4)?;
        (data <= buf.len()).then_some(Pairs { buf, count, index: 0, data })
    }

    fn next_checked(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let at = 4 + self.index * 8;
        let (klen, vlen) = (u32_at(self.buf, at)?, u32_at(self.buf, at + 4)?);
        let k_end = self.data.checked_add(klen)?;
        let v_start = k_end + 1;
        let v_end = v_start.checked_add(vlen)?;
        if *self.buf.get(k_end)? != 0 || *self.buf.get(v_end)? != 0 {
            return None;
        }
        let pair = (&self.buf[self.data..k_end], &self.buf[v_start..v_end]);
        self.index += 1;
        self.data = v_end + 1;
        Some(pair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_finds_the_first_value() {
        let h = HeaderPairs::from_pairs(&[(":method", "POST"), ("accept", "a"), ("accept", "b"), ("empty", "")]);
        let h = HeaderPairs::parse(h.buf).unwrap();
        assert_eq!(h.get(":method"), Some(&b"POST"[..]));
        assert_eq!(h.get("accept"), Some(&b"a"[..]));
        assert_eq!(h.get("empty"), Some(&b""[..]));
        assert_eq!(h.get("missing"), None);
        assert_eq!(HeaderPairs::parse(Vec::new()).unwrap().get("x"), None);
    }

    #[test]
    fn malformed_maps_are_rejected_not_misread() {
        let good = HeaderPairs::from_pairs(&[("a", "b")]).buf;
        for bad in [good[..good.len() - 1].to_vec(), vec![9, 0, 0, 0], vec![1, 0], {
            let mut b = good.clone();
            b[4] = 200; // name length past the end
            b
        }] {
            assert_eq!(HeaderPairs::parse(bad), Err(MalformedHeaderMap));
        }
    }
}
