//! envguard's userspace: policy, loader, event stream. `main.rs` only parses
//! the command line and calls into here.
pub mod bpf_sys;
pub mod btf;
pub mod cgroups;
pub mod cmd;
pub mod containers;
pub mod control;
pub mod daemon;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod explain;
pub mod history;
pub mod interfaces;
pub mod loader;
pub mod metrics;
pub mod modes;
pub mod netlink;
pub mod pinroot;
pub mod policy;
pub mod ratelimit;
pub mod scan;
pub mod sinks;
pub mod sys;
pub mod verify;
