//! The HTML of the status page: `page.html` with its `{{name}}` slots filled in one pass.
//! Every text that comes from data (upstreams, errors, session ids, …) is escaped
//! ([`escape`]); the page has no script.

use std::fmt::Write as _;

use serde::Serialize;

use super::{StatusReport, StoreHealth, UpstreamStatus};
use crate::cli::format::{duration_ms, utc};
use crate::recover::recent::{RECENT_RECOVERIES, RecentRecovery};

const TEMPLATE: &str = include_str!("page.html");

/// `text` with `& < > " '` replaced by character references: safe in element content and
/// in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `template` with every `{{name}}` replaced by `slot(name)`, in one pass (a value that
/// holds `{{…}}` is not expanded again). A name `slot` does not know is left as it is.
fn fill(template: &str, slot: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        match after.find("}}").and_then(|close| Some((close, slot(&after[..close])?))) {
            Some((close, value)) => {
                out.push_str(&value);
                rest = &after[close + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The whole page for `report`.
pub fn page(report: &StatusReport) -> String {
    fill(TEMPLATE, |name| {
        Some(match name {
            "version" => escape(&report.version),
            "uptime" => duration_ms(report.uptime_secs.saturating_mul(1000)),
            "now" => utc(report.now_ms),
            "store" => store(&report.store),
            "endpoints_error" => report.endpoints_error.as_deref().map_or_else(String::new, |e| {
                format!("<p class=\"error\" id=\"endpoints-error\">endpoints: {}</p>", escape(e))
            }),
            "upstreams" => rows(
                &report.upstreams,
                "<tr><td colspan=\"5\" class=\"none\">no upstream known</td></tr>",
                |u| upstream(u, report.now_ms),
            ),
            "recoveries" => rows(&report.recoveries, "<tr><td colspan=\"7\" class=\"none\">none yet</td></tr>", |r| {
                recovery(r, report.now_ms)
            }),
            "recent_max" => RECENT_RECOVERIES.to_string(),
            _ => return None,
        })
    })
}

/// One row per item, or `empty` when there is none.
fn rows<T>(items: &[T], empty: &str, row: impl Fn(&T) -> String) -> String {
    if items.is_empty() {
        return empty.to_string();
    }
    items.iter().map(row).collect::<Vec<_>>().join("\n")
}

/// The wire name of a serde enum (`connect_failure`, `replayed`).
fn wire(value: impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn store(s: &StoreHealth) -> String {
    let (class, health) = match &s.error {
        None => ("ok", "ok".to_string()),
        Some(e) => ("error", format!("error: {}", escape(e))),
    };
    let records = s
        .records
        .map_or_else(|| "n/a (not counted with Redis)".to_string(), |n| n.to_string());
    format!(
        "<table id=\"store\">\n<tr><th>backend</th><td class=\"backend\">{}</td></tr>\n\
         <tr><th>health</th><td class=\"health {class}\">{health}</td></tr>\n\
         <tr><th>ping</th><td class=\"latency\">{:.2} ms</td></tr>\n\
         <tr><th>records</th><td class=\"records\">{records}</td></tr>\n</table>",
        escape(&s.backend),
        s.latency_ms,
    )
}

fn upstream(u: &UpstreamStatus, now_ms: u64) -> String {
    let name = escape(&u.upstream);
    let sessions = u.sessions.map_or_else(|| "n/a".to_string(), |n| n.to_string());
    let (state, drain) = match &u.drain {
        None => ("serving", "<span class=\"none\">-</span>".to_string()),
        Some(d) => {
            let mut text = format!(
                "since {} ({} ago), source {}, <span class=\"moved-count\">moved {}</span>, <span class=\"failed-count\">failed {}</span>",
                utc(d.since_ms),
                duration_ms(now_ms.saturating_sub(d.since_ms)),
                escape(d.source.as_str()),
                d.moved,
                d.failed
            );
            if let Some(last) = d.last_move_ms {
                let _ = write!(text, ", last move {} ago", duration_ms(now_ms.saturating_sub(last)));
            }
            if d.tasks > 0 {
                let _ = write!(text, ", <span class=\"tasks-count\">unfinished tasks {}</span>", d.tasks);
            }
            ("draining", text)
        }
    };
    format!(
        "<tr class=\"upstream {state}-row\" data-upstream=\"{name}\"><td class=\"name\">{name}</td><td class=\"endpoint\">{}</td>\
         <td class=\"sessions\">{sessions}</td><td class=\"state {state}\">{state}</td><td class=\"drain\">{drain}</td></tr>",
        if u.endpoint { "yes" } else { "no" },
    )
}

fn recovery(r: &RecentRecovery, now_ms: u64) -> String {
    let outcome = wire(r.outcome);
    format!(
        "<tr class=\"recovery\" data-outcome=\"{outcome}\"><td class=\"at\" title=\"{} ago\">{}</td><td class=\"session\">{}</td>\
         <td class=\"reason\">{}</td><td class=\"from\">{}</td><td class=\"to\">{}</td><td class=\"outcome {outcome}\">{outcome}</td>\
         <td class=\"elapsed\">{} ms</td></tr>",
        duration_ms(now_ms.saturating_sub(r.at_ms)),
        utc(r.at_ms),
        escape(&r.session),
        wire(r.reason),
        escape(&r.failed_upstream),
        r.new_upstream
            .as_deref()
            .map_or_else(|| "<span class=\"none\">-</span>".to_string(), escape),
        r.elapsed_ms,
    )
}
