//! One proxy-wasm VM (Envoy: one per worker thread) running the filter module, and the
//! callback sequence Envoy drives it through.
//!
//! Life cycle ([spec] proxy-wasm `abi-versions/v0.2.1`, "Callbacks"; proxy-wasm-cpp-host
//! `src/wasm.cc`, `WasmBase::initialize` / `start` / `configure`):
//! `_initialize` → `proxy_on_context_create(root, 0)` → `proxy_on_vm_start(root, size)` →
//! `proxy_on_configure(root, size)`; per stream `proxy_on_context_create(id, root)`, the
//! HTTP callbacks, then `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

use super::abi::{Action, Headers};
use super::imports;
use super::shared_data::SharedData;
use super::state::{HostState, HttpCall, HttpCallResponse, LogLine, MetricsStore, Phase, StreamState};

/// How to create a VM: what Envoy's `vm_config` and plugin `configuration` carry, plus
/// the process-wide pieces (shared data, metrics) the VM joins.
#[derive(Clone, Default)]
pub struct VmConfig {
    /// `vm_config.vm_id`: VMs with the same id share shared data.
    pub vm_id: String,
    /// `PluginConfig.name`.
    pub plugin_name: String,
    /// `vm_config.configuration` bytes.
    pub vm_configuration: Vec<u8>,
    /// `PluginConfig.configuration` bytes (buffer type 7).
    pub plugin_configuration: Vec<u8>,
    /// `vm_config.environment_variables`.
    pub env: Vec<(String, String)>,
    /// Clusters `dispatch_http_call` may name.
    pub clusters: HashSet<String>,
    pub shared: SharedData,
    pub metrics: MetricsStore,
    /// Forward guest logs to `tracing`.
    pub echo_logs: bool,
}

/// A stream callback export: `(context_id, size, end_of_stream) -> action`.
type StreamCallback = TypedFunc<(i32, i32, i32), i32>;

struct Exports {
    on_context_create: TypedFunc<(i32, i32), ()>,
    on_vm_start: TypedFunc<(i32, i32), i32>,
    on_configure: TypedFunc<(i32, i32), i32>,
    on_request_headers: TypedFunc<(i32, i32, i32), i32>,
    on_request_body: TypedFunc<(i32, i32, i32), i32>,
    on_response_headers: TypedFunc<(i32, i32, i32), i32>,
    on_response_body: TypedFunc<(i32, i32, i32), i32>,
    on_http_call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    on_tick: TypedFunc<i32, ()>,
    on_done: TypedFunc<i32, i32>,
    on_log: TypedFunc<i32, ()>,
    on_delete: TypedFunc<i32, ()>,
}

/// Adds `what` to a wasmtime error (wasmtime has its own error type).
fn ctx<T>(r: wasmtime::Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

/// Compiles a module once for many VMs.
pub fn compile(wasm: &[u8]) -> Result<(Engine, Module)> {
    let engine = Engine::default();
    let module = ctx(Module::new(&engine, wasm), "compile the filter module")?;
    Ok((engine, module))
}

/// A running VM with its root context.
pub struct Vm {
    store: Store<HostState>,
    f: Exports,
    next_context_id: u32,
    /// Set after a trap: Envoy marks the VM failed and stops calling it.
    failed: Option<String>,
}

const ROOT_CONTEXT_ID: u32 = 1;

impl Vm {
    /// Instantiates `module`, runs `_initialize` and starts the root context
    /// (`on_vm_start`, `on_configure`). Fails if the module is not ABI v0.2.1, traps, or
    /// rejects its configuration (the error carries the guest's last error log, as Envoy
    /// logs it).
    pub fn start(engine: &Engine, module: &Module, config: VmConfig) -> Result<Vm> {
        let state = HostState {
            vm_id: config.vm_id,
            plugin_name: config.plugin_name,
            vm_configuration: config.vm_configuration,
            plugin_configuration: config.plugin_configuration,
            env: config.env,
            shared: config.shared,
            metrics: config.metrics,
            clusters: config.clusters,
            root_context_id: ROOT_CONTEXT_ID,
            effective_context: ROOT_CONTEXT_ID,
            streams: HashMap::new(),
            tick_period: None,
            pending_calls: Vec::new(),
            next_token: 0,
            call_response: None,
            clock_offset: Duration::ZERO,
            logs: Vec::new(),
            echo_logs: config.echo_logs,
        };
        let mut store = Store::new(engine, state);
        let mut linker = Linker::new(engine);
        imports::define(&mut linker, module)?;
        let instance: Instance = ctx(linker.instantiate(&mut store, module), "instantiate the filter module")?;
        // [spec] the module declares its ABI version by exporting this function.
        if instance.get_func(&mut store, "proxy_abi_version_0_2_1").is_none() {
            bail!("not a proxy-wasm ABI v0.2.1 module (no proxy_abi_version_0_2_1 export)");
        }
        macro_rules! f {
            ($name:literal) => {
                ctx(instance.get_typed_func(&mut store, $name), $name)?
            };
        }
        let f = Exports {
            on_context_create: f!("proxy_on_context_create"),
            on_vm_start: f!("proxy_on_vm_start"),
            on_configure: f!("proxy_on_configure"),
            on_request_headers: f!("proxy_on_request_headers"),
            on_request_body: f!("proxy_on_request_body"),
            on_response_headers: f!("proxy_on_response_headers"),
            on_response_body: f!("proxy_on_response_body"),
            on_http_call_response: f!("proxy_on_http_call_response"),
            on_tick: f!("proxy_on_tick"),
            on_done: f!("proxy_on_done"),
            on_log: f!("proxy_on_log"),
            on_delete: f!("proxy_on_delete"),
        };
        // WASI reactor start-up: `_initialize` runs static constructors (the SDK's main!).
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            ctx(init.call(&mut store, ()), "_initialize")?;
        }
        let mut vm = Vm { store, f, next_context_id: ROOT_CONTEXT_ID + 1, failed: None };
        let root = ROOT_CONTEXT_ID as i32;
        vm.call(|s, f| f.on_context_create.call(s, (root, 0)))?;
        let vm_config_len = vm.store.data().vm_configuration.len() as i32;
        if vm.call(|s, f| f.on_vm_start.call(s, (root, vm_config_len)))? == 0 {
            bail!("proxy_on_vm_start returned false{}", vm.last_error());
        }
        let plugin_config_len = vm.store.data().plugin_configuration.len() as i32;
        if vm.call(|s, f| f.on_configure.call(s, (root, plugin_config_len)))? == 0 {
            bail!("proxy_on_configure rejected the plugin configuration{}", vm.last_error());
        }
        Ok(vm)
    }

    fn last_error(&self) -> String {
        self.store
            .data()
            .logs
            .iter()
            .rev()
            .find(|l| l.level >= 3)
            .map_or(String::new(), |l| format!(": {}", l.message))
    }

    /// Calls into the guest; a trap marks the VM failed ([envoy] a VM that traps is
    /// unusable; requests then fail open or closed per `fail_open`).
    fn call<R>(&mut self, f: impl FnOnce(&mut Store<HostState>, &Exports) -> wasmtime::Result<R>) -> Result<R> {
        if let Some(reason) = &self.failed {
            bail!("VM failed earlier: {reason}");
        }
        match f(&mut self.store, &self.f) {
            Ok(r) => Ok(r),
            Err(e) => {
                let reason = format!("{e:#}{}", self.last_error());
                self.failed = Some(reason.clone());
                Err(anyhow!("wasm trap: {reason}"))
            }
        }
    }

    /// True once the VM trapped.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Creates an HTTP context for a new stream and returns its id.
    pub fn create_stream(&mut self) -> Result<u32> {
        let id = self.next_context_id;
        self.next_context_id += 1;
        self.store.data_mut().streams.insert(id, StreamState::default());
        self.store.data_mut().effective_context = id;
        self.call(|s, f| f.on_context_create.call(s, (id as i32, ROOT_CONTEXT_ID as i32)))?;
        Ok(id)
    }

    /// The state of stream `id` (headers, buffers, properties, local reply).
    pub fn stream(&mut self, id: u32) -> &mut StreamState {
        self.store.data_mut().streams.get_mut(&id).expect("unknown stream id")
    }

    fn enter(&mut self, id: u32) {
        self.store.data_mut().effective_context = id;
    }

    /// Runs one HTTP stream callback `(context_id, size, end_of_stream) -> action`, where
    /// `size` is `count` of the stream's state (headers in the map, or body bytes).
    fn stream_callback(
        &mut self,
        id: u32,
        end_of_stream: bool,
        count: fn(&StreamState) -> usize,
        export: fn(&Exports) -> &StreamCallback,
    ) -> Result<Action> {
        self.enter(id);
        let n = count(self.stream(id)) as i32;
        let raw = self.call(|s, f| export(f).call(s, (id as i32, n, end_of_stream as i32)))?;
        Ok(Action::from_raw(raw))
    }

    /// `proxy_on_request_headers(id, num_headers, end_of_stream)`. Continue releases the
    /// request headers upstream; from then on they are read-only.
    pub fn on_request_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action> {
        let a = self.stream_callback(id, end_of_stream, |st| st.request_headers.len(), |f| &f.on_request_headers)?;
        self.release_request_headers(id, a);
        Ok(a)
    }

    /// `proxy_on_request_body(id, body_size, end_of_stream)`; the body buffer must hold
    /// what Envoy has buffered so far (all of it, when earlier calls paused).
    pub fn on_request_body(&mut self, id: u32, end_of_stream: bool) -> Result<Action> {
        let a = self.stream_callback(id, end_of_stream, |st| st.request_body.len(), |f| &f.on_request_body)?;
        self.release_request_headers(id, a);
        Ok(a)
    }

    /// Continue from a request callback sends the held headers upstream.
    fn release_request_headers(&mut self, id: u32, a: Action) {
        if a == Action::Continue {
            self.stream(id).phase = Phase::RequestHeadersSent;
        }
    }

    /// `proxy_on_response_headers(id, num_headers, end_of_stream)`.
    pub fn on_response_headers(&mut self, id: u32, end_of_stream: bool) -> Result<Action> {
        self.stream_callback(id, end_of_stream, |st| st.response_headers.len(), |f| &f.on_response_headers)
    }

    /// `proxy_on_response_body(id, body_size, end_of_stream)`.
    pub fn on_response_body(&mut self, id: u32, end_of_stream: bool) -> Result<Action> {
        self.stream_callback(id, end_of_stream, |st| st.response_body.len(), |f| &f.on_response_body)
    }

    /// Takes the HTTP calls context `context_id` dispatched and nobody performed yet.
    pub fn take_http_calls(&mut self, context_id: u32) -> Vec<HttpCall> {
        let pending = &mut self.store.data_mut().pending_calls;
        let (mine, rest) = std::mem::take(pending).into_iter().partition(|c| c.context_id == context_id);
        *pending = rest;
        mine
    }

    /// True when context `context_id` has dispatched calls nobody performed yet.
    pub fn has_http_calls(&self, context_id: u32) -> bool {
        self.store.data().pending_calls.iter().any(|c| c.context_id == context_id)
    }

    /// The root context's id (calls it dispatches, e.g. from `on_tick`, carry it).
    pub fn root_context_id(&self) -> u32 {
        ROOT_CONTEXT_ID
    }

    /// Delivers the answer to `call` (`None`: failure/timeout, delivered as no headers and
    /// no body — [envoy] `Context::onHttpCallFailure`). `proxy_on_http_call_response`
    /// goes to the root context id; the SDK looks the token up and sets the effective
    /// context to the stream itself ([sdk] `dispatcher.rs`).
    pub fn on_http_call_response(&mut self, call: &HttpCall, response: Option<HttpCallResponse>) -> Result<()> {
        if call.context_id != ROOT_CONTEXT_ID && !self.store.data().streams.contains_key(&call.context_id) {
            return Ok(()); // the stream ended meanwhile: Envoy cancels its calls.
        }
        let response = response.unwrap_or_default();
        let (h, b, t) = (response.headers.len() as i32, response.body.len() as i32, response.trailers.len() as i32);
        self.store.data_mut().call_response = Some(response);
        self.enter(ROOT_CONTEXT_ID);
        let token = call.token as i32;
        let r = self.call(|s, f| f.on_http_call_response.call(s, (ROOT_CONTEXT_ID as i32, token, h, b, t)));
        self.store.data_mut().call_response = None;
        r
    }

    /// Ends stream `id`: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` ([envoy]
    /// `Context::onDestroy` / `onLog`).
    pub fn end_stream(&mut self, id: u32) -> Result<()> {
        if !self.store.data().streams.contains_key(&id) {
            return Ok(());
        }
        self.enter(id);
        let r = self
            .call(|s, f| f.on_done.call(s, id as i32))
            .and_then(|_| self.call(|s, f| f.on_log.call(s, id as i32)))
            .and_then(|_| self.call(|s, f| f.on_delete.call(s, id as i32)));
        self.store.data_mut().streams.remove(&id);
        r
    }

    /// `proxy_on_tick(root)`.
    pub fn tick(&mut self) -> Result<()> {
        self.enter(ROOT_CONTEXT_ID);
        self.call(|s, f| f.on_tick.call(s, ROOT_CONTEXT_ID as i32))
    }

    /// The tick period the guest asked for (`proxy_set_tick_period_milliseconds`).
    pub fn tick_period(&self) -> Option<Duration> {
        self.store.data().tick_period
    }

    /// Moves this VM's clock forward (tests of idle expiry, without sleeping).
    pub fn advance_clock(&mut self, by: Duration) {
        self.store.data_mut().clock_offset += by;
    }

    /// Log lines the guest wrote so far.
    pub fn logs(&self) -> &[LogLine] {
        &self.store.data().logs
    }

    /// Clears the collected log lines (the dev proxy keeps memory bounded this way).
    pub fn clear_logs(&mut self) {
        self.store.data_mut().logs.clear();
    }

    /// The metrics store this VM writes to.
    pub fn metrics(&self) -> &MetricsStore {
        &self.store.data().metrics
    }
}

/// Convenience for tests and the driver: a header map from `(name, value)` pairs.
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Headers {
    pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec())).collect()
}
