//! The Grafana dashboard of mcp-affinity (docs/dashboard.md) and its single source, the
//! named PromQL queries of `envoy/observability/queries.yaml`: [`panels`] reads them and
//! [`render`] generates `envoy/observability/grafana/mcp-affinity.json` from them (one
//! panel per entry, one target per query). tests/tests/e2e_prometheus.rs checks the
//! checked-in dashboard against [`render`] and runs every query against a real Prometheus.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value as Json, json};

/// The query list, relative to the workspace root.
pub const QUERIES: &str = "envoy/observability/queries.yaml";
/// The generated dashboard, relative to the workspace root.
pub const DASHBOARD: &str = "envoy/observability/grafana/mcp-affinity.json";

/// One named query of a panel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// Unique over the list (`[a-z0-9_]+`): how tests refer to it, and the target's `refId`
    /// base.
    pub name: String,
    /// The PromQL expression, as Grafana sends it to Prometheus.
    pub expr: String,
    /// Grafana's legend format (`{{label}}` placeholders).
    pub legend: String,
}

/// One dashboard panel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    /// The panel's title, as Grafana shows it.
    pub title: String,
    /// Grafana panel type: `timeseries` or `stat`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Grafana unit id (`ops`, `reqps`, `s`, `short`).
    pub unit: String,
    /// What the panel shows (Grafana's panel tooltip).
    pub description: String,
    /// Its queries, one Grafana target each, in order.
    pub queries: Vec<Query>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    panels: Vec<Panel>,
}

fn path(rel: &str) -> PathBuf {
    crate::envoy::workspace_root().join(rel)
}

/// The panels of [`QUERIES`], in order. Errors when the file cannot be read or parsed, a
/// panel type is not `timeseries`/`stat`, a panel has no query, or a name is repeated or
/// not `[a-z0-9_]+`.
pub fn panels() -> Result<Vec<Panel>> {
    let text = std::fs::read_to_string(path(QUERIES)).with_context(|| format!("read {QUERIES}"))?;
    let file: File = serde_norway::from_str(&text).with_context(|| format!("parse {QUERIES}"))?;
    let mut names = std::collections::HashSet::new();
    for p in &file.panels {
        if !matches!(p.kind.as_str(), "timeseries" | "stat") || p.queries.is_empty() {
            bail!("{QUERIES}: panel {:?}: type {:?}, {} queries", p.title, p.kind, p.queries.len());
        }
        for q in &p.queries {
            if q.name.is_empty() || !q.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || !names.insert(q.name.clone()) {
                bail!("{QUERIES}: query name {:?} is empty, repeated or not [a-z0-9_]+", q.name);
            }
        }
    }
    Ok(file.panels)
}

/// Every query of [`panels`], in order.
pub fn queries() -> Result<Vec<Query>> {
    Ok(panels()?.into_iter().flat_map(|p| p.queries).collect())
}

/// The dashboard JSON (Grafana schema 39, with a `datasource` variable of type
/// `prometheus`), pretty-printed with a final newline: what [`DASHBOARD`] must hold.
/// Panels are laid out two per row, 12 × 8 grid units each.
pub fn render(panels: &[Panel]) -> String {
    let datasource = json!({"type": "prometheus", "uid": "${datasource}"});
    let panels: Vec<Json> = panels
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let targets: Vec<Json> =
                p.queries.iter().map(|q| json!({"datasource": datasource, "expr": q.expr, "legendFormat": q.legend, "refId": q.name})).collect();
            json!({
                "id": i + 1,
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i / 2) * 8},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {},
                "targets": targets,
            })
        })
        .collect();
    let dashboard = json!({
        "uid": "mcp-affinity",
        "title": "mcp-affinity",
        "description": "Generated from envoy/observability/queries.yaml (docs/dashboard.md); do not edit by hand.",
        "tags": ["mcp-affinity"],
        "schemaVersion": 39,
        "version": 1,
        "editable": true,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    });
    let mut text = serde_json::to_string_pretty(&dashboard).expect("JSON");
    text.push('\n');
    text
}

/// The checked-in [`DASHBOARD`], as text.
pub fn checked_in() -> Result<String> {
    std::fs::read_to_string(path(DASHBOARD)).with_context(|| format!("read {DASHBOARD}"))
}

/// Writes [`render`] of [`panels`] to [`DASHBOARD`] (what `UPDATE_DASHBOARD=1` does in the
/// test).
pub fn write() -> Result<()> {
    let text = render(&panels()?);
    std::fs::create_dir_all(path(DASHBOARD).parent().expect("a directory")).context("create grafana/")?;
    std::fs::write(path(DASHBOARD), text).with_context(|| format!("write {DASHBOARD}"))
}
