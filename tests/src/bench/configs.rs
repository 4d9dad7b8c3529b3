//! The configurations the bench measures: what each is called, how many pods are behind
//! it, and, for an Envoy, the bootstrap and [`Render`] it runs (the shipped bootstraps,
//! only addresses, module and plugin configuration changed).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::envoy::{self, Render};
use crate::process::free_addr;

/// Environment variable the filter reads control's token from (`token_env`).
pub const TOKEN_ENV: &str = "MCP_AFFINITY_CONTROL_TOKEN";

/// One configuration (a proxy instance, or the pod itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    /// Envoy without the wasm filter (`envoy/envoy.yaml`), `BENCH_BASELINE_PODS` pods.
    Plain,
    /// Envoy + the empty proxy-wasm filter (`bench/empty-filter`), `{}`.
    Empty,
    /// The empty filter configured `{"pin": POD1}`: a pinned request's necessary work.
    Pin,
    /// Envoy + mcp-affinity, `{}`, in its response matcher.
    Affinity,
    /// Envoy + mcp-affinity with control.
    Control,
    /// HAProxy, stick table on `mcp-session-id`.
    Haproxy,
    /// The pod itself.
    Direct,
    /// Plain Envoy over both pods (round robin): the initialize path's baseline.
    Plain2,
    /// Second instances, populated with `BENCH_SCALE` sessions.
    AffinityBig,
    /// Second instance of affinity+control (the same control process).
    ControlBig,
    /// Second instance of haproxy.
    HaproxyBig,
    /// Instruction counts only: affinity+control without its response matcher.
    ControlPlain,
    /// Instruction counts only, on `envoy/envoy-stateful-session.yaml`.
    PlainSs,
    /// The empty filter on the stateful-session bootstrap.
    EmptySs,
    /// mcp-affinity without control on the stateful-session bootstrap (`pin_encoding: base64`).
    AffinitySs,
    /// affinity+control replaying through Envoy's retry (`replay_by: envoy_retry`).
    RetrySs,
    /// The Istio shape (`Render::istio`): buffer filter first, the filter replays itself.
    IstioSs,
}

use Config::*;

/// The steady phase's configs, in table order.
pub const STEADY: [Config; 7] = [Plain, Empty, Pin, Affinity, Control, Haproxy, Direct];
/// The configs with a second, populated instance (`BENCH_SCALE`).
pub const SCALED: [Config; 3] = [Affinity, Control, Haproxy];
/// The initialize phase's configs (its baseline first).
pub const INITIALIZE: [Config; 8] = [Plain2, Plain, Empty, Pin, Affinity, Control, Haproxy, Direct];
/// Instruction counts on `envoy/envoy.yaml`.
pub const INSTR: [Config; 6] = [Plain, Empty, Pin, Affinity, Control, ControlPlain];
/// Instruction counts on `envoy/envoy-stateful-session.yaml`.
pub const INSTR_SS: [Config; 5] = [PlainSs, EmptySs, AffinitySs, RetrySs, IstioSs];
/// Instructions per `initialize` (baseline first).
pub const INSTR_INIT: [Config; 3] = [Plain2, Affinity, Control];

impl Config {
    /// The name in tables and in the JSON.
    pub fn label(self) -> &'static str {
        match self {
            Plain => "plain",
            Empty => "empty",
            Pin => "empty+pin",
            Affinity => "affinity",
            Control => "affinity+control",
            Haproxy => "haproxy",
            Direct => "direct",
            Plain2 => "plain (2 pods)",
            AffinityBig => "affinity (2nd)",
            ControlBig => "affinity+control (2nd)",
            HaproxyBig => "haproxy (2nd)",
            ControlPlain => "affinity+control, no matcher",
            PlainSs => "plain (stateful session)",
            EmptySs => "empty (stateful session)",
            AffinitySs => "affinity (stateful session)",
            RetrySs => "affinity+control, Envoy retry (the default)",
            IstioSs => "affinity+control, Istio shape",
        }
    }

    /// The second instance of a [`SCALED`] config, and back.
    pub fn second(self) -> Config {
        match self {
            Affinity => AffinityBig,
            Control => ControlBig,
            Haproxy => HaproxyBig,
            other => other,
        }
    }

    /// The first instance of a config (itself unless it is a second instance).
    pub fn first(self) -> Config {
        match self {
            AffinityBig => Affinity,
            ControlBig => Control,
            HaproxyBig => Haproxy,
            other => other,
        }
    }

    /// Pods behind it: `baseline_pods` for plain and empty (they have no affinity), 1 for
    /// direct, 2 otherwise.
    pub fn pods(self, baseline_pods: usize) -> usize {
        match self {
            Plain | Empty | PlainSs | EmptySs => baseline_pods,
            Direct => 1,
            _ => 2,
        }
    }

    /// HAProxy rather than Envoy.
    pub fn is_haproxy(self) -> bool {
        matches!(self, Haproxy | HaproxyBig)
    }

    /// Whether its answers to one session must come from the pod that issued it (`Some`),
    /// from one pod whichever (`Some(false)`: plain/empty with one pod, empty+pin), or may
    /// alternate (`None`: plain/empty over two pods).
    pub fn pinning(self, baseline_pods: usize) -> Option<bool> {
        match self {
            Plain | Empty | PlainSs | EmptySs | Plain2 => (baseline_pods == 1 && self != Plain2).then_some(false),
            Pin => Some(false),
            _ => Some(true),
        }
    }
}

/// What every Envoy of a run is wired to.
#[derive(Clone, Debug)]
pub struct Wiring {
    /// The two pods.
    pub pods: [SocketAddr; 2],
    /// Control's API and its replay listener (plain HTTP).
    pub control: SocketAddr,
    /// Control's replay listener (plain HTTP), priority 1 of `mcp_service` on the stateful-session bootstrap.
    pub replay: SocketAddr,
    /// mcp-affinity's module and the empty filter's.
    pub wasm: PathBuf,
    /// The empty filter's module.
    pub empty_wasm: PathBuf,
    /// Pods behind plain and empty (1 or 2).
    pub baseline_pods: usize,
}

/// The plugin configuration with control; `record_flush_ms` 500 under callgrind (Envoy
/// runs about 50 times slower there: a batch of initialize records then holds about as
/// many as one of 10 ms, the default, at full speed), `extra` fields first.
fn with_control(extra: &str, callgrind: bool) -> String {
    let flush = if callgrind { r#", "record_flush_ms": 500"# } else { "" };
    format!(r#"{{ {extra}"control": {{ "cluster": "{}", "token_env": "{TOKEN_ENV}"{flush} }} }}"#, envoy::CONTROL_CLUSTER)
}

/// The bootstrap and rendering of Envoy config `cfg` on two new free addresses, or `None`
/// for HAProxy and direct. `callgrind`: the plugin configurations for a run under
/// callgrind (see [`with_control`]).
pub fn render(cfg: Config, w: &Wiring, callgrind: bool) -> Option<(PathBuf, Render)> {
    let pods = match cfg.pods(w.baseline_pods) {
        1 => vec![w.pods[0]],
        _ => w.pods.to_vec(),
    };
    let mut r = Render::new(free_addr(), free_addr(), &pods);
    r.host_env_keys = vec![TOKEN_ENV.into()];
    let filter = |r: &mut Render, wasm: &PathBuf, config: String| {
        r.wasm = Some(wasm.clone());
        r.filter_config = Some(config);
    };
    // The empty module is loaded as a plain wasm filter, the way anyone loads one; the
    // response matcher the shipped bootstrap wraps mcp-affinity in is part of mcp-affinity.
    let empty = |r: &mut Render, config: String| {
        filter(r, &w.empty_wasm, config);
        r.no_response_matcher = true;
    };
    match cfg.first() {
        Plain | Plain2 | PlainSs => r.no_filter = true,
        Empty | EmptySs => empty(&mut r, "{}".into()),
        Pin => empty(&mut r, format!(r#"{{"pin":"{}"}}"#, w.pods[0])),
        Affinity => filter(&mut r, &w.wasm, "{}".into()),
        Control | ControlPlain => {
            filter(&mut r, &w.wasm, with_control("", callgrind));
            r.control = Some(w.control);
            r.no_response_matcher = cfg == ControlPlain;
        }
        AffinitySs => filter(&mut r, &w.wasm, r#"{ "pin_encoding": "base64" }"#.into()),
        RetrySs => {
            filter(&mut r, &w.wasm, with_control(r#""pin_encoding": "base64", "recovery": { "replay_by": "envoy_retry" }, "#, callgrind));
            r.control = Some(w.control);
        }
        IstioSs => {
            filter(&mut r, &w.wasm, with_control(r#""pin_encoding": "base64", "recovery": { "replay_by": "filter" }, "#, callgrind));
            r.control = Some(w.control);
            r.istio = true;
        }
        Haproxy | Direct | AffinityBig | ControlBig | HaproxyBig => return None,
    }
    let ss = matches!(cfg, PlainSs | EmptySs | AffinitySs | RetrySs | IstioSs);
    if ss {
        // The route of a session's requests retries once to control's replay listener
        // (priority 1 of mcp_service), plain HTTP here.
        r.replay = Some(w.replay);
    }
    Some((if ss { envoy::stateful_session_bootstrap() } else { envoy::shipped_bootstrap() }, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wiring() -> Wiring {
        Wiring {
            pods: ["127.0.0.1:5001".parse().unwrap(), "127.0.0.1:5002".parse().unwrap()],
            control: "127.0.0.1:5003".parse().unwrap(),
            replay: "127.0.0.1:5004".parse().unwrap(),
            wasm: "/m/affinity.wasm".into(),
            empty_wasm: "/m/empty.wasm".into(),
            baseline_pods: 1,
        }
    }

    #[test]
    fn every_envoy_config_renders_on_its_bootstrap() {
        let w = wiring();
        for cfg in STEADY.iter().chain(&INSTR).chain(&INSTR_SS).chain(&INITIALIZE).chain(&[AffinityBig, ControlBig]) {
            let Some((bootstrap, r)) = render(*cfg, &w, true) else {
                assert!(matches!(cfg, Haproxy | Direct), "{cfg:?}");
                continue;
            };
            let yaml = std::fs::read_to_string(&bootstrap).unwrap();
            let out = envoy::render(&yaml, &r).unwrap_or_else(|e| panic!("{cfg:?}: {e:#}"));
            if let Some(config) = &r.filter_config {
                serde_json::from_str::<serde_json::Value>(config).unwrap_or_else(|e| panic!("{cfg:?}: {config}: {e}"));
                assert!(out.contains(&w.control.port().to_string()) || r.control.is_none());
            }
        }
        assert_eq!(render(Plain, &w, false).unwrap().1.upstreams.len(), 1);
        assert_eq!(render(Plain2, &w, false).unwrap().1.upstreams.len(), 2);
        assert!(render(Control, &w, false).unwrap().1.filter_config.unwrap().ends_with(r#""token_env": "MCP_AFFINITY_CONTROL_TOKEN" } }"#));
        assert!(render(Control, &w, true).unwrap().1.filter_config.unwrap().contains("record_flush_ms"));
        assert!(render(ControlPlain, &w, true).unwrap().1.no_response_matcher);
    }

    #[test]
    fn second_instances() {
        for c in SCALED {
            assert_eq!(c.second().first(), c);
            assert_ne!(c.second(), c);
        }
        assert_eq!(Plain.second(), Plain);
        assert_eq!(AffinityBig.pods(1), 2);
    }
}
