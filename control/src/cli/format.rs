//! What the operator commands print: records, drains, a metrics summary, times.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mcp_affinity_proto::draining::Drain;
use mcp_affinity_proto::sessions::SessionRecord;

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A duration for people: `850ms`, `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Unix milliseconds as UTC, `2026-12-06T10:45:27Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `2026-12-06T10:45:27Z (3m12s ago)`.
fn when(ms: u64, now: u64) -> String {
    format!("{} ({} ago)", utc(ms), duration_ms(now.saturating_sub(ms)))
}

/// `, last move 4s ago` (empty before the first move).
pub fn last_move(d: &Drain, now: u64) -> String {
    d.last_move_ms.map_or_else(String::new, |t| format!(", last move {} ago", duration_ms(now.saturating_sub(t))))
}

/// `, unfinished tasks N` for a drain with MCP 2026-07-28 tasks left on its upstream;
/// empty when none (a 2025-era deployment never sees it).
pub fn tasks(d: &Drain) -> String {
    if d.tasks == 0 { String::new() } else { format!(", unfinished tasks {}", d.tasks) }
}

/// The `clientInfo` of an `initialize` body, `name version`, if it has one.
fn client_info(initialize: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(initialize).ok()?;
    let info = v.pointer("/params/clientInfo")?;
    let name = info.get("name")?.as_str()?;
    Some(match info.get("version").and_then(|v| v.as_str()) {
        Some(version) => format!("{name} {version}"),
        None => name.to_string(),
    })
}

/// A record, one field a line. The stored `initialize` / `notifications/initialized`
/// bodies are summarised (client, size), not printed (`--json` prints them).
pub fn record(r: &SessionRecord, now: u64) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(out, "{k:<16}{v}");
    };
    line("session", &r.session_id);
    if r.backend_session_id != r.session_id {
        line("backend session", &r.backend_session_id);
    }
    line("upstream", &r.upstream);
    line("generation", &format!("{}{}", r.generation, if r.generation > 1 { " (re-pinned by recovery or drain)" } else { "" }));
    line("protocol", r.protocol_version.as_deref().unwrap_or("-"));
    let client = client_info(&r.initialize).unwrap_or_else(|| "-".into());
    line("client", &format!("{client} (initialize: {} bytes)", r.initialize.len()));
    line("initialized", if r.initialized.is_some() { "yes" } else { "no" });
    line("created", &when(r.created_at_ms, now));
    line("last seen", &when(r.last_seen_ms, now));
    out
}

/// The draining upstreams, one a line.
pub fn draining(list: &[Drain], now: u64) -> String {
    if list.is_empty() {
        return "draining    none\n".to_string();
    }
    let mut out = format!("draining    {} upstream{}\n", list.len(), if list.len() == 1 { "" } else { "s" });
    for d in list {
        let _ = writeln!(
            out,
            "  {}  source {}  for {}  moved {}  failed {}{}",
            d.upstream,
            d.source.as_str(),
            duration_ms(now.saturating_sub(d.since_ms)),
            d.moved,
            d.failed,
            d.last_move_ms.map_or_else(String::new, |t| format!("  last move {} ago", duration_ms(now.saturating_sub(t))))
        );
    }
    out
}

/// One sample of the exposition: metric name and labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The samples of Prometheus / OpenMetrics text (comments skipped; label values are
/// simple here: no escaped quotes in control's metrics).
pub fn parse_metrics(text: &str) -> Vec<(Sample, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.trim_end_matches('}');
                let labels = inner
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                    .collect();
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        out.push((Sample { name: name.to_string(), labels }, value));
    }
    out
}

fn sum(samples: &[(Sample, f64)], name: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> Option<f64> {
    let mut found = None;
    for (s, v) in samples {
        if s.name == name && keep(&s.labels) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A few of control's metrics (this instance, since it started): records, recoveries,
/// drain-moves, 5xx answers, failed store operations.
pub fn metrics_summary(samples: &[(Sample, f64)]) -> String {
    const P: &str = "mcp_affinity_control_";
    let mut out = String::new();
    if let Some(n) = sum(samples, &format!("{P}store_records"), |_| true) {
        let _ = writeln!(out, "records     {n} (memory store; not counted with Redis)");
    }
    let outcome = |name: &str, o: &str| sum(samples, &format!("{P}{name}"), |l| l.get("outcome").is_some_and(|v| v == o)).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "recoveries  replayed {}, not_replayed {}, failed {}, alive {} (this instance)",
        outcome("recoveries_total", "replayed"),
        outcome("recoveries_total", "not_replayed"),
        outcome("recoveries_total", "failed"),
        outcome("recoveries_total", "alive")
    );
    let _ = writeln!(
        out,
        "drain-moves moved {}, stayed {} (this instance)",
        outcome("drain_moves_total", "moved"),
        outcome("drain_moves_total", "stayed")
    );
    let errors_5xx = sum(samples, &format!("{P}http_requests_total"), |l| l.get("status").is_some_and(|s| s.starts_with('5'))).unwrap_or(0.0);
    let store_errors = outcome("store_operation_duration_seconds_count", "error");
    let _ = writeln!(out, "errors      {errors_5xx} answers 5xx, {store_errors} store operations failed (this instance)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(192_000), "3m12s");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }

    #[test]
    fn metrics_are_parsed_and_summarised() {
        let text = "# TYPE x counter\n\
            mcp_affinity_control_store_records 3\n\
            mcp_affinity_control_recoveries_total{outcome=\"failed\"} 2\n\
            mcp_affinity_control_http_requests_total{route=\"/v1/sessions/{id}\",method=\"GET\",status=\"503\"} 4\n\
            mcp_affinity_control_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 9\n\
            mcp_affinity_control_store_operation_duration_seconds_count{op=\"get\",outcome=\"error\"} 1\n# EOF\n";
        let s = metrics_summary(&parse_metrics(text));
        assert!(s.contains("records     3 (memory store; not counted with Redis)"), "{s}");
        assert!(s.contains("failed 2"), "{s}");
        assert!(s.contains("errors      4 answers 5xx, 1 store operations failed"), "{s}");
    }

    #[test]
    fn records_hide_the_bodies() {
        let r = SessionRecord {
            version: 1,
            session_id: "s1".into(),
            backend_session_id: "s1".into(),
            upstream: "10.0.0.7:8080".into(),
            generation: 2,
            initialize: r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"clientInfo":{"name":"cli","version":"1.0"},"capabilities":{"x":"secret-ish"}}}"#.into(),
            initialized: None,
            protocol_version: Some("2025-06-18".into()),
            created_at_ms: 1_700_000_000_000,
            last_seen_ms: 1_700_000_060_000,
        };
        let text = record(&r, 1_700_000_120_000);
        assert!(text.contains("upstream        10.0.0.7:8080"), "{text}");
        assert!(text.contains("client          cli 1.0 (initialize: "), "{text}");
        assert!(text.contains("last seen       2023-11-14T22:14:20Z (1m00s ago)"), "{text}");
        assert!(!text.contains("secret-ish") && !text.contains("backend session"), "{text}");
    }
}
