//! The `log` facade on `proxy_log`, at the host's level for this VM
//! (`proxy_get_log_level`, read at VM start and every `sweep_period_ms` on the tick, so a
//! change through Envoy's admin `/logging` applies within a tick). Below that level a
//! `log::debug!` costs a comparison, not a host call. A panic is logged at critical.

use super::abi::{self, LogLevel};

struct HostLogger;

static LOGGER: HostLogger = HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Trace => LogLevel::Trace,
        };
        abi::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

/// Installs the logger (at Info until the host's level is read) and a panic hook. A
/// panic aborts the VM (`panic = "abort"`); Envoy then applies the plugin's
/// failure_policy. The hook says why at critical first, in Envoy's log.
pub fn install() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    std::panic::set_hook(Box::new(|info| abi::log(LogLevel::Critical, &format!("mcp-affinity: panic: {info}"))));
}

/// Follows the host's log level (Info when the host does not say).
pub fn follow_host_level() {
    log::set_max_level(match abi::log_level().unwrap_or(LogLevel::Info) {
        LogLevel::Trace => log::LevelFilter::Trace,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Error | LogLevel::Critical => log::LevelFilter::Error,
    });
}
