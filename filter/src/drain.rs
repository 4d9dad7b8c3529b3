//! Upstream hosts that are draining (a pod about to stop in a rolling update): the list
//! control keeps (`GET {prefix}/upstreams/draining`), shared by every worker VM of one
//! Envoy through one shared-data key, and each VM's copy of it.
//!
//! No request waits for this list and no request reads shared data for it: the root
//! context of each VM adopts the shared value on its tick ([`Draining::refresh`], one
//! `proxy_get_shared_data`), and the streams only look at the VM's copy (a hash-set
//! lookup, skipped while nothing drains). One VM per Envoy polls control per interval:
//! the VM whose tick finds the list due claims the poll with a CAS write of the fetch
//! time ([`claim_poll`]); the others see the claim and wait. The answer is written back
//! for all ([`store_answer`]) under the time of the claim it answers, and only while no
//! later claim exists: a slow answer never overwrites a newer list.
//!
//! Shared-data value of [`KEY`] (text): first line the fetch time in Unix milliseconds,
//! then one draining upstream (`ip:port`, as Envoy's `upstream.address`) per line, then
//! one serving upstream per line prefixed with `+` (control's `serving`: where new work
//! goes while something drains, [`Draining::steer`]).
//!
//! When control cannot be reached the last list stays in force (a drain is not undone by
//! an outage) and the next poll comes one interval later.

use hashbrown::HashSet;
use mcp_affinity_proto::draining::DrainingList;

use crate::store::SharedData;

/// Shared-data key of the draining list.
pub const KEY: &str = "mcp-affinity/draining";

/// Most upstreams accepted in one list (a larger answer is rejected as malformed).
pub const MAX_UPSTREAMS: usize = 4096;

/// Longest upstream address accepted (`[IPv6%zone]:port` fits).
const MAX_UPSTREAM_LEN: usize = 128;

/// The draining upstreams as one VM knows them.
#[derive(Debug, Default)]
pub struct Draining {
    upstreams: HashSet<String>,
    /// The upstreams that do not drain (control's `serving`), for new work.
    serving: Vec<String>,
    /// Rotation over `serving`.
    turn: usize,
    /// CAS number of the shared-data value adopted last (`None`: nothing adopted yet).
    cas: Option<u32>,
}

/// Control's draining list as the filter keeps it: both sorted and deduplicated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upstreams {
    pub draining: Vec<String>,
    pub serving: Vec<String>,
}

impl Draining {
    /// Whether `upstream` is draining. Free while nothing drains.
    pub fn contains(&self, upstream: &str) -> bool {
        !self.upstreams.is_empty() && self.upstreams.contains(upstream)
    }

    /// Whether nothing drains.
    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Where new work goes while something drains — a serving upstream, in rotation — so
    /// that a draining pod gets none (it would hold a new task or listen stream when it
    /// stops). `None` while nothing drains (Envoy balances as usual, and this costs one
    /// branch) or when control named no serving upstream.
    pub fn steer(&mut self) -> Option<&str> {
        if self.upstreams.is_empty() || self.serving.is_empty() {
            return None;
        }
        self.turn = self.turn.wrapping_add(1);
        Some(&self.serving[self.turn % self.serving.len()])
    }

    /// Adopts the shared-data list when it changed since the last adoption (one
    /// `proxy_get_shared_data`). Returns true when the set of draining upstreams changed.
    pub fn refresh(&mut self, shared: &dyn SharedData) -> bool {
        let Some((value, cas)) = shared.get(KEY) else { return false };
        if cas.is_some() && cas == self.cas {
            return false;
        }
        self.cas = cas;
        let Some(entry) = decode(&value) else {
            log::warn!("mcp-affinity: undecodable draining list in shared data; keeping the last one");
            return false;
        };
        if entry.serving != self.serving {
            self.serving = entry.serving.iter().map(|u| (*u).to_string()).collect();
        }
        let next: HashSet<String> = entry.upstreams.iter().map(|u| (*u).to_string()).collect();
        if next == self.upstreams {
            return false;
        }
        log::info!("mcp-affinity: draining upstreams now {:?}", entry.upstreams);
        self.upstreams = next;
        true
    }
}

/// A decoded shared-data value.
#[derive(Debug, PartialEq, Eq)]
struct Entry<'a> {
    fetched_at_ms: u64,
    upstreams: Vec<&'a str>,
    serving: Vec<&'a str>,
}

fn decode(value: &[u8]) -> Option<Entry<'_>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut lines = text.split('\n');
    let fetched_at_ms = lines.next()?.parse().ok()?;
    let (mut upstreams, mut serving) = (Vec::new(), Vec::new());
    for line in lines.filter(|l| !l.is_empty()) {
        match line.strip_prefix('+') {
            Some(u) => serving.push(u),
            None => upstreams.push(line),
        }
    }
    Some(Entry { fetched_at_ms, upstreams, serving })
}

fn encode<S: AsRef<str>>(fetched_at_ms: u64, upstreams: &[S], serving: &[S]) -> Vec<u8> {
    let mut out = fetched_at_ms.to_string().into_bytes();
    for u in upstreams {
        out.push(b'\n');
        out.extend_from_slice(u.as_ref().as_bytes());
    }
    for u in serving {
        out.extend_from_slice(b"\n+");
        out.extend_from_slice(u.as_ref().as_bytes());
    }
    out
}

/// Claims this interval's poll of control for the calling VM: true when the list is
/// missing or was fetched `interval_ms` or more before `now_ms` and this VM won the CAS
/// write of the new fetch time (the list itself is kept). False: not due, or another VM
/// claimed it first.
pub fn claim_poll(shared: &mut dyn SharedData, now_ms: u64, interval_ms: u64) -> bool {
    let current = shared.get(KEY);
    let (value, cas) = match &current {
        Some((value, cas)) => match decode(value) {
            Some(e) if e.fetched_at_ms.saturating_add(interval_ms) > now_ms => return false,
            Some(e) => (encode(now_ms, &e.upstreams, &e.serving), *cas),
            None => (encode::<&str>(now_ms, &[], &[]), *cas),
        },
        None => (encode::<&str>(now_ms, &[], &[]), None),
    };
    // A missing key is created with CAS 0 semantics by the host only once: two VMs racing
    // on the first write may both win; that costs one extra poll, never a wrong list.
    shared.set(KEY, &value, cas)
}

/// Stores control's list for every VM, as fetched by the poll claimed at `claimed_at_ms`
/// ([`claim_poll`]). A later claim in shared data means a newer fetch (under load an
/// answer can come after the next interval's): this answer is then stale and dropped
/// (false), so the list never goes back to an older state. Compare-and-set; false too when
/// the host refused.
pub fn store_answer(shared: &mut dyn SharedData, claimed_at_ms: u64, answer: &Upstreams) -> bool {
    let value = encode(claimed_at_ms, &answer.draining, &answer.serving);
    for _ in 0..4 {
        let cas = match shared.get(KEY) {
            Some((current, cas)) => match decode(&current) {
                Some(e) if e.fetched_at_ms > claimed_at_ms => return false,
                _ => cas,
            },
            None => None,
        };
        if shared.set(KEY, &value, cas) {
            return true;
        }
    }
    false
}

/// Parses control's `GET {prefix}/upstreams/draining` answer ([`DrainingList`]) into the
/// sorted, deduplicated draining and serving upstream hosts.
///
/// # Errors
/// A message when the body is not that shape, either list holds more than
/// [`MAX_UPSTREAMS`] entries, or an upstream is empty, longer than 128 bytes, not
/// visible ASCII or starts with `+`.
pub fn parse_answer(body: &[u8]) -> Result<Upstreams, String> {
    let a: DrainingList = serde_json::from_slice(body).map_err(|e| format!("draining list: {e}"))?;
    Ok(Upstreams { draining: checked(a.draining.into_iter().map(|d| d.upstream).collect())?, serving: checked(a.serving)? })
}

fn checked(mut list: Vec<String>) -> Result<Vec<String>, String> {
    if list.len() > MAX_UPSTREAMS {
        return Err(format!("draining list: {} upstreams, at most {MAX_UPSTREAMS} accepted", list.len()));
    }
    if let Some(bad) = list.iter().find(|u| u.is_empty() || u.len() > MAX_UPSTREAM_LEN || u.starts_with('+') || !u.bytes().all(|b| (0x21..=0x7e).contains(&b))) {
        return Err(format!("draining list: invalid upstream {bad:?}"));
    }
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Shared data with proxy-wasm-cpp-host's CAS rule: a write with a CAS number other
    /// than the current one fails; every write bumps it.
    #[derive(Default)]
    struct Host(HashMap<String, (Vec<u8>, u32)>);

    impl SharedData for Host {
        fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
            self.0.get(key).map(|(v, cas)| (v.clone(), Some(*cas)))
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            let next = match (self.0.get(key), cas) {
                (Some((_, current)), Some(c)) if c != 0 && c != *current => return false,
                (Some((_, current)), _) => current + 1,
                (None, _) => 1,
            };
            self.0.insert(key.to_string(), (value.to_vec(), next));
            true
        }
    }

    fn list(draining: &[&str]) -> Upstreams {
        Upstreams { draining: draining.iter().map(|u| u.to_string()).collect(), serving: Vec::new() }
    }

    /// New work goes to the serving upstreams in turn while something drains; a claim keeps
    /// them; nothing is steered while nothing drains or nothing serves.
    #[test]
    fn new_work_is_steered_to_serving_upstreams_while_something_drains() {
        let mut host = Host::default();
        let mut d = Draining::default();
        let serving = vec!["10.0.0.3:80".to_string(), "10.0.0.4:80".to_string()];
        store_answer(&mut host, 1, &Upstreams { draining: Vec::new(), serving: serving.clone() });
        d.refresh(&host);
        assert_eq!(d.steer(), None, "nothing drains: Envoy balances");
        store_answer(&mut host, 2, &Upstreams { draining: vec!["10.0.0.2:80".into()], serving });
        assert!(claim_poll(&mut host, 5_000, 1000));
        assert!(d.refresh(&host));
        let picks: Vec<String> = (0..4).map(|_| d.steer().unwrap().to_string()).collect();
        assert_eq!(picks, ["10.0.0.4:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.3:80"]);
        store_answer(&mut host, 5_000, &list(&["10.0.0.2:80"]));
        assert!(!d.refresh(&host), "the draining set did not change");
        assert_eq!(d.steer(), None, "no serving upstream named: Envoy balances");
    }

    #[test]
    fn one_vm_claims_each_interval() {
        let mut host = Host::default();
        assert!(claim_poll(&mut host, 10_000, 1000), "no list yet: due");
        assert!(!claim_poll(&mut host, 10_000, 1000), "claimed by the first VM");
        assert!(!claim_poll(&mut host, 10_999, 1000));
        assert!(claim_poll(&mut host, 11_000, 1000));
        // Two VMs that read the same value: the second CAS write fails.
        let (value, cas) = host.get(KEY).unwrap();
        assert!(decode(&value).is_some());
        assert!(host.set(KEY, &encode::<&str>(12_000, &[], &[]), cas));
        assert!(!host.set(KEY, &encode::<&str>(12_000, &[], &[]), cas), "stale CAS loses");
    }

    #[test]
    fn claims_keep_the_list_and_vms_adopt_changes_once() {
        let mut host = Host::default();
        let (mut a, mut b) = (Draining::default(), Draining::default());
        assert!(!a.refresh(&host), "nothing in shared data");
        assert!(store_answer(&mut host, 5_000, &list(&["10.0.0.2:8080", "10.0.0.3:8080"])));
        assert!(a.refresh(&host) && b.refresh(&host));
        assert!(a.contains("10.0.0.2:8080") && !a.contains("10.0.0.4:8080"));
        assert!(!a.refresh(&host), "same CAS: nothing to adopt");
        assert!(claim_poll(&mut host, 6_000, 1000));
        assert!(!a.refresh(&host), "a claim changes the CAS but not the list");
        assert!(a.contains("10.0.0.3:8080"));
        assert!(store_answer(&mut host, 6_100, &list(&[])));
        assert!(b.refresh(&host) && b.is_empty() && !b.contains("10.0.0.2:8080"));
    }

    /// A poll's answer that comes after a later poll was claimed (a slow control, a loaded
    /// Envoy) is stale: it never replaces the newer list. Seen on Envoy 1.40 with two
    /// workers: the list went [pod] → [] → [pod] and a request of the draining pod's
    /// session was not moved.
    #[test]
    fn a_stale_answer_never_replaces_a_newer_list() {
        let mut host = Host::default();
        assert!(claim_poll(&mut host, 10_000, 1000), "VM A claims");
        assert!(claim_poll(&mut host, 11_000, 1000), "A's answer is slow: VM B claims the next interval");
        assert!(store_answer(&mut host, 11_000, &list(&["10.0.0.2:8080"])), "B's answer");
        assert!(!store_answer(&mut host, 10_000, &list(&[])), "A's older answer is dropped");
        let mut d = Draining::default();
        assert!(d.refresh(&host) && d.contains("10.0.0.2:8080"));
        assert!(!claim_poll(&mut host, 11_999, 1000), "the next poll is due one interval after B's claim");
    }

    #[test]
    fn garbage_in_shared_data_keeps_the_last_list() {
        let mut host = Host::default();
        let mut d = Draining::default();
        store_answer(&mut host, 1, &list(&["10.0.0.2:80"]));
        assert!(d.refresh(&host));
        host.set(KEY, b"not a number\nx", None);
        assert!(!d.refresh(&host));
        assert!(d.contains("10.0.0.2:80"));
        assert!(claim_poll(&mut host, 5, 1000), "an undecodable value is due for a poll");
    }

    /// One element of control's list, as control writes it.
    fn entry(upstream: &str) -> String {
        format!(r#"{{"upstream":"{upstream}","since_ms":1,"source":"admin","moved":0,"failed":0,"last_move_ms":null}}"#)
    }

    #[test]
    fn answers() {
        let body = format!(r#"{{"draining":[{},{},{}]}}"#, entry("10.0.0.3:8080"), entry("10.0.0.2:8080"), entry("10.0.0.3:8080"));
        assert_eq!(parse_answer(body.as_bytes()).unwrap().draining, ["10.0.0.2:8080", "10.0.0.3:8080"]);
        assert_eq!(parse_answer(br#"{"draining":[]}"#).unwrap(), Upstreams::default());
        let with_serving = format!(r#"{{"draining":[{}],"serving":["10.0.0.9:80","10.0.0.8:80"]}}"#, entry("10.0.0.3:8080"));
        assert_eq!(parse_answer(with_serving.as_bytes()).unwrap().serving, ["10.0.0.8:80", "10.0.0.9:80"]);
        assert!(parse_answer(br#"{"draining":[],"serving":["+1.1.1.1:1"]}"#).is_err(), "would read back as a serving line");
        let (empty, spaced) = (format!(r#"{{"draining":[{}]}}"#, entry("")), format!(r#"{{"draining":[{}]}}"#, entry("a b")));
        for bad in [&b"{}"[..], b"[]", b"not json", br#"{"draining":[{"upstream":"10.0.0.2:80"}]}"#, empty.as_bytes(), spaced.as_bytes()] {
            assert!(parse_answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let many = format!("{{\"draining\":[{}]}}", vec![entry("1.1.1.1:1"); MAX_UPSTREAMS + 1].join(","));
        assert!(parse_answer(many.as_bytes()).unwrap_err().contains("at most"));
    }
}
