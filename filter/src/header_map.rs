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
    /// Takes a buffer the host serialised. An empty buffer is an empty map. Checks that the
    /// size table accounts for the buffer exactly (one pass over the sizes, no look at the
    /// names); the terminators are checked as entries are read ([`HeaderPairs::get`],
    /// [`HeaderPairs::find`]).
    ///
    /// # Errors
    /// [`MalformedHeaderMap`] when the sizes do not add up to the buffer's length.
    pub fn parse(buf: Vec<u8>) -> Result<HeaderPairs, MalformedHeaderMap> {
        if !buf.is_empty() {
            let pairs = Pairs::new(&buf).ok_or(MalformedHeaderMap)?;
            let mut end = pairs.data;
            for i in 0..pairs.count {
                let at = 4 + i * 8;
                let (k, v) = (u32_at(&buf, at).ok_or(MalformedHeaderMap)?, u32_at(&buf, at + 4).ok_or(MalformedHeaderMap)?);
                end = end.checked_add(k + v + 2).ok_or(MalformedHeaderMap)?;
            }
            if end != buf.len() {
                return Err(MalformedHeaderMap);
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
        let [value] = self.find([name]);
        value
    }

    /// The first values of several headers (exact, lowercase names) in one pass over the
    /// map, in the order of `names`. A malformed entry ends the walk (later headers read as
    /// absent).
    pub fn find<const N: usize>(&self, names: [&str; N]) -> [Option<&[u8]>; N] {
        let mut found = [None; N];
        let Some(mut pairs) = Pairs::new(&self.buf) else { return found };
        let mut missing = N;
        for _ in 0..pairs.count {
            let Some((k, v)) = pairs.next_checked() else { break };
            for (slot, name) in found.iter_mut().zip(names) {
                if slot.is_none() && k == name.as_bytes() {
                    *slot = Some(v);
                    missing -= 1;
                }
            }
            if missing == 0 {
                break;
            }
        }
        found
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
        assert_eq!(h.find(["empty", ":method", "missing", "accept"]), [Some(&b""[..]), Some(&b"POST"[..]), None, Some(&b"a"[..])]);
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
        // Sizes that add up but a missing terminator: the entry is never read.
        let mut unterminated = HeaderPairs::from_pairs(&[("a", "b"), ("c", "d")]).buf;
        let at = unterminated.len() - 5; // the byte after the first value
        unterminated[at] = b'x';
        let h = HeaderPairs::parse(unterminated).unwrap();
        assert_eq!(h.find(["a", "c"]), [None, None]);
    }
}
