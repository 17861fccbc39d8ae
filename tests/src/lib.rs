//! Harness for the root-only envguard integration tests.
//!
//! Every test builds everything it uses — a cgroup tree
//! `<cg2>/envguard-t-<pid>-<n>` with `prod`, `dev` (and `dev/late`), two
//! network namespaces joined by a veth pair, echo servers, a policy file and
//! the agent with its own bpffs pin root — through guards that tear it all
//! down on drop, panics included. See `tests/README.md`.

pub mod agent;
pub mod attack;
pub mod bpf;
pub mod cgroup;
pub mod control;
pub mod event;
pub mod lab;
pub mod netns;
pub mod pin;
pub mod podman;
pub mod policy;
pub mod process;
pub mod router;
pub mod sinks;
pub mod sockaddr;
pub mod sys;

/// Checks records against `docs/schemas` (shared with the agent's own tests;
/// see its module docs). Every line an [`Agent`] prints goes through it.
#[path = "../../envguard-agent/tests/support/rsyslog_conf.rs"]
pub mod rsyslog_conf;
#[path = "../../envguard-agent/tests/support/schema_check.rs"]
// Written for test crates, where its `Schemas::new` is not public API.
#[allow(clippy::new_without_default)]
pub mod schema_check;

pub use agent::{Agent, AgentOptions};
pub use cgroup::CgroupTree;
pub use control::{CliRun, Creds, Subscriber};
pub use event::{Endpoint, Expected};
pub use lab::{Case, Client, Lab, Side, Violation};
pub use netns::{Family, Netns, Site, Topology, client_addr};
pub use pin::{Footprint, PinRoot};
pub use policy::{Mode, PolicyExtras, TempFile, violates};
pub use process::{ConnectLoop, FlowSpec, Place, Probe, ProbeResult, Proto, Server};
