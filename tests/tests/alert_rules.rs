//! The alert rules of envoy/observability (docs/alerts.md), beyond what `make test-alerts`
//! checks with promtool: the PrometheusRule manifest holds exactly the groups of the rule
//! file, every alert is labelled and annotated alike, has a section in docs/alerts.md (its
//! `runbook`) and a unit test in alerts_test.yaml, and selects only metrics that exist
//! under those names (control's registry; the filter's counters as Envoy exports them).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml(rel: &str) -> Json {
    use serde::Deserialize;
    let text = std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    Json::deserialize(serde_norway::Deserializer::from_str(&text)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn rules() -> Vec<Json> {
    let file = yaml("envoy/observability/alerts.yaml");
    file["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect()
}

#[test]
fn the_prometheusrule_holds_the_groups_of_the_rule_file() {
    let file = yaml("envoy/observability/alerts.yaml");
    let manifest = yaml("envoy/observability/prometheusrule.yaml");
    assert_eq!(manifest["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(manifest["metadata"]["namespace"], "mcp");
    assert_eq!(manifest["spec"]["groups"], file["groups"], "regenerate: envoy/observability/prometheusrule.sh > envoy/observability/prometheusrule.yaml");
}

#[test]
fn every_alert_is_labelled_documented_and_tested() {
    let doc = std::fs::read_to_string(repo().join("docs/alerts.md")).unwrap();
    let tests = std::fs::read_to_string(repo().join("envoy/observability/alerts_test.yaml")).unwrap();
    let rules = rules();
    assert!(rules.len() >= 10, "{rules:?}");
    for rule in &rules {
        let name = rule["alert"].as_str().expect("alerting rules only");
        assert!(name.starts_with("McpAffinity"), "{name}");
        assert!(matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")), "{name}: severity");
        for key in ["summary", "description"] {
            assert!(rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()), "{name}: annotation {key}");
        }
        assert_eq!(rule["annotations"]["runbook"], format!("docs/alerts.md#{}", name.to_lowercase()), "{name}: runbook");
        assert!(doc.contains(&format!("\n## {name}\n")), "docs/alerts.md has no section {name}");
        assert!(tests.contains(&format!("alertname: {name}\n")), "alerts_test.yaml does not test {name}");
    }
}

#[test]
fn the_rules_select_metrics_that_exist() {
    // Control's series, as its /metrics renders them once each kind was observed.
    let m = mcp_affinity_control::metrics::Metrics::new();
    m.observe_request("/v1/sessions/{id}", "GET", 503);
    m.observe_store("get", false, std::time::Duration::from_millis(1));
    m.observe_recovery("failed", std::time::Duration::from_millis(1));
    m.observe_drain_move(false, None);
    m.observe_drain_move(true, Some(std::time::Duration::from_secs(1000)));
    let text = m.render(mcp_affinity_control::store::StoreStats { records: None, evictions: 0 });
    let control: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    assert!(text.contains(r#"mcp_affinity_control_drain_move_delay_seconds_bucket{le="819.2"} 0"#), "{text}");
    // The filter's counters: `wasmcustom.mcp_affinity.<name>` in Envoy's /stats is
    // `mcp_affinity_<name>` in /stats/prometheus (no `envoy_` prefix, no `_total`).
    let filter: Vec<String> = mcp_affinity_filter::metrics::Counter::ALL.iter().map(|c| c.name().replace('.', "_")).collect();
    let metrics = control.iter().cloned().chain(filter.iter().cloned()).chain(["up".to_string()]).collect::<Vec<_>>();
    for rule in rules() {
        let expr = rule["expr"].as_str().unwrap();
        let used: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("mcp_affinity_") || *w == "up")
            .collect();
        assert!(!used.is_empty(), "{expr}");
        for m in used {
            assert!(metrics.iter().any(|k| k == m), "{}: unknown metric {m}", rule["alert"]);
        }
    }
    for counter in ["recoveries_not_replayed", "pins_evicted", "control_errors"] {
        assert!(filter.contains(&format!("mcp_affinity_{counter}")), "the filter has no counter {counter}");
    }
}
