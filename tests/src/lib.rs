//! Test harness for mcp-affinity.
//!
//! - [`process`]: free loopback ports and child processes stopped by pid.
pub mod process;
