//! Validation of everything under `envoy/` without an Envoy on the machine.
//!
//! 1. Every YAML file parses (all documents of multi-document files).
//! 2. Envoy resources decode against Envoy's v3 API: the `.proto` files shipped in the
//!    `envoy-types` crate are compiled at test time (protox), each resource is read with
//!    the protobuf JSON mapping (prost-reflect: unknown fields, wrong types, unknown enum
//!    names and unknown `@type`s are errors, as in Envoy's own YAML loading) and then
//!    decoded into the `envoy-types` prost structs, which the cross-checks walk.
//!    (protoc-gen-validate rules such as `min_items` are not enforced; the checks below
//!    cover the fields this project depends on.)
//! 3. Names agree across files: clusters used by routes and by the filter's `control`
//!    exist; the pin header is the same in the filter, the ORIGINAL_DST cluster, the
//!    route matcher, the stateful-session extension and Istio's Service label; ports
//!    agree between control's arguments, its Service, its probes and the Envoy cluster;
//!    the plugin configuration embedded in each file is accepted by the filter's real
//!    parser (`FilterConfig::parse`), and control's arguments by control's real parser.
//! 4. Each check can fail: the `mutated_*` tests break a copy of a file and expect the
//!    matching error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use clap::Parser;
use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::common::mutation_rules::v3::header_mutation as mutation;
use envoy_types::pb::envoy::config::core::v3::{Address, address, async_data_source, data_source, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::{RetryPolicy, Route, header_matcher, retry_policy::retry_priority, route, route_action};
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::HeaderMutation as HeaderMutationFilter;
use envoy_types::pb::envoy::extensions::filters::http::stateful_session::v3::StatefulSession;
use envoy_types::pb::envoy::extensions::common::matching::v3::ExtensionWithMatcher;
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::Buffer;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::http::early_header_mutation::header_mutation::v3::HeaderMutation as EarlyHeaderMutation;
use envoy_types::pb::envoy::extensions::http::stateful_session::header::v3::HeaderBasedSessionState;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;
use envoy_types::pb::envoy::extensions::matching::common_inputs::network::v3::FilterStateInput;
use envoy_types::pb::envoy::r#type::matcher::v3::{HttpRequestHeaderMatchInput, HttpResponseHeaderMatchInput};
use envoy_types::pb::google::protobuf::{Any, Duration, StringValue};
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::predicate::{self, single_predicate};
use envoy_types::pb::xds::r#type::matcher::v3::matcher::{MatcherType, matcher_list::Predicate, on_match};
use envoy_types::pb::xds::r#type::matcher::v3::string_matcher::MatchPattern;
use mcp_affinity_filter::config::{FilterConfig, ReplayBy};
use mcp_affinity_filter::headers::MCP_SESSION_ID;
use mcp_affinity_filter::pin::PinEncoding;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value as Json;

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ─── files ──────────────────────────────────────────────────────────────────────────

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn envoy_dir() -> PathBuf {
    repo_root().join("envoy")
}

fn read(rel: &str) -> String {
    let path = envoy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All YAML files under envoy/, relative paths, sorted.
fn yaml_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(path.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(&envoy_dir(), &envoy_dir(), &mut out);
    out.sort();
    out
}

/// Parses every document of a YAML text into JSON values (as Envoy and Kubernetes do
/// before decoding). Empty documents are skipped.
fn yaml_docs(text: &str) -> Result<Vec<Json>, String> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let v = Json::deserialize(doc).map_err(|e| format!("YAML: {e}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn yaml_one(text: &str) -> Result<Json, String> {
    let mut docs = yaml_docs(text)?;
    ensure!(docs.len() == 1, "expected one YAML document, found {}", docs.len());
    Ok(docs.remove(0))
}

// ─── Envoy's v3 API ─────────────────────────────────────────────────────────────────

/// The `proto/` directory shipped inside the `envoy-types` crate: the same API version
/// as its generated types. Found through `cargo metadata` (override:
/// `ENVOY_API_PROTO_DIR`).
fn envoy_proto_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENVOY_API_PROTO_DIR") {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Json = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let pkg = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types in cargo metadata");
    Path::new(pkg["manifest_path"].as_str().unwrap()).parent().unwrap().join("proto")
}

/// Proto files whose messages the configs use (their imports come along).
const PROTO_FILES: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/wasm/v3/wasm.proto",
    "envoy/extensions/filters/http/buffer/v3/buffer.proto",
    "envoy/extensions/common/matching/v3/extension_matcher.proto",
    "envoy/extensions/filters/common/matcher/action/v3/skip_action.proto",
    "envoy/type/matcher/v3/http_inputs.proto",
    "envoy/type/matcher/v3/status_code_input.proto",
    "envoy/extensions/matching/common_inputs/network/v3/network_inputs.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/retry/priority/previous_priorities/v3/previous_priorities_config.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
    "envoy/extensions/filters/http/stateful_session/v3/stateful_session.proto",
    "envoy/extensions/filters/http/header_mutation/v3/header_mutation.proto",
    "envoy/extensions/http/stateful_session/header/v3/header.proto",
    "envoy/extensions/http/early_header_mutation/header_mutation/v3/header_mutation.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
];

struct EnvoyApi {
    pool: DescriptorPool,
}

fn api() -> &'static EnvoyApi {
    static API: OnceLock<EnvoyApi> = OnceLock::new();
    API.get_or_init(|| {
        let root = envoy_proto_dir();
        let includes: Vec<PathBuf> = ["data-plane-api", "xds", "googleapis", "protoc-gen-validate", "cel-spec/proto", "opentelemetry-proto", "client_model"]
            .iter()
            .map(|d| root.join(d))
            .filter(|p| p.is_dir())
            .collect();
        let mut compiler = protox::Compiler::new(&includes).expect("protox includes");
        compiler.include_imports(true);
        compiler.open_files(PROTO_FILES).unwrap_or_else(|e| panic!("compiling Envoy's protos from {}: {e:?}", root.display()));
        EnvoyApi { pool: compiler.descriptor_pool() }
    })
}

impl EnvoyApi {
    /// Reads `json` as the protobuf message `full_name` with the proto3 JSON mapping
    /// (strict: unknown fields are errors), then decodes it into the prost type `M`.
    fn decode<M: prost::Message + Default>(&self, full_name: &str, json: &Json) -> Result<M, String> {
        let desc = self.pool.get_message_by_name(full_name).ok_or_else(|| format!("{full_name} is not in the API"))?;
        let dynamic = DynamicMessage::deserialize(desc, json.clone()).map_err(|e| format!("{full_name}: {e}"))?;
        let bytes = prost::Message::encode_to_vec(&dynamic);
        M::decode(bytes.as_slice()).map_err(|e| format!("{full_name}: prost decode: {e}"))
    }
}

/// Unpacks an `Any` into `M`, checking its type URL.
fn unpack<M: prost::Message + prost::Name + Default>(any: &Any) -> Result<M, String> {
    ensure!(any.type_url == M::type_url(), "expected {}, found {}", M::type_url(), any.type_url);
    M::decode(any.value.as_slice()).map_err(|e| format!("{}: {e}", M::full_name()))
}

fn socket(addr: &Option<Address>) -> Option<(String, u32)> {
    match addr.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(s) => match s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => Some((s.address.clone(), p)),
            _ => None,
        },
        _ => None,
    }
}

fn cluster_endpoints(c: &Cluster) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for loc in c.load_assignment.iter().flat_map(|la| &la.endpoints) {
        for lb in &loc.lb_endpoints {
            if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier {
                out.extend(socket(&e.address));
            }
        }
    }
    out
}

fn discovery_type(c: &Cluster) -> Option<cluster::DiscoveryType> {
    match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(t).ok(),
        _ => None,
    }
}

fn original_dst_lb_config(c: &Cluster) -> Option<&cluster::OriginalDstLbConfig> {
    match &c.lb_config {
        Some(cluster::LbConfig::OriginalDstLbConfig(o)) => Some(o),
        _ => None,
    }
}

fn typed_config(f: &HttpFilter) -> Result<&Any, String> {
    match &f.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => Ok(any),
        _ => Err(format!("HTTP filter {} has no typed_config", f.name)),
    }
}

fn is_zero(d: &Option<Duration>) -> bool {
    matches!(d, Some(Duration { seconds: 0, nanos: 0 }))
}

// ─── the filter's configuration inside Envoy's wasm filter ──────────────────────────

/// The predicate the response matcher must skip the filter on, one line per condition
/// (sorted): a 2xx answer the filter did not ask for (filter state `wasm.` +
/// [`mcp_affinity_filter::machine::WANT_RESPONSE`], set on the request headers of a POST
/// without session id, a DELETE, a request under a backend id). Anything wider would hide
/// lost sessions or upstream failures from it.
const SKIP_WHEN: [&str; 2] = ["not filter state wasm.mcp_affinity.want_response is 1", "response status class is 2xx"];

/// With `recovery.replay_by: envoy_retry`, one more: the answer of control's replay listener
/// carries the session's new pin (`x-mcp-affinity-pin`, which always contains a space), and
/// must reach the filter.
const SKIP_WHEN_ENVOY_RETRY: [&str; 3] = [
    "not filter state wasm.mcp_affinity.want_response is 1",
    "not response header x-mcp-affinity-pin contains  ",
    "response status class is 2xx",
];

/// The predicate the request matcher (the first) must skip the filter on: an MCP
/// 2026-07-28 request that concerns no session and no task, where the filter has nothing
/// to do (its methods are those the filter looks at: [`mcp_affinity_filter::tasks`]).
const SKIP_REQUEST_WHEN: [&str; 3] = [
    "not any of [request header mcp-method is initialize, request header mcp-method is tools/call, request header mcp-method is tasks/get, request header mcp-method is tasks/update, request header mcp-method is tasks/cancel, request header mcp-method is subscriptions/listen]",
    "not request header mcp-session-id matches .+",
    "request header mcp-method matches .+",
];

/// The conditions the response matcher must skip the filter on, for its configuration.
fn skip_when(filter: &FilterConfig) -> Vec<&'static str> {
    match filter.recovery.replay_by {
        ReplayBy::Filter => SKIP_WHEN.to_vec(),
        ReplayBy::EnvoyRetry => SKIP_WHEN_ENVOY_RETRY.to_vec(),
    }
}

/// One condition of the matcher, in words (see [`SKIP_WHEN`]).
fn describe(p: &Predicate) -> Result<Vec<String>, String> {
    match p.match_type.as_ref().ok_or("empty predicate")? {
        predicate::MatchType::AndMatcher(list) => list.predicate.iter().map(describe).collect::<Result<Vec<_>, _>>().map(|v| v.concat()),
        predicate::MatchType::NotMatcher(inner) => Ok(describe(inner)?.into_iter().map(|d| format!("not {d}")).collect()),
        predicate::MatchType::OrMatcher(list) => {
            let any: Vec<String> = list.predicate.iter().map(describe).collect::<Result<Vec<_>, _>>()?.concat();
            Ok(vec![format!("any of [{}]", any.join(", "))])
        }
        predicate::MatchType::SinglePredicate(sp) => {
            let input = sp.input.as_ref().and_then(|i| i.typed_config.as_ref()).ok_or("single_predicate without input")?;
            let subject = match input.type_url.rsplit('.').next().unwrap_or_default() {
                "HttpRequestHeaderMatchInput" => format!("request header {}", unpack::<HttpRequestHeaderMatchInput>(input)?.header_name),
                "HttpResponseHeaderMatchInput" => format!("response header {}", unpack::<HttpResponseHeaderMatchInput>(input)?.header_name),
                "HttpResponseStatusCodeClassMatchInput" => "response status class".to_string(),
                "FilterStateInput" => format!("filter state {}", unpack::<FilterStateInput>(input)?.key),
                other => return Err(format!("unexpected matcher input {other}")),
            };
            let test = match &sp.matcher {
                Some(single_predicate::Matcher::ValueMatch(m)) => match &m.match_pattern {
                    Some(MatchPattern::Exact(v)) => format!("is {v}"),
                    Some(MatchPattern::Contains(v)) => format!("contains {v}"),
                    Some(MatchPattern::SafeRegex(r)) => format!("matches {}", r.regex),
                    other => return Err(format!("unexpected value_match {other:?}")),
                },
                _ => return Err("single_predicate without value_match".into()),
            };
            Ok(vec![format!("{subject} {test}")])
        }
    }
}

/// The `Wasm` configuration of the wasm HTTP filter entry. Wrapped in an
/// `ExtensionWithMatcher` (as shipped), the matcher must be one list matcher whose action
/// is `SkipFilter` exactly on [`skip_when`] its plugin configuration.
/// With `replay_by: filter`: Envoy's buffer filter runs before the wasm filter (`before`),
/// so a session's request reaches the filter whole before the router tries the pinned pod
/// (a replay needs the whole body; the router's local reply can come before a body that is
/// written after the headers); it holds at least `max_replay_body_bytes`, and its matcher
/// skips it only for requests without `Mcp-Session-Id`.
fn check_buffer_filter(before: &[HttpFilter], max_replay_body_bytes: usize) -> Check {
    let f = before.iter().find(|f| f.name == "envoy.filters.http.buffer").ok_or("replay_by filter: envoy.filters.http.buffer must come before the wasm filter")?;
    let any = typed_config(f)?;
    let (buffer, skip_header): (Buffer, Option<String>) = if any.type_url == <ExtensionWithMatcher as prost::Name>::type_url() {
        let wrapped: ExtensionWithMatcher = unpack(any)?;
        let inner = wrapped.extension_config.as_ref().and_then(|e| e.typed_config.as_ref()).ok_or("buffer ExtensionWithMatcher without extension_config")?;
        let matchers = match wrapped.xds_matcher.as_ref().and_then(|m| m.matcher_type.as_ref()) {
            Some(MatcherType::MatcherList(l)) => &l.matchers,
            _ => return Err("the buffer filter's matcher must be a matcher_list".into()),
        };
        let [m] = &matchers[..] else { return Err("the buffer filter's matcher must have one matcher".into()) };
        let header = match m.predicate.as_ref().and_then(|p| p.match_type.as_ref()) {
            Some(predicate::MatchType::NotMatcher(inner)) => match inner.match_type.as_ref() {
                Some(predicate::MatchType::SinglePredicate(sp)) => sp.input.as_ref().and_then(|i| i.typed_config.as_ref()).and_then(|a| unpack::<HttpRequestHeaderMatchInput>(a).ok()).map(|h| h.header_name),
                _ => None,
            },
            _ => None,
        };
        (unpack(inner)?, Some(header.ok_or("the buffer filter may be skipped only when a request has no mcp-session-id (not_matcher on that header)")?))
    } else {
        (unpack(any)?, None)
    };
    if let Some(h) = skip_header {
        ensure!(h.eq_ignore_ascii_case(MCP_SESSION_ID), "the buffer filter is skipped on header {h:?}: it must be skipped only for requests without {MCP_SESSION_ID}");
    }
    let max = buffer.max_request_bytes.map(|v| v.value as usize).unwrap_or(0);
    ensure!(max >= max_replay_body_bytes, "buffer max_request_bytes {max} must be at least recovery.max_replay_body_bytes {max_replay_body_bytes}");
    Ok(())
}

fn wasm_of(f: &HttpFilter) -> Result<Wasm, String> {
    let any = typed_config(f)?;
    if any.type_url != <ExtensionWithMatcher as prost::Name>::type_url() {
        return unpack(any);
    }
    let wrapped: ExtensionWithMatcher = unpack(any)?;
    let inner = wrapped.extension_config.as_ref().and_then(|e| e.typed_config.as_ref()).ok_or("ExtensionWithMatcher without extension_config")?;
    let wasm: Wasm = unpack(inner)?;
    let plugin = wasm.config.as_ref().and_then(|c| c.configuration.as_ref()).ok_or("wasm filter without configuration")?;
    let filter = FilterConfig::parse(unpack::<StringValue>(plugin)?.value.as_bytes())?;
    check_matcher(&wrapped, &skip_when(&filter))?;
    Ok(wasm)
}

/// The response matcher of the wasm filter: one list matcher whose action is `SkipFilter`
/// exactly on `skip`.
fn check_matcher(wrapped: &ExtensionWithMatcher, skip: &[&str]) -> Check {
    let matcher = wrapped.xds_matcher.as_ref().ok_or("ExtensionWithMatcher without xds_matcher")?;
    ensure!(matcher.on_no_match.is_none(), "the wasm filter's matcher must not act on no match");
    let Some(MatcherType::MatcherList(list)) = &matcher.matcher_type else { return Err("the wasm filter's matcher must be a matcher_list".into()) };
    let [request, response] = &list.matchers[..] else {
        return Err(format!("the wasm filter's matcher must have two matchers (request, then response), found {}", list.matchers.len()));
    };
    ensure!(SKIP_WHEN[0].ends_with(&format!("wasm.{} is 1", mcp_affinity_filter::machine::WANT_RESPONSE)), "SKIP_WHEN names the filter's property");
    ensure!(SKIP_WHEN_ENVOY_RETRY[1].contains(mcp_affinity_filter::headers::RECOVERED_PIN), "SKIP_WHEN_ENVOY_RETRY names the filter's header");
    let methods: Vec<&str> = [mcp_affinity_filter::jsonrpc::INITIALIZE, mcp_affinity_filter::tasks::TOOLS_CALL].into_iter().chain(mcp_affinity_filter::tasks::TASK_METHODS).chain([mcp_affinity_filter::tasks::SUBSCRIPTIONS_LISTEN]).collect();
    let named: Vec<String> = methods.iter().map(|m| format!("request header mcp-method is {m}")).collect();
    ensure!(SKIP_REQUEST_WHEN[0] == format!("not any of [{}]", named.join(", ")), "SKIP_REQUEST_WHEN names every method the filter looks at: {methods:?}");
    check_skip(request, "request", &SKIP_REQUEST_WHEN)?;
    // Evaluated at every stage of every request: a 2025-era request, which has no
    // Mcp-Method, must fail the first condition and read nothing else.
    let first = match request.predicate.as_ref().and_then(|p| p.match_type.as_ref()) {
        Some(predicate::MatchType::AndMatcher(list)) => list.predicate.first().map(describe).transpose()?.unwrap_or_default(),
        _ => Vec::new(),
    };
    ensure!(first == [SKIP_REQUEST_WHEN[2]], "the request matcher must test {:?} first, found {first:?}", SKIP_REQUEST_WHEN[2]);
    check_skip(response, "response", skip)
}

/// One matcher of the wasm filter's matcher list: `SkipFilter` exactly when `skip`.
fn check_skip(m: &envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::FieldMatcher, which: &str, skip: &[&str]) -> Check {
    let action = match m.on_match.as_ref().and_then(|o| o.on_match.as_ref()) {
        Some(on_match::OnMatch::Action(a)) => a.typed_config.as_ref().map(|t| t.type_url.as_str()).unwrap_or_default(),
        _ => return Err(format!("the {which} matcher's on_match must be an action")),
    };
    ensure!(action.ends_with("envoy.extensions.filters.common.matcher.action.v3.SkipFilter"), "the {which} matcher's action is {action}, want SkipFilter");
    let mut when = describe(m.predicate.as_ref().ok_or("matcher without predicate")?)?;
    when.sort();
    ensure!(when == skip, "the {which} matcher skips the filter when {when:?}; it must be exactly {skip:?}");
    Ok(())
}

/// What one wasm filter instance says.
struct WasmFilter {
    filter: FilterConfig,
    host_env_keys: Vec<String>,
}

fn check_wasm_filter(wasm: &Wasm, expect_file: Option<&str>) -> Result<WasmFilter, String> {
    let plugin = wasm.config.as_ref().ok_or("wasm filter without config")?;
    let vm = match &plugin.vm {
        Some(plugin_config::Vm::VmConfig(vm)) => vm,
        _ => return Err("wasm filter without vm_config".into()),
    };
    ensure!(vm.runtime == "envoy.wasm.runtime.v8", "vm_config.runtime is {:?}, want envoy.wasm.runtime.v8", vm.runtime);
    ensure!(!vm.vm_id.is_empty(), "vm_config.vm_id is empty: pins are shared per vm_id");
    let file = match vm.code.as_ref().and_then(|c| c.specifier.as_ref()) {
        Some(async_data_source::Specifier::Local(ds)) => match &ds.specifier {
            Some(data_source::Specifier::Filename(f)) => f.clone(),
            _ => return Err("vm_config.code.local must name a file".into()),
        },
        _ => return Err("vm_config.code must be a local file".into()),
    };
    if let Some(want) = expect_file {
        ensure!(file == want, "vm_config.code.local.filename is {file:?}, want {want:?}");
    }
    let configuration = plugin.configuration.as_ref().ok_or("wasm filter without configuration")?;
    let json: StringValue = unpack(configuration)?;
    let filter = FilterConfig::parse(json.value.as_bytes())?;
    let host_env_keys = vm.environment_variables.as_ref().map(|e| e.host_env_keys.clone()).unwrap_or_default();
    check_control_token(&filter, &host_env_keys)?;
    Ok(WasmFilter { filter, host_env_keys })
}

/// The shipped configurations show the filter's defaults, apart from the pin encoding
/// and who replays (both chosen by the pinning mechanism) and the control section (absent
/// by default).
fn check_defaults(filter: &FilterConfig) -> Check {
    let mut shown = filter.clone();
    shown.control = None;
    shown.pin_encoding = FilterConfig::default().pin_encoding;
    shown.recovery.replay_by = ReplayBy::default();
    ensure!(shown == FilterConfig::default(), "the plugin configuration departs from the filter's defaults: {shown:?}");
    Ok(())
}

/// The shipped configurations never carry an inline token, and the variable they name
/// is exposed to the VM.
fn check_control_token(filter: &FilterConfig, env_keys: &[String]) -> Check {
    let control = filter.control.as_ref().ok_or("the plugin configuration has no `control` section")?;
    ensure!(control.token.is_none(), "control.token is inline; use token_env");
    let var = control.token_env.as_deref().ok_or("control.token_env is not set")?;
    ensure!(env_keys.iter().any(|k| k == var), "control.token_env {var:?} is not exposed to the VM ({env_keys:?})");
    Ok(())
}

// ─── a bootstrap file ───────────────────────────────────────────────────────────────

/// Which pinning mechanism a bootstrap uses.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Pinning {
    OriginalDst,
    StatefulSession,
}

/// Control's default listen address, from control's own argument parser.
fn control_default_listen() -> std::net::SocketAddr {
    mcp_affinity_control::config::Config::try_parse_from(["mcp-affinity-control"]).expect("control defaults").listen
}

fn check_bootstrap(text: &str, pinning: Pinning) -> Check {
    let json = yaml_one(text)?;
    let bootstrap: Bootstrap = api().decode("envoy.config.bootstrap.v3.Bootstrap", &json)?;
    let control_listen = control_default_listen();

    // Admin: loopback, and not on a port anything else uses.
    let admin = bootstrap.admin.as_ref().ok_or("no admin")?;
    let (admin_ip, admin_port) = socket(&admin.address).ok_or("admin without a socket address")?;
    ensure!(admin_ip == "127.0.0.1" || admin_ip == "::1", "admin listens on {admin_ip}: keep it on loopback");
    ensure!(admin_port != u32::from(control_listen.port()), "admin port {admin_port} collides with control's {control_listen}");

    let resources = bootstrap.static_resources.as_ref().ok_or("no static_resources")?;
    let clusters: BTreeMap<&str, &Cluster> = resources.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
    ensure!(clusters.len() == resources.clusters.len(), "duplicate cluster names");

    ensure!(resources.listeners.len() == 1, "expected one listener, found {}", resources.listeners.len());
    let listener = &resources.listeners[0];
    let (_, listen_port) = socket(&listener.address).ok_or("listener without a socket address")?;
    ensure!(listen_port != admin_port && listen_port != u32::from(control_listen.port()), "listener port {listen_port} collides");
    let chain = listener.filter_chains.first().ok_or("listener without filter chain")?;
    let hcm_filter = chain.filters.first().ok_or("filter chain without filters")?;
    let hcm: HttpConnectionManager = match &hcm_filter.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => unpack(any)?,
        _ => return Err("network filter without typed_config".into()),
    };

    // HTTP filters: the wasm filter, then (stateful session), router last.
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    ensure!(names.last() == Some(&"envoy.filters.http.router"), "the router must be the last HTTP filter: {names:?}");
    let wasm_at = names.iter().position(|n| *n == "envoy.filters.http.wasm").ok_or("no envoy.filters.http.wasm filter")?;
    ensure!(typed_config(&hcm.http_filters[wasm_at])?.type_url == <ExtensionWithMatcher as prost::Name>::type_url(), "ship the wasm filter in its response matcher (ExtensionWithMatcher)");
    let wasm = wasm_of(&hcm.http_filters[wasm_at])?;
    let wf = check_wasm_filter(&wasm, Some("/etc/envoy/mcp_affinity_filter.wasm"))?;
    check_defaults(&wf.filter)?;
    let pin = wf.filter.pin_header.as_str();
    ensure!(wf.host_env_keys.iter().any(|k| k == "MCP_AFFINITY_CONTROL_TOKEN"), "host_env_keys must expose MCP_AFFINITY_CONTROL_TOKEN");

    if wf.filter.recovery.replay_by == ReplayBy::Filter {
        check_buffer_filter(&hcm.http_filters[..wasm_at], wf.filter.recovery.max_replay_body_bytes)?;
    }

    // The filter buffers bodies up to max_body_bytes; Envoy's own limit must be larger.
    let limit = listener.per_connection_buffer_limit_bytes.as_ref().map(|v| v.value as usize).unwrap_or(1 << 20);
    ensure!(limit > wf.filter.max_body_bytes, "per_connection_buffer_limit_bytes {limit} must exceed max_body_bytes {}", wf.filter.max_body_bytes);

    // The client's pin header is removed before anything else.
    let early_removes = hcm
        .early_header_mutation_extensions
        .iter()
        .filter_map(|ext| ext.typed_config.as_ref())
        .filter_map(|any| unpack::<EarlyHeaderMutation>(any).ok())
        .flat_map(|m| m.mutations)
        .any(|m| matches!(&m.action, Some(mutation::Action::Remove(h)) if h.eq_ignore_ascii_case(pin)));
    ensure!(early_removes, "early_header_mutation_extensions must remove {pin:?}");

    // Control: the cluster exists and points at control's port.
    let control = wf.filter.control.as_ref().unwrap();
    let control_cluster = clusters.get(control.cluster.as_str()).ok_or_else(|| format!("control.cluster {:?} is not a cluster", control.cluster))?;
    let endpoints = cluster_endpoints(control_cluster);
    ensure!(
        endpoints.iter().any(|(ip, port)| *port == u32::from(control_listen.port()) && ip == &control_listen.ip().to_string()),
        "cluster {} points at {endpoints:?}, control listens on {control_listen} by default",
        control.cluster
    );

    // Routes: every cluster exists; MCP routes have no timeout and an idle timeout.
    let route_config = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => rc,
        _ => return Err("the connection manager must carry its route_config".into()),
    };
    let routes: Vec<&Route> = route_config.virtual_hosts.iter().flat_map(|vh| &vh.routes).collect();
    ensure!(!routes.is_empty(), "no routes");
    let mut routed = Vec::new();
    let mut retrying = Vec::new();
    for r in &routes {
        let action = match &r.action {
            Some(route::Action::Route(a)) => a,
            _ => return Err(format!("route {:?} is not a cluster route", r.name)),
        };
        let target = match &action.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c.as_str(),
            _ => return Err(format!("route {:?} names no cluster", r.name)),
        };
        ensure!(clusters.contains_key(target), "route {:?} goes to cluster {target:?}, which does not exist", r.name);
        ensure!(is_zero(&action.timeout), "route {:?}: set `timeout: 0s` (SSE streams are long-lived)", r.name);
        ensure!(action.idle_timeout.is_some(), "route {:?}: set an idle_timeout", r.name);
        let present = |name: &str| {
            r.r#match.iter().flat_map(|m| &m.headers).any(|h| {
                h.name.eq_ignore_ascii_case(name) && matches!(h.header_match_specifier, Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)))
            })
        };
        if let Some(policy) = &action.retry_policy {
            if present(MCP_SESSION_ID) {
                ensure!(wf.filter.recovery.replay_by == ReplayBy::EnvoyRetry, "route {:?}: no retries (MCP requests are not idempotent; only control, with replay_by envoy_retry, may replay)", r.name);
                check_retry_policy(policy, &wf.filter).map_err(|e| format!("route {:?}: {e}", r.name))?;
                retrying.push(target);
            } else {
                check_unsent_retry_policy(policy).map_err(|e| format!("route {:?}: {e}", r.name))?;
            }
        }
        routed.push((target, present(pin)));
    }
    if wf.filter.recovery.replay_by == ReplayBy::EnvoyRetry {
        ensure!(pinning == Pinning::StatefulSession, "replay_by envoy_retry needs the stateful-session override (an ORIGINAL_DST retry follows the pin header back to the failed pod)");
        let target = retrying.first().ok_or("replay_by envoy_retry, but no route retries to control")?;
        let replay_at: Vec<u32> = clusters[target].load_assignment.iter().flat_map(|la| &la.endpoints).map(|l| l.priority).filter(|p| *p > 0).collect();
        ensure!(replay_at == [1], "cluster {target}: control's replay listener must be its one priority-1 endpoint group (the retry's previous_priorities target), found priorities {replay_at:?}");
        let max_retries = clusters[target].circuit_breakers.iter().flat_map(|c| &c.thresholds).filter(|t| t.priority == 0).find_map(|t| t.max_retries.as_ref()).map_or(3, |m| m.value);
        ensure!(max_retries >= 1000, "cluster {target}: circuit_breakers max_retries {max_retries}: a dead pod's sessions are all retried to control at once (Envoy's default allows 3)");
        check_replay_mtls(clusters[target])?;
    }
    ensure!(is_zero(&hcm.request_timeout) || hcm.request_timeout.is_none(), "request_timeout must be off for SSE");

    match pinning {
        Pinning::OriginalDst => {
            ensure!(wf.filter.pin_encoding == PinEncoding::Plain, "ORIGINAL_DST reads ip:port: pin_encoding must be plain");
            let pinned: Vec<&Cluster> = clusters.values().copied().filter(|c| discovery_type(c) == Some(cluster::DiscoveryType::OriginalDst)).collect();
            ensure!(pinned.len() == 1, "expected one ORIGINAL_DST cluster, found {}", pinned.len());
            let pc = pinned[0];
            ensure!(pc.lb_policy == cluster::LbPolicy::ClusterProvided as i32, "cluster {} needs lb_policy CLUSTER_PROVIDED", pc.name);
            let odl = original_dst_lb_config(pc).ok_or_else(|| format!("cluster {} has no original_dst_lb_config", pc.name))?;
            ensure!(odl.use_http_header, "cluster {}: original_dst_lb_config.use_http_header must be true", pc.name);
            ensure!(odl.http_header_name.eq_ignore_ascii_case(pin), "cluster {} reads {:?}, the filter writes {pin:?}", pc.name, odl.http_header_name);
            // The first route matching the pin header goes to the ORIGINAL_DST cluster, and
            // comes before any catch-all; unpinned traffic goes to a normal cluster.
            let first_pin = routed.iter().position(|(_, p)| *p).ok_or_else(|| format!("no route matches on {pin:?} being present"))?;
            ensure!(routed[first_pin].0 == pc.name, "the route on {pin:?} goes to {:?}, not {}", routed[first_pin].0, pc.name);
            let first_plain = routed.iter().position(|(_, p)| !*p).ok_or("no route for unpinned traffic")?;
            ensure!(first_pin < first_plain, "the route on {pin:?} must come before the catch-all route");
            let service = clusters[routed[first_plain].0];
            ensure!(discovery_type(service) != Some(cluster::DiscoveryType::OriginalDst), "unpinned traffic must not go to an ORIGINAL_DST cluster");
            ensure!(!cluster_endpoints(service).is_empty(), "cluster {} has no endpoints", service.name);
        }
        Pinning::StatefulSession => {
            ensure!(wf.filter.pin_encoding == PinEncoding::Base64, "the stateful-session header extension reads base64: pin_encoding must be base64");
            ensure!(clusters.values().all(|c| discovery_type(c) != Some(cluster::DiscoveryType::OriginalDst)), "no ORIGINAL_DST cluster in the stateful-session variant");
            let ss_at = names.iter().position(|n| *n == "envoy.filters.http.stateful_session").ok_or("no envoy.filters.http.stateful_session filter")?;
            ensure!(wasm_at < ss_at, "the wasm filter must come before stateful_session (which reads {pin:?})");
            let ss: StatefulSession = unpack(typed_config(&hcm.http_filters[ss_at])?)?;
            let state = ss.session_state.as_ref().ok_or("stateful_session without session_state")?;
            ensure!(state.name == "envoy.http.stateful_session.header", "session_state is {:?}", state.name);
            let header: HeaderBasedSessionState = unpack(state.typed_config.as_ref().ok_or("session_state without typed_config")?)?;
            ensure!(header.name.eq_ignore_ascii_case(pin), "stateful session reads {:?}, the filter writes {pin:?}", header.name);
            ensure!(routed.iter().all(|(_, p)| !*p), "no route should depend on {pin:?} here");
            let targets: BTreeSet<&str> = routed.iter().map(|(t, _)| *t).collect();
            ensure!(targets.len() == 1, "the MCP routes must all go to one cluster (the override picks a member of it): {targets:?}");
            // The response header the extension adds is removed again.
            let removes_response = hcm.http_filters[..ss_at].iter().filter(|f| f.name == "envoy.filters.http.header_mutation").any(|f| {
                typed_config(f)
                    .and_then(unpack::<HeaderMutationFilter>)
                    .map(|h| {
                        h.mutations.iter().flat_map(|m| &m.response_mutations).any(|m| matches!(&m.action, Some(mutation::Action::Remove(x)) if x.eq_ignore_ascii_case(pin)))
                    })
                    .unwrap_or(false)
            });
            ensure!(removes_response, "a header_mutation filter before stateful_session must remove {pin:?} from responses");
        }
    }
    Ok(())
}

/// The replay listener (priority 1 of `cluster`) is reached over mutual TLS, and only it:
/// each of its endpoints carries the metadata of a `transport_socket_matches` entry whose
/// TLS context presents a client certificate and verifies control's against a CA; the
/// pods' endpoints (priority 0) match no entry and stay plain.
fn check_replay_mtls(cluster: &Cluster) -> Check {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{UpstreamTlsContext, common_tls_context};
    let key = "envoy.transport_socket_match";
    let criteria = |lb: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint| lb.metadata.as_ref().and_then(|m| m.filter_metadata.get(key)).cloned();
    let groups = cluster.load_assignment.iter().flat_map(|la| &la.endpoints);
    for g in groups {
        for lb in &g.lb_endpoints {
            match (g.priority, criteria(lb)) {
                (0, Some(_)) => return Err(format!("cluster {}: a pod's endpoint carries {key} metadata: pods must not get the replay listener's client certificate", cluster.name)),
                (0, None) => {}
                (_, None) => return Err(format!("cluster {}: the replay listener's endpoint needs {key} metadata selecting its mutual-TLS transport socket", cluster.name)),
                (_, Some(want)) => {
                    let m = cluster.transport_socket_matches.iter().find(|m| m.r#match.as_ref() == Some(&want)).ok_or_else(|| format!("cluster {}: no transport_socket_matches entry matches the replay endpoint's metadata", cluster.name))?;
                    let any = m.transport_socket.as_ref().and_then(|t| match &t.config_type {
                        Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => Some(a),
                        _ => None,
                    }).ok_or("replay transport socket without typed_config")?;
                    let tls: UpstreamTlsContext = unpack(any)?;
                    let common = tls.common_tls_context.ok_or("replay UpstreamTlsContext without common_tls_context")?;
                    ensure!(!common.tls_certificates.is_empty(), "the replay transport socket must present a client certificate (tls_certificates): control accepts Envoy's only");
                    let verifies = matches!(&common.validation_context_type, Some(common_tls_context::ValidationContextType::ValidationContext(v)) if v.trusted_ca.is_some());
                    ensure!(verifies, "the replay transport socket must verify control's certificate (validation_context.trusted_ca)");
                }
            }
        }
    }
    Ok(())
}

/// A route's retry policy with `replay_by: envoy_retry`: one retry, to the next priority
/// (control), on exactly the failures after which a request provably did not run (connect
/// failure, a "session unknown" status), never on a reset after the request was sent.
/// A retry of requests without a session may only resend what never left Envoy: a connect
/// failure, to another host, never to control (no retry priority).
fn check_unsent_retry_policy(policy: &RetryPolicy) -> Check {
    ensure!(policy.retry_on.trim() == "connect-failure", "retry_on {:?}: a request without a session may be retried only after a connect failure (it never reached a pod; MCP requests are not idempotent)", policy.retry_on);
    ensure!(policy.retriable_status_codes.is_empty() && policy.retry_priority.is_none(), "retriable_status_codes or retry_priority: only connect failures are retried here, and never to control");
    ensure!(
        policy.retry_host_predicate.iter().any(|p| p.name == "envoy.retry_host_predicates.previous_hosts"),
        "no envoy.retry_host_predicates.previous_hosts: the retry must go to another pod"
    );
    Ok(())
}

fn check_retry_policy(policy: &RetryPolicy, filter: &FilterConfig) -> Check {
    let on: BTreeSet<&str> = policy.retry_on.split(',').map(str::trim).collect();
    ensure!(on == BTreeSet::from(["connect-failure", "retriable-status-codes"]), "retry_on {:?}: must be exactly connect-failure,retriable-status-codes", policy.retry_on);
    let unknown = &filter.recovery.session_unknown_statuses;
    ensure!(unknown.iter().all(|s| policy.retriable_status_codes.contains(&u32::from(*s))), "retriable_status_codes {:?} must include session_unknown_statuses {unknown:?}", policy.retriable_status_codes);
    let suspect = &filter.recovery.error_body_statuses;
    ensure!(suspect.iter().all(|s| policy.retriable_status_codes.contains(&u32::from(*s))), "retriable_status_codes {:?} must include error_body_statuses {suspect:?} (control probes them)", policy.retriable_status_codes);
    ensure!(policy.num_retries.as_ref().map(|n| n.value) == Some(1), "num_retries must be 1 (one retry, to control)");
    let priority = policy.retry_priority.as_ref().ok_or("no retry_priority: the retry must skip priority 0 (previous_priorities)")?;
    ensure!(priority.name == "envoy.retry_priorities.previous_priorities", "retry_priority {:?}: must be envoy.retry_priorities.previous_priorities", priority.name);
    let Some(retry_priority::ConfigType::TypedConfig(any)) = &priority.config_type else { return Err("retry_priority without typed_config".into()) };
    let config: PreviousPrioritiesConfig = unpack(any)?;
    ensure!(config.update_frequency == 1, "previous_priorities update_frequency {}: must be 1 (skip priority 0 after its one attempt)", config.update_frequency);
    Ok(())
}

// ─── Kubernetes and Istio ───────────────────────────────────────────────────────────

fn s<'a>(v: &'a Json, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Json::as_str).unwrap_or("")
}

fn labels(v: &Json, ptr: &str) -> BTreeMap<String, String> {
    v.pointer(ptr)
        .and_then(Json::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

fn subset(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> bool {
    !a.is_empty() && a.iter().all(|(k, v)| b.get(k) == Some(v))
}

/// All Kubernetes objects of envoy/k8s and envoy/istio, keyed by "Kind/namespace/name".
fn objects(texts: &[(String, String)]) -> Result<BTreeMap<String, Json>, String> {
    let mut out = BTreeMap::new();
    for (file, text) in texts {
        for doc in yaml_docs(text).map_err(|e| format!("{file}: {e}"))? {
            let kind = s(&doc, "/kind");
            let name = s(&doc, "/metadata/name");
            ensure!(!kind.is_empty() && !name.is_empty() && !s(&doc, "/apiVersion").is_empty(), "{file}: a document without apiVersion, kind or metadata.name");
            let key = format!("{kind}/{}/{name}", s(&doc, "/metadata/namespace"));
            ensure!(out.insert(key.clone(), doc).is_none(), "{file}: {key} defined twice");
        }
    }
    Ok(out)
}

/// The manifests: envoy/k8s's resources and envoy/istio; not the kustomization itself nor
/// the files it generates ConfigMaps from (envoy/k8s/envoy/: the Envoy bootstrap).
fn manifest_texts() -> Vec<(String, String)> {
    yaml_files()
        .into_iter()
        .filter(|f| (f.starts_with("k8s/") && f != "k8s/kustomization.yaml" && !f.starts_with("k8s/envoy/")) || f.starts_with("istio/"))
        .map(|f| (f.clone(), read(&f)))
        .collect()
}

fn containers(workload: &Json) -> Vec<&Json> {
    workload.pointer("/spec/template/spec/containers").and_then(Json::as_array).map(|a| a.iter().collect()).unwrap_or_default()
}

fn port_by_name(workload: &Json, name: &str) -> Option<u64> {
    containers(workload)
        .into_iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
}

/// The workload (Deployment/StatefulSet) whose pod labels a Service selects.
fn selected<'a>(objs: &'a BTreeMap<String, Json>, svc: &Json) -> Option<&'a Json> {
    let sel = labels(svc, "/spec/selector");
    let ns = s(svc, "/metadata/namespace");
    objs.values().find(|o| {
        matches!(s(o, "/kind"), "Deployment" | "StatefulSet") && s(o, "/metadata/namespace") == ns && subset(&sel, &labels(o, "/spec/template/metadata/labels"))
    })
}

fn check_manifests(objs: &BTreeMap<String, Json>) -> Check {
    let ns_defined: BTreeSet<&str> = objs.values().filter(|o| s(o, "/kind") == "Namespace").map(|o| s(o, "/metadata/name")).collect();
    for (key, o) in objs {
        let kind = s(o, "/kind");
        let ns = s(o, "/metadata/namespace");
        if kind != "Namespace" {
            ensure!(!ns.is_empty(), "{key}: set metadata.namespace");
            ensure!(ns == "istio-system" || ns_defined.contains(ns), "{key}: namespace {ns:?} is not defined in envoy/k8s");
        }
        if matches!(kind, "Deployment" | "StatefulSet") {
            let sel = labels(o, "/spec/selector/matchLabels");
            ensure!(subset(&sel, &labels(o, "/spec/template/metadata/labels")), "{key}: selector does not match the pod template's labels");
            for c in containers(o) {
                ensure!(c.pointer("/resources/requests").is_some(), "{key}: container {} has no resource requests", c["name"]);
                ensure!(c.pointer("/securityContext/allowPrivilegeEscalation") == Some(&Json::Bool(false)), "{key}: container {} may escalate privileges", c["name"]);
            }
            ensure!(o.pointer("/spec/template/spec/securityContext/runAsNonRoot") == Some(&Json::Bool(true)), "{key}: pods must run as non-root");
        }
        if kind == "StatefulSet" {
            let svc = format!("Service/{ns}/{}", s(o, "/spec/serviceName"));
            let svc = objs.get(&svc).ok_or_else(|| format!("{key}: serviceName {svc} does not exist"))?;
            ensure!(s(svc, "/spec/clusterIP") == "None", "{key}: its serviceName must be a headless Service (clusterIP: None)");
        }
        if kind == "Service" {
            let w = selected(objs, o).ok_or_else(|| format!("{key}: its selector matches no Deployment or StatefulSet"))?;
            for p in o["spec"]["ports"].as_array().cloned().unwrap_or_default() {
                match &p["targetPort"] {
                    Json::String(name) => ensure!(port_by_name(w, name).is_some(), "{key}: targetPort {name:?} is not a container port of the selected pods"),
                    Json::Number(n) => ensure!(
                        containers(w).iter().flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default()).any(|cp| cp["containerPort"].as_u64() == n.as_u64()),
                        "{key}: targetPort {n} is not a container port"
                    ),
                    _ => {}
                }
            }
        }
    }
    check_control_manifest(objs)
}

/// Port of Service `name` in `ns` (the first one).
fn service_port(objs: &BTreeMap<String, Json>, ns: &str, name: &str) -> Option<u64> {
    objs.get(&format!("Service/{ns}/{name}")).and_then(|svc| svc.pointer("/spec/ports/0/port")).and_then(Json::as_u64)
}

fn check_control_manifest(objs: &BTreeMap<String, Json>) -> Check {
    let (key, dep) = objs
        .iter()
        .find(|(_, o)| s(o, "/kind") == "Deployment" && s(o, "/metadata/name") == "mcp-affinity-control")
        .ok_or("no Deployment mcp-affinity-control")?;
    let ns = s(dep, "/metadata/namespace");
    let c = containers(dep).into_iter().next().ok_or("control has no container")?;
    // The arguments are accepted by control's own parser.
    let args: Vec<String> = c["args"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
    let config = mcp_affinity_control::config::Config::try_parse_from(std::iter::once("mcp-affinity-control".to_string()).chain(args.iter().cloned()))
        .map_err(|e| format!("{key}: control rejects its arguments: {e}"))?;
    ensure!(!config.listen.ip().is_loopback(), "{key}: --listen {} is loopback; the Service cannot reach it", config.listen);
    let port = u64::from(config.listen.port());
    ensure!(port_by_name(dep, "http") == Some(port), "{key}: container port `http` must be control's --listen port {port}");
    ensure!(service_port(objs, ns, "mcp-affinity-control") == Some(port), "Service {ns}/mcp-affinity-control must expose port {port}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        ensure!(c.pointer(&format!("/{probe}/httpGet/path")).and_then(Json::as_str) == Some(path), "{key}: {probe} must GET {path}");
        let p = c.pointer(&format!("/{probe}/httpGet/port")).cloned().unwrap_or(Json::Null);
        ensure!(p.as_str() == Some("http") || p.as_u64() == Some(port), "{key}: {probe} must use control's port");
    }
    // The token file comes from the Secret, through a mounted volume.
    let token_file = config.token_file.as_ref().ok_or_else(|| format!("{key}: pass the token with --token-file"))?;
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| token_file.starts_with(s(m, "/mountPath")))
        .ok_or_else(|| format!("{key}: no volume mounted at {}", token_file.display()))?;
    let vol = dep
        .pointer("/spec/template/spec/volumes")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .ok_or("control's token volume is not defined")?;
    let secret = format!("Secret/{ns}/{}", s(vol, "/secret/secretName"));
    let secret = objs.get(&secret).ok_or_else(|| format!("{key}: {secret} does not exist"))?;
    let file_name = token_file.file_name().unwrap().to_string_lossy().into_owned();
    let item = vol.pointer("/secret/items").and_then(Json::as_array).into_iter().flatten().find(|i| i["path"] == file_name.as_str());
    let key_name = item.map(|i| s(i, "/key").to_string()).unwrap_or(file_name);
    ensure!(secret.pointer(&format!("/stringData/{key_name}")).is_some() || secret.pointer(&format!("/data/{key_name}")).is_some(), "Secret has no key {key_name:?}");
    // The store is the Redis Service.
    if let mcp_affinity_control::config::StoreKind::Redis(url) = &config.store {
        let hostport = url.trim_start_matches("redis://").trim_start_matches("rediss://").split('/').next().unwrap();
        let (host, p) = hostport.rsplit_once(':').ok_or("redis URL without port")?;
        let parts: Vec<&str> = host.split('.').collect();
        ensure!(parts.len() >= 2, "{key}: use the Redis Service's namespaced name");
        ensure!(service_port(objs, parts[1], parts[0]).map(|x| x.to_string()) == Some(p.to_string()), "{key}: --store {url} is not a Service port");
    } else {
        return Err(format!("{key}: use Redis (--store redis://…) so every control replica shares the records"));
    }
    check_draining(objs, key, &config)?;
    check_endpointslice_rbac(objs)
}

/// The optional EndpointSlice drain source (control-endpointslices.yaml): a RoleBinding of
/// control's ServiceAccount to a Role that may list and watch EndpointSlices in the
/// namespace of the MCP servers' Service.
fn check_endpointslice_rbac(objs: &BTreeMap<String, Json>) -> Check {
    let Some((key, binding)) = objs.iter().find(|(_, o)| s(o, "/kind") == "RoleBinding" && s(o, "/metadata/name") == "mcp-affinity-control-endpointslices") else {
        return Err("no RoleBinding mcp-affinity-control-endpointslices (envoy/k8s/control-endpointslices.yaml)".into());
    };
    let ns = s(binding, "/metadata/namespace");
    let role = objs.get(&format!("Role/{ns}/{}", s(binding, "/roleRef/name"))).ok_or_else(|| format!("{key}: its Role does not exist"))?;
    let subject = binding.pointer("/subjects/0").ok_or_else(|| format!("{key}: no subject"))?;
    ensure!(objs.contains_key(&format!("ServiceAccount/{}/{}", s(subject, "/namespace"), s(subject, "/name"))), "{key}: its ServiceAccount does not exist");
    let grants = |verb: &str| {
        role["rules"].as_array().into_iter().flatten().any(|r| {
            let has = |field: &str, v: &str| r[field].as_array().is_some_and(|a| a.iter().any(|x| x == v));
            has("apiGroups", "discovery.k8s.io") && has("resources", "endpointslices") && has("verbs", verb)
        })
    };
    ensure!(grants("list") && grants("watch"), "{key}: the Role must allow list and watch on discovery.k8s.io endpointslices");
    let sts = objs.values().find(|o| s(o, "/kind") == "StatefulSet" && s(o, "/metadata/name") == "mcp-server").ok_or("no StatefulSet mcp-server")?;
    ensure!(s(sts, "/metadata/namespace") == ns, "{key}: the Role must be in the MCP servers' namespace");
    Ok(())
}

/// Rolling updates drain (envoy/README.md): control resolves the MCP servers' headless
/// Service (`--endpoints-dns`), and each MCP server pod stays up in `preStop` longer than
/// control's DNS refresh plus the filter's drain poll (1 s), within its grace period.
fn check_draining(objs: &BTreeMap<String, Json>, key: &str, config: &mcp_affinity_control::config::Config) -> Check {
    let (sts_key, sts) = objs
        .iter()
        .find(|(_, o)| s(o, "/kind") == "StatefulSet" && s(o, "/metadata/name") == "mcp-server")
        .ok_or("no StatefulSet mcp-server")?;
    let ns = s(sts, "/metadata/namespace");
    let svc = s(sts, "/spec/serviceName");
    let port = service_port(objs, ns, svc).ok_or_else(|| format!("{sts_key}: Service {svc} has no port"))?;
    let want = format!("{svc}.{ns}.svc.cluster.local:{port}");
    ensure!(config.endpoints_dns.as_deref() == Some(want.as_str()), "{key}: --endpoints-dns must be {want} (the MCP servers' headless Service), got {:?}", config.endpoints_dns);
    let c = containers(sts).into_iter().next().ok_or("mcp-server has no container")?;
    let hook = c.pointer("/lifecycle/preStop").ok_or_else(|| format!("{sts_key}: no preStop hook: the pod must keep serving while its sessions are moved"))?;
    let sleep = hook.pointer("/sleep/seconds").and_then(Json::as_u64).unwrap_or(0);
    ensure!(sleep > config.endpoints_refresh_secs + 1 || hook.get("exec").is_some(), "{sts_key}: preStop sleep {sleep} s must exceed --endpoints-refresh-secs ({}) + the filter's drain poll (1 s)", config.endpoints_refresh_secs);
    let grace = sts.pointer("/spec/template/spec/terminationGracePeriodSeconds").and_then(Json::as_u64).unwrap_or(30);
    ensure!(grace > sleep, "{sts_key}: terminationGracePeriodSeconds {grace} must exceed the preStop sleep {sleep} (the server needs time to stop after it)");
    Ok(())
}

/// Istio's name of the outbound cluster of a Service port.
fn istio_cluster(objs: &BTreeMap<String, Json>, cluster: &str) -> Check {
    let parts: Vec<&str> = cluster.split('|').collect();
    ensure!(parts.len() == 4 && parts[0] == "outbound", "control.cluster {cluster:?} is not an Istio outbound cluster name (outbound|PORT||HOST)");
    let host: Vec<&str> = parts[3].split('.').collect();
    ensure!(host.len() >= 2 && parts[3].ends_with(".svc.cluster.local"), "control.cluster host {:?} is not a Service FQDN", parts[3]);
    let port = service_port(objs, host[1], host[0]).ok_or_else(|| format!("control.cluster names Service {}/{}, which does not exist", host[1], host[0]))?;
    ensure!(parts[1] == port.to_string(), "control.cluster uses port {}, the Service exposes {port}", parts[1]);
    Ok(())
}

fn check_istio(objs: &BTreeMap<String, Json>, wasmplugin_text: &str, envoyfilter_text: &str) -> Check {
    // WasmPlugin.
    let wp = objs.values().find(|o| s(o, "/kind") == "WasmPlugin").ok_or("no WasmPlugin")?;
    ensure!(s(wp, "/spec/url").starts_with("oci://"), "the WasmPlugin url must be an oci:// image");
    ensure!(wasmplugin_text.contains("file://"), "wasmplugin.yaml must show the file:// alternative");
    ensure!(matches!(s(wp, "/spec/phase"), "AUTHN" | "AUTHZ" | "STATS"), "WasmPlugin phase {:?}: the filter must run before Istio's stateful-session filter", s(wp, "/spec/phase"));
    let plugin_config = wp.pointer("/spec/pluginConfig").ok_or("WasmPlugin without pluginConfig")?;
    let filter = FilterConfig::parse(&serde_json::to_vec(plugin_config).unwrap())?;
    ensure!(filter.pin_encoding == PinEncoding::Base64, "Istio persistent sessions read base64: pin_encoding must be base64");
    check_defaults(&filter)?;
    let env: Vec<String> = wp
        .pointer("/spec/vmConfig/env")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e["valueFrom"] == "HOST")
        .map(|e| s(e, "/name").to_string())
        .collect();
    check_control_token(&filter, &env)?;
    istio_cluster(objs, &filter.control.as_ref().unwrap().cluster)?;

    // The Service carrying the persistent-session label: names the filter's header, and
    // selects the MCP server pods.
    let svc = objs
        .values()
        .find(|o| s(o, "/kind") == "Service" && o.pointer("/metadata/labels/istio.io~1persistent-session-header").is_some())
        .ok_or("no Service labelled istio.io/persistent-session-header")?;
    let label = s(svc, "/metadata/labels/istio.io~1persistent-session-header");
    ensure!(label.eq_ignore_ascii_case(&filter.pin_header), "the Service's persistent-session header is {label:?}, the filter writes {:?}", filter.pin_header);
    ensure!(s(svc, "/spec/clusterIP") != "None", "persistent sessions need a ClusterIP Service, not a headless one");
    let pods = selected(objs, svc).ok_or("the persistent-session Service selects no workload")?;
    ensure!(s(pods, "/metadata/name") == "mcp-server", "the persistent-session Service must select the MCP server");

    // The VirtualService routes to that Service, without a timeout.
    let fqdn = format!("{}.{}.svc.cluster.local", s(svc, "/metadata/name"), s(svc, "/metadata/namespace"));
    let vs = objs.values().find(|o| s(o, "/kind") == "VirtualService").ok_or("no VirtualService")?;
    for http in vs.pointer("/spec/http").and_then(Json::as_array).into_iter().flatten() {
        ensure!(s(http, "/timeout") == "0s", "VirtualService route {:?}: timeout 0s for SSE", http["name"]);
        for d in http["route"].as_array().into_iter().flatten() {
            ensure!(s(d, "/destination/host") == fqdn, "VirtualService routes to {:?}, not {fqdn}", s(d, "/destination/host"));
            ensure!(d.pointer("/destination/port/number").and_then(Json::as_u64) == svc.pointer("/spec/ports/0/port").and_then(Json::as_u64), "VirtualService port differs from the Service's");
        }
    }

    // EnvoyFilter: every patch value is Envoy config of the type its applyTo implies.
    ensure!(envoyfilter_text.contains("mTLS") && envoyfilter_text.contains("PLAINTEXT"), "envoyfilter.yaml must explain its mTLS caveat");
    let ef = objs.values().find(|o| s(o, "/kind") == "EnvoyFilter").ok_or("no EnvoyFilter")?;
    let mut ef_filter = None;
    let mut ef_clusters = BTreeMap::new();
    let mut ef_routes = Vec::new();
    for patch in ef.pointer("/spec/configPatches").and_then(Json::as_array).into_iter().flatten() {
        let value = patch.pointer("/patch/value").ok_or("EnvoyFilter patch without value")?;
        match s(patch, "/applyTo") {
            "HTTP_FILTER" => {
                let f: HttpFilter = api().decode("envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter", value)?;
                let wasm = wasm_of(&f)?;
                ef_filter = Some(check_wasm_filter(&wasm, None)?.filter);
            }
            "CLUSTER" => {
                let c: Cluster = api().decode("envoy.config.cluster.v3.Cluster", value)?;
                ef_clusters.insert(c.name.clone(), c);
            }
            "HTTP_ROUTE" => {
                let r: Route = api().decode("envoy.config.route.v3.Route", value)?;
                ensure!(vs.pointer("/spec/http").and_then(Json::as_array).into_iter().flatten().any(|h| h["name"] == s(patch, "/match/routeConfiguration/vhost/route/name")), "the EnvoyFilter's HTTP_ROUTE match names no VirtualService route");
                ef_routes.push(r);
            }
            other => return Err(format!("EnvoyFilter: unexpected applyTo {other:?}")),
        }
    }
    let ef_filter = ef_filter.ok_or("the EnvoyFilter adds no wasm filter")?;
    istio_cluster(objs, &ef_filter.control.as_ref().unwrap().cluster)?;
    ensure!(ef_filter.pin_encoding == PinEncoding::Plain, "the EnvoyFilter variant uses ORIGINAL_DST: pin_encoding plain");
    for r in &ef_routes {
        let Some(route::Action::Route(a)) = &r.action else { return Err("EnvoyFilter route is not a cluster route".into()) };
        let Some(route_action::ClusterSpecifier::Cluster(c)) = &a.cluster_specifier else { return Err("EnvoyFilter route names no cluster".into()) };
        let c = ef_clusters.get(c).ok_or_else(|| format!("EnvoyFilter route goes to {c:?}, which it does not add"))?;
        let odl = original_dst_lb_config(c).ok_or("EnvoyFilter cluster without original_dst_lb_config")?;
        ensure!(odl.use_http_header && odl.http_header_name.eq_ignore_ascii_case(&ef_filter.pin_header), "EnvoyFilter cluster reads {:?}, the filter writes {:?}", odl.http_header_name, ef_filter.pin_header);
        ensure!(is_zero(&a.timeout), "EnvoyFilter route: timeout 0s");
    }
    ensure!(!ef_routes.is_empty(), "the EnvoyFilter adds no route");
    Ok(())
}

// ─── the Envoy gateway on Kubernetes (envoy/k8s/envoy.yaml) ─────────────────────────

fn cluster_json<'a>(b: &'a Json, name: &str) -> Option<&'a Json> {
    b.pointer("/static_resources/clusters")?.as_array()?.iter().find(|c| c["name"] == name)
}

fn listener_json<'a>(b: &'a Json, name: &str) -> Option<&'a Json> {
    b.pointer("/static_resources/listeners")?.as_array()?.iter().find(|l| l["name"] == name)
}

/// (priority, "host:port") of every endpoint of a cluster.
fn endpoint_json(c: &Json) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for g in c.pointer("/load_assignment/endpoints").and_then(Json::as_array).into_iter().flatten() {
        let prio = g["priority"].as_u64().unwrap_or(0);
        for lb in g["lb_endpoints"].as_array().into_iter().flatten() {
            let sa = &lb["endpoint"]["address"]["socket_address"];
            out.push((prio, format!("{}:{}", s(sa, "/address"), sa["port_value"])));
        }
    }
    out
}

/// A cluster without what differs between loopback and Kubernetes: discovery type, DNS
/// family, endpoint addresses (priorities and metadata stay).
fn cluster_shape(c: &Json) -> Json {
    let mut c = c.clone();
    let o = c.as_object_mut().unwrap();
    o.remove("type");
    o.remove("dns_lookup_family");
    if let Some(groups) = c.pointer_mut("/load_assignment/endpoints").and_then(Json::as_array_mut) {
        for g in groups {
            if let Some(lbs) = g.get_mut("lb_endpoints").and_then(Json::as_array_mut) {
                lbs.truncate(1);
                for lb in lbs {
                    lb["endpoint"]["address"] = Json::Null;
                }
            }
        }
    }
    c
}

/// The Kubernetes bootstrap (envoy/k8s/envoy/envoy.yaml, generated from the default one by
/// scripts/k8s-bootstrap.py; `make test-k8s` checks it is up to date) is the default
/// bootstrap with upstreams by Service DNS: same admin, same `mcp` listener (filters, the
/// filter's configuration, routes), same clusters but for their addresses; and the Envoy
/// Deployment mounts it, the filter's token and the replay listener's certificates where
/// it expects them.
fn check_k8s_envoy(objs: &BTreeMap<String, Json>, default_text: &str, k8s_text: &str, kustomization: &str) -> Check {
    let d = yaml_one(default_text)?;
    let k = yaml_one(k8s_text)?;
    let _: Bootstrap = api().decode("envoy.config.bootstrap.v3.Bootstrap", &k)?;
    ensure!(d["admin"] == k["admin"], "k8s bootstrap: admin differs from the default bootstrap's");
    ensure!(listener_json(&d, "mcp") == listener_json(&k, "mcp"), "k8s bootstrap: listener `mcp` (filters, filter configuration, routes) differs from the default bootstrap's");
    for c in d.pointer("/static_resources/clusters").and_then(Json::as_array).ok_or("default bootstrap: no clusters")? {
        let name = s(c, "/name");
        let kc = cluster_json(&k, name).ok_or_else(|| format!("k8s bootstrap: no cluster {name}"))?;
        ensure!(cluster_shape(c) == cluster_shape(kc), "k8s bootstrap: cluster {name} differs from the default bootstrap's beyond its addresses");
        ensure!(s(kc, "/type") == "STRICT_DNS", "k8s bootstrap: cluster {name} must be STRICT_DNS (Service DNS names)");
    }
    // Upstreams: the MCP servers' headless Service; control's Service (API and replay port).
    let sts = objs.values().find(|o| s(o, "/kind") == "StatefulSet" && s(o, "/metadata/name") == "mcp-server").ok_or("no StatefulSet mcp-server")?;
    let ns = s(sts, "/metadata/namespace");
    let headless = s(sts, "/spec/serviceName");
    let pods = format!("{headless}.{ns}.svc.cluster.local:{}", service_port(objs, ns, headless).ok_or("no port on the headless Service")?);
    let control_svc = objs.get(&format!("Service/{ns}/mcp-affinity-control")).ok_or("no Service mcp-affinity-control")?;
    let control_port = |name: &str| control_svc["spec"]["ports"].as_array().into_iter().flatten().find(|p| p["name"] == name).and_then(|p| p["port"].as_u64());
    let control = |name: &str| control_port(name).map(|p| format!("mcp-affinity-control.{ns}.svc.cluster.local:{p}")).unwrap_or_default();
    let svc = cluster_json(&k, "mcp_service").ok_or("k8s bootstrap: no cluster mcp_service")?;
    ensure!(endpoint_json(svc) == [(0, pods.clone()), (1, control("replay"))], "k8s bootstrap: mcp_service must be [{pods} (priority 0), {} (priority 1)], found {:?}", control("replay"), endpoint_json(svc));
    let ctl = cluster_json(&k, "mcp_affinity_control").ok_or("k8s bootstrap: no cluster mcp_affinity_control")?;
    ensure!(endpoint_json(ctl) == [(0, control("http"))], "k8s bootstrap: mcp_affinity_control must be {}, found {:?}", control("http"), endpoint_json(ctl));

    // The Deployment.
    let key = format!("Deployment/{ns}/mcp-affinity-envoy");
    let dep = objs.get(&key).ok_or_else(|| format!("no {key}"))?;
    let c = containers(dep).into_iter().next().ok_or("Envoy has no container")?;
    let args: Vec<&str> = c["args"].as_array().into_iter().flatten().filter_map(Json::as_str).collect();
    let config = args.iter().position(|a| *a == "-c" || *a == "--config-path").and_then(|i| args.get(i + 1)).ok_or_else(|| format!("{key}: no -c argument"))?;
    let volumes: Vec<&Json> = dep.pointer("/spec/template/spec/volumes").and_then(Json::as_array).into_iter().flatten().collect();
    let volume_of = |m: &Json| volumes.iter().copied().find(|v| v["name"] == m["name"]);
    let mounts: Vec<&Json> = c["volumeMounts"].as_array().into_iter().flatten().collect();
    let boot = mounts.iter().find(|m| s(m, "/mountPath") == *config).ok_or_else(|| format!("{key}: nothing mounted at {config}"))?;
    let cm = volume_of(boot).and_then(|v| v.pointer("/configMap/name")).and_then(Json::as_str).ok_or_else(|| format!("{key}: {config} is not from a ConfigMap"))?;
    let kust = yaml_one(kustomization)?;
    let generated = kust["configMapGenerator"].as_array().into_iter().flatten().find(|g| g["name"] == cm).ok_or_else(|| format!("kustomization.yaml generates no ConfigMap {cm}"))?;
    let sub = s(boot, "/subPath");
    ensure!(generated["files"].as_array().into_iter().flatten().any(|f| f.as_str() == Some(&format!("{sub}=envoy/envoy.yaml"))), "kustomization.yaml: ConfigMap {cm} must hold {sub} from envoy/envoy.yaml");
    // The token of control's own Secret.
    let token = c["env"].as_array().into_iter().flatten().find(|e| e["name"] == "MCP_AFFINITY_CONTROL_TOKEN").ok_or_else(|| format!("{key}: no MCP_AFFINITY_CONTROL_TOKEN"))?;
    let control_dep = objs.get(&format!("Deployment/{ns}/mcp-affinity-control")).ok_or("no Deployment mcp-affinity-control")?;
    let control_secrets: Vec<&str> = control_dep.pointer("/spec/template/spec/volumes").and_then(Json::as_array).into_iter().flatten().filter_map(|v| v.pointer("/secret/secretName").and_then(Json::as_str)).collect();
    ensure!(control_secrets.contains(&s(token, "/valueFrom/secretKeyRef/name")), "{key}: MCP_AFFINITY_CONTROL_TOKEN must come from control's token Secret ({control_secrets:?})");
    // The replay listener's client certificate files.
    let tls = svc.pointer("/transport_socket_matches/0/transport_socket/typed_config/common_tls_context").ok_or("k8s bootstrap: no replay TLS context")?;
    for file in [s(tls, "/tls_certificates/0/certificate_chain/filename"), s(tls, "/tls_certificates/0/private_key/filename"), s(tls, "/validation_context/trusted_ca/filename")] {
        let (dir, name) = file.rsplit_once('/').ok_or("k8s bootstrap: a relative TLS file name")?;
        let m = mounts.iter().find(|m| s(m, "/mountPath") == dir).ok_or_else(|| format!("{key}: nothing mounted at {dir} (for {file})"))?;
        let v = volume_of(m).ok_or_else(|| format!("{key}: volume {} is not defined", m["name"]))?;
        let items: Vec<&str> = v.pointer("/secret/items").and_then(Json::as_array).into_iter().flatten().map(|i| s(i, "/path")).collect();
        ensure!(v.get("secret").is_some() && (items.is_empty() || items.contains(&name)), "{key}: {file} must come from a Secret volume");
    }
    // Ports and readiness: the mcp listener; /ready through a listener routing it to the admin API.
    let port_of = |l: &str| listener_json(&k, l).and_then(|l| l.pointer("/address/socket_address/port_value")).and_then(Json::as_u64);
    ensure!(port_by_name(dep, "mcp") == port_of("mcp"), "{key}: container port `mcp` must be the mcp listener's port {:?}", port_of("mcp"));
    ensure!(c.pointer("/readinessProbe/httpGet/path").and_then(Json::as_str) == Some("/ready"), "{key}: the readiness probe must GET /ready");
    let probe_port = match c.pointer("/readinessProbe/httpGet/port") {
        Some(Json::String(n)) => port_by_name(dep, n),
        Some(p) => p.as_u64(),
        None => None,
    };
    let admin = k.pointer("/admin/address/socket_address").map(|sa| format!("{}:{}", s(sa, "/address"), sa["port_value"])).unwrap_or_default();
    let ready_ok = k.pointer("/static_resources/listeners").and_then(Json::as_array).into_iter().flatten().any(|l| {
        l.pointer("/address/socket_address/port_value").and_then(Json::as_u64) == probe_port
            && l.pointer("/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes").and_then(Json::as_array).into_iter().flatten().any(|r| {
                r.pointer("/match/path").and_then(Json::as_str) == Some("/ready")
                    && r.pointer("/route/cluster").and_then(Json::as_str).and_then(|c| cluster_json(&k, c)).is_some_and(|c| endpoint_json(c) == [(0, admin.clone())])
            })
    });
    ensure!(ready_ok, "{key}: the readiness probe's port must be a listener that routes /ready to the admin API ({admin})");
    Ok(())
}

/// Disruptions and isolation (k8s/disruption-budgets.yaml, k8s/network-policies.yaml):
/// every workload with more than one replica has a PodDisruptionBudget; the NetworkPolicy
/// of control admits its replay listener only from Envoy pods and its API only from Envoy
/// pods (or a whole namespace, for metrics); the MCP servers admit Envoy and control.
fn check_isolation(objs: &BTreeMap<String, Json>) -> Check {
    let pods_of = |kind: &str, o: &Json| -> BTreeMap<String, String> { if kind == "NetworkPolicy" { labels(o, "/spec/podSelector/matchLabels") } else { labels(o, "/spec/selector/matchLabels") } };
    for (key, w) in objs.iter().filter(|(_, o)| matches!(s(o, "/kind"), "Deployment" | "StatefulSet")) {
        if w.pointer("/spec/replicas").and_then(Json::as_u64).unwrap_or(1) > 1 {
            let pod = labels(w, "/spec/template/metadata/labels");
            ensure!(objs.values().any(|p| s(p, "/kind") == "PodDisruptionBudget" && subset(&pods_of("PodDisruptionBudget", p), &pod)), "{key}: no PodDisruptionBudget selects its pods");
        }
    }
    let name_of = |app: &str| BTreeMap::from([("app.kubernetes.io/name".to_string(), app.to_string())]);
    let policy = |app: &str| objs.iter().find(|(_, o)| s(o, "/kind") == "NetworkPolicy" && pods_of("NetworkPolicy", o) == name_of(app));
    // (port, the peers of every rule admitting it): None = from anywhere.
    let peers = |np: &Json, port: u64| -> Vec<Option<Vec<Json>>> {
        np.pointer("/spec/ingress").and_then(Json::as_array).into_iter().flatten()
            .filter(|r| r["ports"].as_array().is_none_or(|ps| ps.is_empty() || ps.iter().any(|p| p["port"].as_u64() == Some(port))))
            .map(|r| r["from"].as_array().filter(|f| !f.is_empty()).cloned())
            .collect()
    };
    let is_pods = |peer: &Json, app: &str| peer.get("namespaceSelector").is_none() && labels(peer, "/podSelector/matchLabels") == name_of(app);
    let (ckey, cnp) = policy("mcp-affinity-control").ok_or("no NetworkPolicy selecting the control pods")?;
    ensure!(cnp["spec"]["policyTypes"].as_array().is_some_and(|t| t.iter().any(|x| x == "Ingress")), "{ckey}: policyTypes must include Ingress");
    let replay = peers(cnp, 9902);
    ensure!(!replay.is_empty() && replay.iter().all(|r| r.as_ref().is_some_and(|f| f.iter().all(|p| is_pods(p, "mcp-affinity-envoy")))), "{ckey}: the replay listener (9902) must admit Envoy pods only");
    let api = peers(cnp, 9901);
    ensure!(
        api.iter().any(|r| r.as_ref().is_some_and(|f| f.iter().any(|p| is_pods(p, "mcp-affinity-envoy"))))
            && api.iter().all(|r| r.as_ref().is_some_and(|f| f.iter().all(|p| is_pods(p, "mcp-affinity-envoy") || (p.get("podSelector").is_none() && p.get("namespaceSelector").is_some())))),
        "{ckey}: the API (9901) must admit Envoy pods (and at most whole namespaces, for metrics), nothing else"
    );
    let (mkey, mnp) = policy("mcp-server").ok_or("no NetworkPolicy selecting the MCP server pods")?;
    let mcp = peers(mnp, 8080);
    for app in ["mcp-affinity-envoy", "mcp-affinity-control"] {
        ensure!(mcp.iter().any(|r| r.as_ref().is_none_or(|f| f.iter().any(|p| is_pods(p, app)))), "{mkey}: the MCP servers must admit {app}");
    }
    Ok(())
}

// ─── images ─────────────────────────────────────────────────────────────────────────

fn check_dockerfiles(control: &str, wasm_image: &str, envoy_image: &str, bootstrap_wasm_file: &str) -> Check {
    let instr = |text: &str, word: &str| -> Vec<String> {
        text.lines().map(str::trim).filter(|l| l.to_ascii_uppercase().starts_with(&format!("{word} "))).map(|l| l[word.len() + 1..].trim().to_string()).collect()
    };
    // Control: multi-stage, non-root, exposes control's port.
    ensure!(instr(control, "FROM").len() >= 2, "control.Dockerfile must be multi-stage");
    let user = instr(control, "USER");
    let user = user.last().ok_or("control.Dockerfile sets no USER")?;
    ensure!(!matches!(user.split(':').next().unwrap(), "0" | "root"), "control image runs as root");
    let port = control_default_listen().port().to_string();
    ensure!(instr(control, "EXPOSE").iter().any(|p| p == &port), "control.Dockerfile must EXPOSE {port}");
    ensure!(control.contains("-p mcp-affinity-control"), "control.Dockerfile must build the mcp-affinity-control package");
    // Istio's WasmPlugin OCI layout: FROM scratch, plugin.wasm at the root.
    ensure!(instr(wasm_image, "FROM") == ["scratch"], "wasm-image/Dockerfile must be FROM scratch");
    ensure!(instr(wasm_image, "COPY").iter().any(|c| c.ends_with("./plugin.wasm") || c.ends_with(" /plugin.wasm")), "wasm-image/Dockerfile must COPY the module to ./plugin.wasm");
    // Envoy image: the module lands where the bootstrap loads it.
    ensure!(
        instr(envoy_image, "COPY").iter().any(|c| c.contains("mcp_affinity_filter.wasm") && c.ends_with(bootstrap_wasm_file)),
        "envoy.Dockerfile must copy the filter to {bootstrap_wasm_file}"
    );
    Ok(())
}

// ─── tests ──────────────────────────────────────────────────────────────────────────

#[test]
fn every_yaml_file_parses() {
    let files = yaml_files();
    for want in ["envoy.yaml", "envoy-stateful-session.yaml", "istio/wasmplugin.yaml", "istio/service.yaml", "istio/envoyfilter.yaml", "k8s/control.yaml", "k8s/redis.yaml", "k8s/mcp-server.yaml"] {
        assert!(files.iter().any(|f| f == want), "envoy/{want} is missing (found {files:?})");
    }
    for f in &files {
        let docs = yaml_docs(&read(f)).unwrap_or_else(|e| panic!("envoy/{f}: {e}"));
        assert!(!docs.is_empty(), "envoy/{f}: no YAML document");
    }
}

#[test]
fn envoy_yaml_is_a_valid_original_dst_bootstrap() {
    check_bootstrap(&read("envoy.yaml"), Pinning::OriginalDst).unwrap();
}

#[test]
fn envoy_stateful_session_yaml_is_a_valid_bootstrap() {
    check_bootstrap(&read("envoy-stateful-session.yaml"), Pinning::StatefulSession).unwrap();
}

#[test]
fn kubernetes_manifests_agree() {
    check_manifests(&objects(&manifest_texts()).unwrap()).unwrap();
}

#[test]
fn k8s_envoy_bootstrap_and_deployment_agree_with_the_default_bootstrap() {
    let objs = objects(&manifest_texts()).unwrap();
    check_k8s_envoy(&objs, &read("envoy-stateful-session.yaml"), &read("k8s/envoy/envoy.yaml"), &read("k8s/kustomization.yaml")).unwrap();
}

#[test]
fn k8s_disruption_budgets_and_network_policies() {
    check_isolation(&objects(&manifest_texts()).unwrap()).unwrap();
}

#[test]
fn mutated_isolation_is_rejected() {
    let texts = manifest_texts();
    let with = |file: &str, from: &str, to: &str| -> BTreeMap<String, Json> {
        let texts: Vec<(String, String)> = texts.iter().map(|(f, t)| (f.clone(), if f == file { mutate(t, from, to) } else { t.clone() })).collect();
        objects(&texts).unwrap()
    };
    let np = "k8s/network-policies.yaml";
    expect_err(check_isolation(&with("k8s/disruption-budgets.yaml", "  name: mcp-affinity-control\n  namespace: mcp\n  labels:\n    app.kubernetes.io/name: mcp-affinity-control\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: mcp-affinity-control", "  name: mcp-affinity-control\n  namespace: mcp\n  labels:\n    app.kubernetes.io/name: mcp-affinity-control\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: control")), "Deployment/mcp/mcp-affinity-control: no PodDisruptionBudget");
    expect_err(check_isolation(&with(np, "    - port: 9901\n      protocol: TCP\n    - port: 9902\n", "    - port: 9901\n      protocol: TCP\n  - ports:\n    - port: 9902\n")), "replay listener (9902)");
    expect_err(check_isolation(&with(np, "          kubernetes.io/metadata.name: monitoring\n    ports:\n    - port: 9901", "          kubernetes.io/metadata.name: monitoring\n    ports:\n    - port: 9902")), "replay listener (9902)");
    expect_err(check_isolation(&with(np, "    - podSelector:\n        matchLabels:\n          app.kubernetes.io/name: mcp-affinity-control\n", "")), "must admit mcp-affinity-control");
}

#[test]
fn mutated_k8s_envoy_is_rejected() {
    let (d, k, kust) = (read("envoy-stateful-session.yaml"), read("k8s/envoy/envoy.yaml"), read("k8s/kustomization.yaml"));
    let texts = manifest_texts();
    let objs = objects(&texts).unwrap();
    let with = |file: &str, from: &str, to: &str| -> BTreeMap<String, Json> {
        let texts: Vec<(String, String)> = texts.iter().map(|(f, t)| (f.clone(), if f == file { mutate(t, from, to) } else { t.clone() })).collect();
        objects(&texts).unwrap()
    };
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "\"session_ttl_secs\": 7200", "\"session_ttl_secs\": 3600"), &kust), "listener `mcp`");
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "retriable_status_codes: [404, 400]", "retriable_status_codes: [404]"), &kust), "listener `mcp`");
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "max_retries: 1024", "max_retries: 3"), &kust), "beyond its addresses");
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "mcp-server-headless.mcp.svc.cluster.local", "mcp-server.mcp.svc.cluster.local"), &kust), "mcp_service must be");
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "mcp-affinity-control.mcp.svc.cluster.local, port_value: 9902", "mcp-affinity-control.mcp.svc.cluster.local, port_value: 9901"), &kust), "mcp_service must be");
    expect_err(check_k8s_envoy(&objs, &d, &mutate(&k, "route: { cluster: envoy_admin }\n              - match: { path: /stats", "route: { cluster: mcp_service }\n              - match: { path: /stats"), &kust), "routes /ready");
    expect_err(check_k8s_envoy(&objs, &d, &k, &mutate(&kust, "envoy.yaml=envoy/envoy.yaml", "envoy.yaml=../envoy-stateful-session.yaml")), "must hold envoy.yaml");
    expect_err(check_k8s_envoy(&with("k8s/envoy.yaml", "mountPath: /etc/envoy/replay-tls", "mountPath: /etc/envoy/tls"), &d, &k, &kust), "nothing mounted at /etc/envoy/replay-tls");
    expect_err(check_k8s_envoy(&with("k8s/envoy.yaml", "name: mcp-affinity-control-token\n              key: token", "name: envoy-token\n              key: token"), &d, &k, &kust), "control's token Secret");
    expect_err(check_k8s_envoy(&with("k8s/envoy.yaml", "            path: /ready\n", "            path: /healthz\n"), &d, &k, &kust), "GET /ready");
    expect_err(check_k8s_envoy(&with("k8s/envoy.yaml", "containerPort: 10000", "containerPort: 8080"), &d, &k, &kust), "container port `mcp`");
}

#[test]
fn istio_resources_agree_with_the_filter_and_the_manifests() {
    let objs = objects(&manifest_texts()).unwrap();
    check_istio(&objs, &read("istio/wasmplugin.yaml"), &read("istio/envoyfilter.yaml")).unwrap();
}

#[test]
fn dockerfiles_match_the_configuration() {
    check_dockerfiles(&read("docker/control.Dockerfile"), &read("wasm-image/Dockerfile"), &read("docker/envoy.Dockerfile"), "/etc/envoy/mcp_affinity_filter.wasm").unwrap();
}

// ─── the checks fail on broken configurations ───────────────────────────────────────

/// Replaces exactly one occurrence of `from` (the mutation must apply).
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "mutation {from:?} must match exactly once");
    text.replacen(from, to, 1)
}

fn expect_err(result: Check, needle: &str) {
    let err = result.expect_err("the mutated configuration was accepted");
    assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
}

#[test]
fn mutated_bootstraps_are_rejected() {
    let plain = read("envoy.yaml");
    let ss = read("envoy-stateful-session.yaml");
    let cases: &[(&str, &str, &str, Pinning, &str)] = &[
        // Envoy's API: unknown field, unknown enum value, unknown @type, wrong type.
        (&plain, "stat_prefix: mcp", "stat_prefx: mcp", Pinning::OriginalDst, "stat_prefx"),
        // The buffer filter holds a session's request whole before the pinned pod is tried.
        (&plain, "          - name: envoy.filters.http.buffer\n", "          - name: envoy.filters.http.buffr\n", Pinning::OriginalDst, "must come before the wasm filter"),
        (&plain, "max_request_bytes: 4194304", "max_request_bytes: 1024", Pinning::OriginalDst, "max_request_bytes"),
        (&plain, "\n                              header_name: mcp-session-id\n", "\n                              header_name: x-other\n", Pinning::OriginalDst, "skipped only"),
        // The wasm filter skipped for more than 2026-era requests without a session or task.
        (&plain, "value_match: { exact: tools/call }", "value_match: { exact: tools/list }", Pinning::OriginalDst, "the request matcher skips"),
        (&ss, "value_match: { exact: subscriptions/listen }", "value_match: { exact: subscriptions/listn }", Pinning::StatefulSession, "the request matcher skips"),
        (&plain, "lb_policy: CLUSTER_PROVIDED", "lb_policy: CLUSTER_PROVIDE", Pinning::OriginalDst, "CLUSTER_PROVIDE"),
        (&plain, "v3.Router", "v3.Routr", Pinning::OriginalDst, "Routr"),
        (&plain, "port_value: 10000", "port_value: ten", Pinning::OriginalDst, "Bootstrap"),
        // The filter's own parser.
        (&plain, "\"pin_encoding\": \"plain\"", "\"pin_encodin\": \"plain\"", Pinning::OriginalDst, "unknown field `pin_encodin`"),
        (&plain, "\"max_body_bytes\": 1048576", "\"max_body_bytes\": 0", Pinning::OriginalDst, "max_body_bytes"),
        (&plain, "\"max_body_bytes\": 1048576", "\"max_body_bytes\": 4194304", Pinning::OriginalDst, "defaults"),
        (&plain, "per_connection_buffer_limit_bytes: 2097152", "per_connection_buffer_limit_bytes: 65536", Pinning::OriginalDst, "per_connection_buffer_limit_bytes"),
        (&plain, "\"sweep_period_ms\": 1000", "\"sweep_period_ms\": 2000", Pinning::OriginalDst, "defaults"),
        (&ss, "\"message_patterns\": [\"session\"]", "\"message_patterns\": []", Pinning::StatefulSession, "defaults"),
        (&plain, "\"pin_encoding\": \"plain\"", "\"pin_encoding\": \"base64\"", Pinning::OriginalDst, "pin_encoding must be plain"),
        (&plain, "\"token_env\": \"MCP_AFFINITY_CONTROL_TOKEN\"", "\"token\": \"secret\"", Pinning::OriginalDst, "inline"),
        (&plain, "\"cluster\": \"mcp_affinity_control\"", "\"cluster\": \"control\"", Pinning::OriginalDst, "not a cluster"),
        (&plain, "host_env_keys:\n                        - MCP_AFFINITY_CONTROL_TOKEN", "host_env_keys:\n                        - OTHER", Pinning::OriginalDst, "not exposed"),
        // Names across the file.
        (&plain, "http_header_name: x-session-pod", "http_header_name: x-pod", Pinning::OriginalDst, "reads \"x-pod\""),
        (&plain, "cluster: mcp_service\n", "cluster: mcp_services\n", Pinning::OriginalDst, "does not exist"),
        (&plain, "present_match: true", "present_match: false", Pinning::OriginalDst, "no route matches"),
        (&plain, "port_value: 9901", "port_value: 9902", Pinning::OriginalDst, "control listens"),
        (&plain, "port_value: 15000", "port_value: 9901", Pinning::OriginalDst, "collides"),
        (&plain, "- remove: x-session-pod", "- remove: x-other", Pinning::OriginalDst, "early_header_mutation"),
        (&plain, "timeout: 0s\n                  idle_timeout: 900s\n                  # No retry", "timeout: 15s\n                  idle_timeout: 900s\n                  # No retry", Pinning::OriginalDst, "timeout: 0s"),
        (&plain, "address: 127.0.0.1, port_value: 15000", "address: 0.0.0.0, port_value: 15000", Pinning::OriginalDst, "loopback"),
        (&ss, "\"pin_encoding\": \"base64\"", "\"pin_encoding\": \"plain\"", Pinning::StatefulSession, "must be base64"),
        (&ss, "                  name: x-session-pod\n", "                  name: x-pod\n", Pinning::StatefulSession, "stateful session reads"),
        (&ss, "- remove: x-session-pod\n          http_filters", "- remove: x-other\n          http_filters", Pinning::StatefulSession, "early_header_mutation"),
        (&ss, "                response_mutations:\n                - remove: x-session-pod", "                response_mutations:\n                - remove: x-other", Pinning::StatefulSession, "from responses"),
        // The response matcher skips the filter only where it has nothing to do.
        (&plain, "value_match: { exact: 2xx }", "value_match: { exact: 4xx }", Pinning::OriginalDst, "must be exactly"),
        (&ss, "value_match: { exact: \"1\" }", "value_match: { exact: \"0\" }", Pinning::StatefulSession, "must be exactly"),
        (&ss, "header_name: x-mcp-affinity-pin", "header_name: x-mcp-affinity-pins", Pinning::StatefulSession, "must be exactly"),
        // Envoy's retry to control (replay_by envoy_retry): only what provably did not run, once, to priority 1.
        (&ss, "retry_on: connect-failure,retriable-status-codes", "retry_on: connect-failure,retriable-status-codes,reset", Pinning::StatefulSession, "retry_on"),
        (&ss, "retriable_status_codes: [404, 400]", "retriable_status_codes: [400]", Pinning::StatefulSession, "session_unknown_statuses"),
        (&ss, "retriable_status_codes: [404, 400]", "retriable_status_codes: [404]", Pinning::StatefulSession, "error_body_statuses"),
        (&ss, "num_retries: 1", "num_retries: 2", Pinning::StatefulSession, "num_retries"),
        (&ss, "update_frequency: 1", "update_frequency: 2", Pinning::StatefulSession, "update_frequency"),
        (&ss, "name: envoy.retry_priorities.previous_priorities", "name: envoy.retry_priorities.other", Pinning::StatefulSession, "previous_priorities"),
        (&ss, "- name: mcp-session-id\n                    present_match: true", "- name: x-other\n                    present_match: true", Pinning::StatefulSession, "retried only after a connect failure"),
        // Requests without a session: a retry only of what never left Envoy, to another pod.
        (&plain, "retry_on: connect-failure\n", "retry_on: connect-failure,5xx\n", Pinning::OriginalDst, "retried only after a connect failure"),
        (&plain, "- name: envoy.retry_host_predicates.previous_hosts", "- name: envoy.retry_host_predicates.omit_canary_hosts", Pinning::OriginalDst, "previous_hosts"),
        (&ss, "retry_on: connect-failure\n", "retry_on: connect-failure\n                    retriable_status_codes: [503]\n", Pinning::StatefulSession, "never to control"),
        (&ss, "      - priority: 1\n", "      - priority: 2\n", Pinning::StatefulSession, "priority-1"),
        // Only Envoy reaches the replay listener: mutual TLS on that endpoint alone.
        (&ss, "              envoy.transport_socket_match: { mcp-affinity: replay-listener }\n", "", Pinning::StatefulSession, "needs envoy.transport_socket_match"),
        (&ss, "            tls_certificates:\n            - certificate_chain: { filename: /etc/envoy/replay-tls/envoy.crt }\n              private_key: { filename: /etc/envoy/replay-tls/envoy.key }\n", "", Pinning::StatefulSession, "client certificate"),
        (&ss, "      match: { mcp-affinity: replay-listener }", "      match: { mcp-affinity: other }", Pinning::StatefulSession, "no transport_socket_matches entry"),
        (&ss, "        max_retries: 1024", "        max_retries: 3", Pinning::StatefulSession, "max_retries"),
        (&ss, "\"replay_by\": \"envoy_retry\",", "\"replay_by\": \"filter\",", Pinning::StatefulSession, "must be exactly"),
        (&plain, "key: wasm.mcp_affinity.want_response", "key: wasm.want_response", Pinning::OriginalDst, "must be exactly"),
        (&ss, "v3.SkipFilter\n                  - predicate:", "v3.SkipFiltr\n                  - predicate:", Pinning::StatefulSession, "SkipFiltr"),
        (&ss, "v3.ExtensionWithMatcher", "v3.ExtensionWithMatchr", Pinning::StatefulSession, "ExtensionWithMatchr"),
    ];
    for (text, from, to, pinning, needle) in cases {
        expect_err(check_bootstrap(&mutate(text, from, to), *pinning), needle);
    }
    // The two files are not interchangeable.
    expect_err(check_bootstrap(&plain, Pinning::StatefulSession), "base64");
    expect_err(check_bootstrap(&ss, Pinning::OriginalDst), "envoy_retry needs the stateful-session override");
}

#[test]
fn mutated_manifests_are_rejected() {
    let texts = manifest_texts();
    let with = |file: &str, from: &str, to: &str| -> BTreeMap<String, Json> {
        let texts: Vec<(String, String)> =
            texts.iter().map(|(f, t)| (f.clone(), if f == file { mutate(t, from, to) } else { t.clone() })).collect();
        objects(&texts).unwrap()
    };
    let k8s: &[(&str, &str, &str, &str)] = &[
        ("k8s/control.yaml", "--listen=0.0.0.0:9901", "--listen=0.0.0.0:9902", "port"),
        ("k8s/control.yaml", "--listen=0.0.0.0:9901", "--listen=127.0.0.1:9901", "loopback"),
        ("k8s/control.yaml", "--log-format=json", "--log-fromat=json", "rejects its arguments"),
        ("k8s/control.yaml", "path: /readyz", "path: /ready", "/readyz"),
        ("k8s/control.yaml", "--store=redis://redis.mcp.svc.cluster.local:6379", "--store=redis://cache.mcp.svc.cluster.local:6379", "not a Service port"),
        ("k8s/example-secrets/control-token.yaml", "  token: REPLACE", "  tokn: REPLACE", "no key"),
        ("k8s/control.yaml", "    targetPort: http\n    appProtocol: http", "    targetPort: api\n    appProtocol: http", "targetPort \"api\""),
        ("k8s/redis.yaml", "runAsNonRoot: true\n        runAsUser: 999", "runAsNonRoot: false\n        runAsUser: 999", "non-root"),
        ("k8s/mcp-server.yaml", "serviceName: mcp-server-headless", "serviceName: mcp-server-pods", "does not exist"),
        ("k8s/mcp-server.yaml", "  clusterIP: None\n", "", "headless"),
        ("k8s/control.yaml", "--endpoints-dns=mcp-server-headless.mcp.svc.cluster.local:8080", "--endpoints-dns=mcp-server.mcp.svc.cluster.local:8080", "headless Service"),
        ("k8s/mcp-server.yaml", "            sleep:\n              seconds: 20", "            sleep:\n              seconds: 5", "must exceed --endpoints-refresh-secs"),
        ("k8s/mcp-server.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 20", "must exceed the preStop sleep"),
        ("k8s/mcp-server.yaml", "          preStop:", "          postStart:", "no preStop hook"),
        ("k8s/control-endpointslices.yaml", "  verbs: [\"list\", \"watch\"]", "  verbs: [\"list\"]", "list and watch"),
        ("k8s/control-endpointslices.yaml", "  name: mcp-affinity-control\n  namespace: mcp\n", "  name: control\n  namespace: mcp\n", "ServiceAccount does not exist"),
    ];
    for (file, from, to, needle) in k8s {
        expect_err(check_manifests(&with(file, from, to)), needle);
    }
    let wp = read("istio/wasmplugin.yaml");
    let ef = read("istio/envoyfilter.yaml");
    let istio: &[(&str, &str, &str, &str)] = &[
        ("istio/service.yaml", "persistent-session-header: x-session-pod", "persistent-session-header: x-pod", "persistent-session header"),
        ("istio/wasmplugin.yaml", "    pin_encoding: base64", "    pin_encoding: plain", "base64"),
        ("istio/wasmplugin.yaml", "    unknown_session: not_found", "    unknown_sessions: not_found", "unknown field"),
        ("istio/wasmplugin.yaml", "cluster: outbound|9901||", "cluster: outbound|9902||", "port"),
        ("istio/wasmplugin.yaml", "timeout_ms: 15000", "timeout_ms: 5000", "defaults"),
        ("istio/wasmplugin.yaml", "valueFrom: HOST", "valueFrom: INLINE", "not exposed"),
        ("istio/wasmplugin.yaml", "phase: AUTHN", "phase: UNSPECIFIED_PHASE", "phase"),
        ("istio/envoyfilter.yaml", "http_header_name: x-session-pod", "http_header_name: x-pod", "reads \"x-pod\""),
        ("istio/envoyfilter.yaml", "lb_policy: CLUSTER_PROVIDED", "lb_policy: CLUSTER_PROVIDE", "CLUSTER_PROVIDE"),
        ("istio/envoyfilter.yaml", "present_match: true", "present_match: maybe", "Route"),
        ("istio/gateway.yaml", "host: mcp-server.mcp.svc.cluster.local", "host: mcp.mcp.svc.cluster.local", "VirtualService routes"),
    ];
    for (file, from, to, needle) in istio {
        expect_err(check_istio(&with(file, from, to), &wp, &ef), needle);
    }
    let objs = objects(&texts).unwrap();
    expect_err(check_istio(&objs, &wp.replace("file://", "path:"), &ef), "file://");
    expect_err(check_istio(&objs, &wp, &ef.replace("PLAINTEXT", "plain text")), "mTLS");
}

#[test]
fn mutated_dockerfiles_are_rejected() {
    let (c, w, e) = (read("docker/control.Dockerfile"), read("wasm-image/Dockerfile"), read("docker/envoy.Dockerfile"));
    let wasm_file = "/etc/envoy/mcp_affinity_filter.wasm";
    expect_err(check_dockerfiles(&mutate(&c, "USER 65532:65532", "USER root"), &w, &e, wasm_file), "root");
    expect_err(check_dockerfiles(&mutate(&c, "EXPOSE 9901", "EXPOSE 8080"), &w, &e, wasm_file), "EXPOSE");
    expect_err(check_dockerfiles(&c, &mutate(&w, "FROM scratch", "FROM alpine"), &e, wasm_file), "scratch");
    expect_err(check_dockerfiles(&c, &mutate(&w, "./plugin.wasm", "./filter.wasm"), &e, wasm_file), "plugin.wasm");
    expect_err(check_dockerfiles(&c, &w, &e, "/etc/envoy/other.wasm"), "envoy.Dockerfile");
}
