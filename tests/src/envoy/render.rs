//! The shipped bootstraps rendered for a local run ([`render`], [`Render`]): see the
//! module above for what changes and what stays as shipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_norway::{Mapping, Value};

use super::*;

/// What [`render`] changes in the bootstrap.
#[derive(Clone, Debug)]
pub struct Render {
    /// Address of the `mcp` listener.
    pub listen: SocketAddr,
    /// Address of the admin API.
    pub admin: SocketAddr,
    /// The wasm module (`vm_config.code.local.filename`); `None` keeps the shipped path.
    pub wasm: Option<PathBuf>,
    /// The `mcp_service` endpoints (at least one).
    pub upstreams: Vec<SocketAddr>,
    /// The `mcp_affinity_control` endpoint; `None` keeps the shipped one.
    pub control: Option<SocketAddr>,
    /// Control's replay listener, the priority-1 endpoint of `mcp_service`
    /// (`envoy/envoy-stateful-session.yaml`); `None` keeps the shipped one. Errors on a
    /// bootstrap without one.
    pub replay: Option<SocketAddr>,
    /// With `replay`: the directory of the replay listener's mutual-TLS files
    /// (`scripts/replay-certs.sh`), which replaces the shipped [`REPLAY_TLS_DIR`]; `None`
    /// with `replay`: the replay endpoint is plain HTTP (the TLS transport socket is
    /// removed).
    pub replay_tls: Option<PathBuf>,
    /// The plugin configuration JSON (`configuration.value`), verbatim; `None` keeps the
    /// shipped configuration.
    pub filter_config: Option<String>,
    /// Environment variables of Envoy's process the VM may read, added to
    /// `vm_config.environment_variables.host_env_keys` (the shipped keys stay).
    pub host_env_keys: Vec<String>,
    /// Remove the wasm HTTP filter (the other HTTP filters and the routes stay).
    pub no_filter: bool,
    /// Unwrap the wasm filter from its response matcher: every response then reaches the
    /// VM (how a filter runs when it is loaded plainly, e.g. by an Istio WasmPlugin).
    pub no_response_matcher: bool,
    /// The Istio shape, applied to the stateful-session bootstrap: what an ingress gateway
    /// runs with the `WasmPlugin` (`envoy/istio/wasmplugin.yaml`: the filter loaded without
    /// its response matcher, no early header mutation), Istio's persistent session (the
    /// stateful-session header override) and `envoy/istio/buffer-filter.yaml` (Envoy's
    /// buffer filter first): no route retries and no replay endpoint — the filter replays
    /// itself (`recovery.replay_by: filter`).
    pub istio: bool,
    /// Load the module over HTTP instead of from a file: `vm_config.code.local` becomes
    /// `vm_config.code.remote` (Envoy's `RemoteDataSource`: `http_uri` through the
    /// [`WASM_SOURCE_CLUSTER`] cluster, which is added, plus the module's `sha256`). Envoy
    /// refuses a module whose sha256 differs. Takes precedence over `wasm`.
    pub remote_wasm: Option<RemoteWasm>,
}

/// The cluster [`Render::remote_wasm`] adds for the HTTP server that serves the module.
pub const WASM_SOURCE_CLUSTER: &str = "mcp_affinity_wasm_source";

/// Where Envoy fetches the module from ([`Render::remote_wasm`]).
#[derive(Clone, Debug)]
pub struct RemoteWasm {
    /// `http://HOST:PORT/PATH` (plain HTTP; HOST an IP address or a DNS name).
    pub url: String,
    /// The module's sha256, lowercase hex (`sha256sum FILE`).
    pub sha256: String,
}

impl RemoteWasm {
    /// `(host, port)` of [`RemoteWasm::url`].
    fn authority(&self) -> Result<(String, u16)> {
        let rest = self.url.strip_prefix("http://").ok_or_else(|| anyhow!("remote wasm URL {:?}: only http:// is supported", self.url))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or_else(|| anyhow!("remote wasm URL {:?}: unclosed [", self.url))?;
            (h, tail.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().with_context(|| format!("remote wasm URL {:?}: port", self.url))?,
            None => 80,
        };
        ensure!(!host.is_empty(), "remote wasm URL {:?} has no host", self.url);
        Ok((host.to_string(), port))
    }
}

impl Render {
    /// Listener, admin and upstreams; everything else as shipped.
    pub fn new(listen: SocketAddr, admin: SocketAddr, upstreams: &[SocketAddr]) -> Render {
        Render {
            listen,
            admin,
            wasm: None,
            upstreams: upstreams.to_vec(),
            control: None,
            replay: None,
            replay_tls: None,
            filter_config: None,
            host_env_keys: Vec::new(),
            no_filter: false,
            no_response_matcher: false,
            istio: false,
            remote_wasm: None,
        }
    }
}

/// [`render`] applied to [`shipped_bootstrap`].
pub fn render_shipped(r: &Render) -> Result<String> {
    let path = shipped_bootstrap();
    let yaml = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    render(&yaml, r)
}

/// The bootstrap `yaml` with the changes of `r`, as YAML. Errors when the bootstrap does
/// not have the shape this relies on (one `mcp` listener with an HTTP connection manager,
/// one wasm HTTP filter, the `mcp_service` and `mcp_affinity_control` clusters).
pub fn render(yaml: &str, r: &Render) -> Result<String> {
    ensure!(!r.upstreams.is_empty(), "at least one upstream is needed for the {SERVICE_CLUSTER} cluster");
    let mut b: Value = serde_norway::from_str(yaml).context("parse the bootstrap YAML")?;

    *field(&mut b, &["admin", "address"])? = socket_address(r.admin);

    let listener = named(seq(&mut b, &["static_resources", "listeners"])?, LISTENER)?;
    *field(listener, &["address"])? = socket_address(r.listen);
    // Local runs share one machine: with SO_REUSEPORT (Envoy's default) a second process
    // could bind the same port silently and take half the connections; without it, a
    // clash is a start failure the fixture reports.
    if let Value::Mapping(m) = &mut *listener {
        m.insert("enable_reuse_port".into(), Value::Bool(false));
    }
    let http_filters = http_filters(listener)?;
    let wasm_at: Vec<usize> =
        http_filters.iter().enumerate().filter(|(_, f)| f.get("name").and_then(Value::as_str) == Some(WASM_FILTER)).map(|(i, _)| i).collect();
    let [wasm_at] = wasm_at[..] else { bail!("expected one {WASM_FILTER} HTTP filter in listener {LISTENER:?}, found {}", wasm_at.len()) };
    if r.no_filter {
        // Plain Envoy: without mcp-affinity's filters (the wasm filter and the buffer
        // filter that holds requests for its replay).
        http_filters.retain(|f| !matches!(f.get("name").and_then(Value::as_str), Some(WASM_FILTER | BUFFER_FILTER)));
    } else {
        let filter = &mut http_filters[wasm_at];
        if r.no_response_matcher || r.istio {
            let inner = field(filter, &["typed_config", "extension_config", "typed_config"])
                .with_context(|| format!("--no-response-matcher: the {WASM_FILTER} filter is not in an ExtensionWithMatcher"))?
                .clone();
            *field(filter, &["typed_config"])? = inner;
        }
        let config = wasm_config(filter)?;
        if let Some(wasm) = &r.wasm {
            let wasm = wasm.to_str().ok_or_else(|| anyhow!("wasm path {} is not UTF-8", wasm.display()))?;
            *field(config, &["vm_config", "code", "local", "filename"])? = Value::from(wasm);
        }
        if let Some(remote) = &r.remote_wasm {
            ensure!(
                remote.sha256.len() == 64 && remote.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "remote wasm sha256 {:?} is not 64 hex digits",
                remote.sha256
            );
            remote.authority()?;
            *field(config, &["vm_config", "code"])? = remote_code(remote);
        }
        if let Some(json) = &r.filter_config {
            *field(config, &["configuration", "value"])? = Value::from(json.as_str());
        }
        if !r.host_env_keys.is_empty() {
            let vm = field(config, &["vm_config"])?;
            let keys = mapping(vm)?
                .entry("environment_variables".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            let keys = mapping(keys)?.entry("host_env_keys".into()).or_insert_with(|| Value::Sequence(Vec::new()));
            let keys = keys.as_sequence_mut().ok_or_else(|| anyhow!("host_env_keys is not a list"))?;
            for k in &r.host_env_keys {
                if !keys.iter().any(|v| v.as_str() == Some(k)) {
                    keys.push(Value::from(k.as_str()));
                }
            }
        }
    }

    let clusters = seq(&mut b, &["static_resources", "clusters"])?;
    let service = named(clusters, SERVICE_CLUSTER)?;
    set_endpoints(service, 0, &r.upstreams)?;
    if let Some(replay) = r.replay {
        set_endpoints(service, 1, &[replay]).with_context(|| format!("--replay {replay}: {SERVICE_CLUSTER} has no priority-1 endpoint (control's replay listener)"))?;
        match &r.replay_tls {
            Some(dir) => use_replay_tls(service, dir)?,
            None => {
                if let Value::Mapping(m) = service {
                    m.remove("transport_socket_matches");
                }
            }
        }
    }
    if let Some(control) = r.control {
        set_endpoints(named(clusters, CONTROL_CLUSTER)?, 0, &[control])?;
    }
    if let Some(remote) = r.remote_wasm.as_ref().filter(|_| !r.no_filter) {
        seq(&mut b, &["static_resources", "clusters"])?.push(wasm_source_cluster(remote)?);
    }
    if r.istio {
        istio_shape(&mut b)?;
    }
    serde_norway::to_string(&b).context("serialize the bootstrap")
}

/// `vm_config.code` loading the module from `remote` (Envoy's `RemoteDataSource`): fetched
/// once when the listener is created, retried, and checked against the sha256.
fn remote_code(remote: &RemoteWasm) -> Value {
    let yaml = format!(
        "remote:\n  http_uri:\n    uri: {url}\n    cluster: {WASM_SOURCE_CLUSTER}\n    timeout: 10s\n  sha256: {sha}\n  retry_policy:\n    num_retries: 3\n",
        url = serde_json::to_string(&remote.url).expect("a string serializes"),
        sha = remote.sha256.to_ascii_lowercase(),
    );
    serde_norway::from_str(&yaml).expect("a fixed YAML shape")
}

/// The [`WASM_SOURCE_CLUSTER`] cluster: the HTTP server of `remote` (STATIC for an IP
/// address, STRICT_DNS for a name).
fn wasm_source_cluster(remote: &RemoteWasm) -> Result<Value> {
    let (host, port) = remote.authority()?;
    let kind = if host.parse::<std::net::IpAddr>().is_ok() { "STATIC" } else { "STRICT_DNS" };
    let yaml = format!(
        "name: {WASM_SOURCE_CLUSTER}\ntype: {kind}\nconnect_timeout: 5s\nload_assignment:\n  cluster_name: {WASM_SOURCE_CLUSTER}\n  endpoints:\n  - lb_endpoints:\n    - endpoint:\n        address:\n          socket_address: {{address: {host}, port_value: {port}}}\n",
        host = serde_json::to_string(&host).expect("a string serializes"),
    );
    serde_norway::from_str(&yaml).context("the wasm source cluster")
}

/// `envoy/istio/buffer-filter.yaml`, the EnvoyFilter that puts Envoy's buffer filter first.
pub fn istio_buffer_filter() -> PathBuf {
    workspace_root().join("envoy/istio/buffer-filter.yaml")
}

/// See [`Render::istio`]. The buffer filter is the shipped EnvoyFilter's patch value.
fn istio_shape(b: &mut Value) -> Result<()> {
    let path = istio_buffer_filter();
    let patch: Value = serde_norway::from_str(&std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?)?;
    let buffer = patch
        .get("spec")
        .and_then(|s| s.get("configPatches"))
        .and_then(|p| p.get(0))
        .and_then(|p| p.get("patch"))
        .and_then(|p| p.get("value"))
        .cloned()
        .ok_or_else(|| anyhow!("{}: no spec.configPatches[0].patch.value", path.display()))?;
    let listener = named(seq(b, &["static_resources", "listeners"])?, LISTENER)?;
    let hcm = hcm_config(listener)?;
    mapping(hcm)?.remove("early_header_mutation_extensions");
    seq(hcm, &["http_filters"])?.insert(0, buffer);
    for vhost in seq(hcm, &["route_config", "virtual_hosts"])?.iter_mut() {
        for route in seq(vhost, &["routes"])?.iter_mut() {
            if let Some(Value::Mapping(action)) = route.get_mut("route") {
                action.remove("retry_policy");
            }
        }
    }
    let service = named(seq(b, &["static_resources", "clusters"])?, SERVICE_CLUSTER)?;
    mapping(service)?.remove("transport_socket_matches");
    seq(service, &["load_assignment", "endpoints"])?.retain(|l| l.get("priority").and_then(Value::as_u64).unwrap_or(0) == 0);
    Ok(())
}

/// The plugin configuration (`configuration.value`, JSON text) of the `mcp` listener's wasm
/// filter in the bootstrap `yaml`, wrapped in its response matcher or not. Errors when the
/// bootstrap does not have that shape.
pub fn plugin_configuration(yaml: &str) -> Result<String> {
    let mut b: Value = serde_norway::from_str(yaml).context("parse the bootstrap YAML")?;
    let listener = named(seq(&mut b, &["static_resources", "listeners"])?, LISTENER)?;
    let filter = named(http_filters(listener)?, WASM_FILTER)?;
    let value = field(wasm_config(filter)?, &["configuration", "value"])?;
    value.as_str().map(str::to_string).ok_or_else(|| anyhow!("the wasm filter's configuration.value is not a string"))
}

/// The `Wasm` filter configuration (`config`) of the wasm HTTP filter entry, inside its
/// `ExtensionWithMatcher` when it is wrapped in one.
fn wasm_config(filter: &mut Value) -> Result<&mut Value> {
    let wrapped = filter.get("typed_config").and_then(|t| t.get("@type")).and_then(Value::as_str) == Some(MATCHER_TYPE);
    if wrapped { field(filter, &["typed_config", "extension_config", "typed_config", "config"]) } else { field(filter, &["typed_config", "config"]) }
}

// ─── YAML helpers ───────────────────────────────────────────────────────────────────

/// `{socket_address: {address, port_value}}`.
fn socket_address(a: SocketAddr) -> Value {
    let mut sa = Mapping::new();
    sa.insert("address".into(), Value::from(a.ip().to_string()));
    sa.insert("port_value".into(), Value::from(a.port()));
    let mut m = Mapping::new();
    m.insert("socket_address".into(), Value::Mapping(sa));
    Value::Mapping(m)
}

fn mapping(v: &mut Value) -> Result<&mut Mapping> {
    v.as_mapping_mut().ok_or_else(|| anyhow!("expected a mapping"))
}

/// The value at `path` (mapping keys), which must exist.
fn field<'a>(v: &'a mut Value, path: &[&str]) -> Result<&'a mut Value> {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        cur = cur.get_mut(*k).ok_or_else(|| anyhow!("the bootstrap has no {}", path[..=i].join(".")))?;
    }
    Ok(cur)
}

fn seq<'a>(v: &'a mut Value, path: &[&str]) -> Result<&'a mut Vec<Value>> {
    field(v, path)?.as_sequence_mut().ok_or_else(|| anyhow!("{} is not a list", path.join(".")))
}

/// The one element of `items` whose `name` is `name`.
fn named<'a>(items: &'a mut [Value], name: &str) -> Result<&'a mut Value> {
    let mut found = items.iter_mut().filter(|v| v.get("name").and_then(Value::as_str) == Some(name));
    let first = found.next().ok_or_else(|| anyhow!("the bootstrap has no {name:?}"))?;
    ensure!(found.next().is_none(), "the bootstrap has several {name:?}");
    Ok(first)
}

/// The `http_filters` of the listener's (single) HTTP connection manager.
fn http_filters(listener: &mut Value) -> Result<&mut Vec<Value>> {
    seq(hcm_config(listener)?, &["http_filters"])
}

/// The `typed_config` of the listener's (single) HTTP connection manager.
fn hcm_config(listener: &mut Value) -> Result<&mut Value> {
    let mut hcms = Vec::new();
    for chain in seq(listener, &["filter_chains"])?.iter_mut() {
        for f in seq(chain, &["filters"])?.iter_mut() {
            if f.get("name").and_then(Value::as_str) == Some("envoy.filters.network.http_connection_manager") {
                hcms.push(f);
            }
        }
    }
    ensure!(hcms.len() == 1, "expected one HTTP connection manager in listener {LISTENER:?}, found {}", hcms.len());
    field(hcms.pop().unwrap(), &["typed_config"])
}

/// Replaces a cluster's `load_assignment.endpoints` with one locality of `addrs`.
/// Replaces the endpoints of `cluster` at `priority` (its `load_assignment.endpoints`
/// Where the shipped stateful-session bootstrap reads the replay listener's mutual-TLS files.
pub const REPLAY_TLS_DIR: &str = "/etc/envoy/replay-tls/";

/// The replay endpoint (priority 1 of `cluster`) reached over mutual TLS with the files in
/// `dir`: its metadata selects the cluster's TLS transport socket, whose file names move
/// from [`REPLAY_TLS_DIR`] to `dir`.
fn use_replay_tls(cluster: &mut Value, dir: &Path) -> Result<()> {
    let dir = dir.to_str().ok_or_else(|| anyhow!("replay TLS directory {} is not UTF-8", dir.display()))?;
    let matches = field(cluster, &["transport_socket_matches"]).context("the bootstrap has no transport_socket_matches for the replay listener")?;
    let criteria = matches.get(0).and_then(|m| m.get("match")).cloned().ok_or_else(|| anyhow!("transport_socket_matches[0] has no match"))?;
    fn rewrite(v: &mut Value, dir: &str) {
        match v {
            Value::String(s) if s.starts_with(REPLAY_TLS_DIR) => *s = format!("{}/{}", dir.trim_end_matches('/'), &s[REPLAY_TLS_DIR.len()..]),
            Value::Mapping(m) => m.values_mut().for_each(|v| rewrite(v, dir)),
            Value::Sequence(l) => l.iter_mut().for_each(|v| rewrite(v, dir)),
            _ => {}
        }
    }
    rewrite(matches, dir);
    let endpoints = field(cluster, &["load_assignment", "endpoints"])?.as_sequence_mut().ok_or_else(|| anyhow!("endpoints is not a list"))?;
    let replay = endpoints.iter_mut().find(|l| l.get("priority").and_then(Value::as_u64) == Some(1)).ok_or_else(|| anyhow!("no priority-1 endpoint"))?;
    for lb in seq(replay, &["lb_endpoints"])? {
        let mut socket_match = Mapping::new();
        socket_match.insert("envoy.transport_socket_match".into(), criteria.clone());
        let mut metadata = Mapping::new();
        metadata.insert("filter_metadata".into(), Value::Mapping(socket_match));
        mapping(lb)?.insert("metadata".into(), Value::Mapping(metadata));
    }
    Ok(())
}

/// entry of that `priority`, 0 when absent) by `addrs`; other priorities stay. Priority 0
/// is added when missing; another missing priority is an error.
fn set_endpoints(cluster: &mut Value, priority: u64, addrs: &[SocketAddr]) -> Result<()> {
    let lb_endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            let mut endpoint = Mapping::new();
            endpoint.insert("address".into(), socket_address(*a));
            let mut lb = Mapping::new();
            lb.insert("endpoint".into(), Value::Mapping(endpoint));
            Value::Mapping(lb)
        })
        .collect();
    let mut locality = Mapping::new();
    if priority > 0 {
        locality.insert("priority".into(), Value::from(priority));
    }
    locality.insert("lb_endpoints".into(), Value::Sequence(lb_endpoints));
    let endpoints = field(cluster, &["load_assignment", "endpoints"])?;
    let list = endpoints.as_sequence_mut().ok_or_else(|| anyhow!("load_assignment.endpoints is not a list"))?;
    let at = list.iter().position(|l| l.get("priority").and_then(Value::as_u64).unwrap_or(0) == priority);
    match at {
        Some(i) => list[i] = Value::Mapping(locality),
        None if priority == 0 => list.insert(0, Value::Mapping(locality)),
        None => bail!("no endpoints at priority {priority}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn shipped() -> String {
        std::fs::read_to_string(shipped_bootstrap()).unwrap()
    }

    fn local() -> Render {
        Render {
            wasm: Some(PathBuf::from("/tmp/x/filter.wasm")),
            control: Some(a("127.0.0.1:4003")),
            filter_config: Some(r#"{"max_body_bytes":4096}"#.into()),
            host_env_keys: vec!["MCP_AFFINITY_CONTROL_TOKEN".into(), "OTHER_KEY".into()],
            ..Render::new(a("127.0.0.1:4001"), a("127.0.0.1:4002"), &[a("127.0.0.1:5001"), a("127.0.0.1:5002"), a("127.0.0.1:5003")])
        }
    }

    fn parse(yaml: &str) -> serde_json::Value {
        serde_norway::from_str(yaml).unwrap()
    }

    fn wasm_filter(b: &serde_json::Value) -> Option<&serde_json::Value> {
        b.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == WASM_FILTER)
    }

    /// The `Wasm` configuration of the filter entry, wrapped in its matcher or not.
    fn config_of(f: &serde_json::Value) -> &serde_json::Value {
        if f["typed_config"]["@type"] == MATCHER_TYPE { &f["typed_config"]["extension_config"]["typed_config"]["config"] } else { &f["typed_config"]["config"] }
    }

    fn endpoints(b: &serde_json::Value, cluster: &str) -> Vec<String> {
        let c = b["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == cluster).unwrap();
        c.pointer("/load_assignment/endpoints/0/lb_endpoints")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let sa = e.pointer("/endpoint/address/socket_address").unwrap();
                format!("{}:{}", sa["address"].as_str().unwrap(), sa["port_value"])
            })
            .collect()
    }

    #[test]
    fn renders_addresses_wasm_and_configuration() {
        let b = parse(&render(&shipped(), &local()).unwrap());
        assert_eq!(b.pointer("/admin/address/socket_address").unwrap(), &serde_json::json!({"address":"127.0.0.1","port_value":4002}));
        assert_eq!(b.pointer("/static_resources/listeners/0/name").unwrap(), LISTENER);
        assert_eq!(b.pointer("/static_resources/listeners/0/address/socket_address").unwrap(), &serde_json::json!({"address":"127.0.0.1","port_value":4001}));
        let f = wasm_filter(&b).expect("the wasm filter stays");
        assert_eq!(f["typed_config"]["@type"], MATCHER_TYPE, "in its response matcher, as shipped");
        let config = config_of(f);
        assert_eq!(config.pointer("/vm_config/code/local/filename").unwrap(), "/tmp/x/filter.wasm");
        assert_eq!(config.pointer("/vm_config/runtime").unwrap(), "envoy.wasm.runtime.v8", "VM settings as shipped");
        assert_eq!(config.pointer("/configuration/value").unwrap(), r#"{"max_body_bytes":4096}"#);
        assert_eq!(config.pointer("/configuration/@type").unwrap(), "type.googleapis.com/google.protobuf.StringValue");
        assert_eq!(config.pointer("/vm_config/environment_variables/host_env_keys").unwrap(), &serde_json::json!(["MCP_AFFINITY_CONTROL_TOKEN", "OTHER_KEY"]));
        assert_eq!(endpoints(&b, SERVICE_CLUSTER), ["127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"]);
        assert_eq!(endpoints(&b, CONTROL_CLUSTER), ["127.0.0.1:4003"]);
    }

    #[test]
    fn everything_else_is_as_shipped() {
        let shipped_b = parse(&shipped());
        let rendered = parse(&render(&shipped(), &local()).unwrap());
        // Same clusters (names and types), same routes, same HTTP filter chain.
        let names = |b: &serde_json::Value, p: &str| -> Vec<String> {
            b.pointer(p).unwrap().as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names(&rendered, "/static_resources/clusters"), names(&shipped_b, "/static_resources/clusters"));
        let hcm = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";
        assert_eq!(names(&rendered, &format!("{hcm}/http_filters")), names(&shipped_b, &format!("{hcm}/http_filters")));
        assert_eq!(rendered.pointer(&format!("{hcm}/route_config")), shipped_b.pointer(&format!("{hcm}/route_config")));
        let pinned = |b: &serde_json::Value| b["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "mcp_pinned").unwrap().clone();
        assert_eq!(pinned(&rendered), pinned(&shipped_b));
        // Nothing given: only the addresses change; configuration and module path stay.
        let minimal = parse(&render(&shipped(), &Render::new(a("127.0.0.1:1"), a("127.0.0.1:2"), &[a("127.0.0.1:3")])).unwrap());
        assert_eq!(wasm_filter(&minimal), wasm_filter(&shipped_b));
        assert_eq!(endpoints(&minimal, CONTROL_CLUSTER), endpoints(&shipped_b, CONTROL_CLUSTER));
    }

    #[test]
    fn no_filter_removes_the_wasm_filter_and_its_buffer_filter() {
        let b = parse(&render(&shipped(), &Render { no_filter: true, ..local() }).unwrap());
        assert!(wasm_filter(&b).is_none());
        let filters = b.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters").unwrap();
        assert_eq!(filters.as_array().unwrap().len(), 1);
        assert_eq!(filters[0]["name"], "envoy.filters.http.router");
        // Clients' pin headers are still dropped before routing.
        assert!(b.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/early_header_mutation_extensions").is_some());
    }

    #[test]
    fn plugin_configuration_is_found_wrapped_or_not() {
        let shipped_config = plugin_configuration(&shipped()).unwrap();
        assert!(shipped_config.contains("\"control\""), "{shipped_config}");
        let plain = render(&shipped(), &Render { no_response_matcher: true, ..local() }).unwrap();
        assert_eq!(plugin_configuration(&plain).unwrap(), r#"{"max_body_bytes":4096}"#);
        assert!(plugin_configuration("admin: {}\n").is_err());
    }

    #[test]
    fn no_response_matcher_unwraps_the_filter_and_keeps_its_configuration() {
        let wrapped = parse(&render(&shipped(), &local()).unwrap());
        let plain = parse(&render(&shipped(), &Render { no_response_matcher: true, ..local() }).unwrap());
        let f = wasm_filter(&plain).unwrap();
        assert_eq!(f["typed_config"]["@type"], "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm");
        assert_eq!(config_of(f), config_of(wasm_filter(&wrapped).unwrap()));
        assert!(f["typed_config"].get("xds_matcher").is_none());
        // Unwrapping a filter that is not wrapped says so.
        let once = render(&shipped(), &Render { no_response_matcher: true, ..local() }).unwrap();
        assert!(render(&once, &Render { no_response_matcher: true, ..local() }).unwrap_err().to_string().contains("ExtensionWithMatcher"));
    }

    #[test]
    fn the_replay_listener_is_the_priority_1_endpoint_and_the_pods_stay_priority_0() {
        let ss = std::fs::read_to_string(stateful_session_bootstrap()).unwrap();
        let b = parse(&render(&ss, &Render { replay: Some(a("127.0.0.1:4444")), ..local() }).unwrap());
        let service = b["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == SERVICE_CLUSTER).unwrap();
        let groups = service.pointer("/load_assignment/endpoints").unwrap().as_array().unwrap();
        let port = |g: &serde_json::Value, i: usize| g.pointer(&format!("/lb_endpoints/{i}/endpoint/address/socket_address/port_value")).and_then(serde_json::Value::as_u64);
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].get("priority"), port(&groups[0], 0), port(&groups[0], 2)), (None, Some(5001), Some(5003)));
        assert_eq!((groups[1]["priority"].as_u64(), port(&groups[1], 0), port(&groups[1], 1)), (Some(1), Some(4444), None));
        // Without --replay the shipped priority-1 endpoint stays; envoy.yaml has none to set.
        let kept = parse(&render(&ss, &local()).unwrap());
        assert_eq!(kept.pointer("/static_resources/clusters/0/load_assignment/endpoints/1/lb_endpoints/0/endpoint/address/socket_address/port_value"), Some(&serde_json::json!(9902)));
        let err = render(&shipped(), &Render { replay: Some(a("127.0.0.1:4444")), ..local() }).unwrap_err();
        assert!(format!("{err:#}").contains("priority-1"), "{err:#}");
    }

    #[test]
    fn remote_wasm_replaces_the_local_file_and_adds_its_cluster() {
        let sha = "ab".repeat(32);
        let remote = RemoteWasm { url: "http://127.0.0.1:4005/m.wasm".into(), sha256: sha.clone() };
        for bootstrap in [shipped(), std::fs::read_to_string(stateful_session_bootstrap()).unwrap()] {
            let b = parse(&render(&bootstrap, &Render { remote_wasm: Some(remote.clone()), ..local() }).unwrap());
            let code = config_of(wasm_filter(&b).unwrap()).pointer("/vm_config/code").unwrap();
            assert_eq!(
                code,
                &serde_json::json!({"remote": {"http_uri": {"uri": "http://127.0.0.1:4005/m.wasm", "cluster": WASM_SOURCE_CLUSTER, "timeout": "10s"}, "sha256": sha, "retry_policy": {"num_retries": 3}}})
            );
            let cluster = b["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == WASM_SOURCE_CLUSTER).unwrap();
            assert_eq!(cluster["type"], "STATIC");
            assert_eq!(endpoints(&b, WASM_SOURCE_CLUSTER), ["127.0.0.1:4005"]);
        }
        let named = RemoteWasm { url: "http://wasm.example:8080/x".into(), ..remote.clone() };
        let b = parse(&render(&shipped(), &Render { remote_wasm: Some(named), ..local() }).unwrap());
        assert_eq!(endpoints(&b, WASM_SOURCE_CLUSTER), ["wasm.example:8080"]);
        let v6 = RemoteWasm { url: "http://[::1]/x".into(), ..remote.clone() };
        assert_eq!(v6.authority().unwrap(), ("::1".to_string(), 80));
        for bad in [RemoteWasm { sha256: "abc".into(), ..remote.clone() }, RemoteWasm { url: "https://h/x".into(), ..remote.clone() }] {
            assert!(render(&shipped(), &Render { remote_wasm: Some(bad), ..local() }).is_err());
        }
    }

    #[test]
    fn unexpected_shapes_are_errors() {
        let r = local();
        let err = |yaml: &str| render(yaml, &r).unwrap_err().to_string();
        let y = shipped();
        assert!(err(&y.replacen("- name: mcp\n", "- name: other\n", 1)).contains("\"mcp\""));
        assert!(err(&y.replace("name: mcp_service\n", "name: pods\n")).contains("mcp_service"));
        assert!(err(&y.replacen("- name: envoy.filters.http.wasm", "- name: envoy.filters.http.lua", 1)).contains(WASM_FILTER));
        assert!(render(&y, &Render { upstreams: vec![], ..local() }).is_err());
        assert!(err("admin: {}\n").contains("admin.address"));
    }
}
