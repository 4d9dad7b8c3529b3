//! proxy-wasm glue (ABI v0.2.1, without the SDK): `exports` holds the callbacks Envoy calls
//! and the VM's registry of contexts; the root context (`root`) owns the configuration,
//! metrics, the expiry sweep, control touches and the draining list; one stream context
//! per HTTP stream (`http_context`, the proxy-wasm HTTP context) translates Envoy's callbacks for the machine in
//! [`crate::machine`]; `control` makes the calls to the control service; `abi` the host
//! calls, each status a value.

mod abi;
mod control;
mod exports;
mod root;
mod http_context;
