//! Harness for the root-only envguard integration tests.
//!
//! Every test builds everything it uses — a cgroup tree
//! `<cg2>/envguard-t-<pid>-<n>` with `prod`, `dev` (and `dev/late`), two
//! network namespaces joined by a veth pair, echo servers, a policy file and
//! the agent with its own bpffs pin root — through guards that tear it all
//! down on drop, panics included. See `tests/README.md`.

pub mod agent;
pub mod bpf;
pub mod cgroup;
pub mod control;
pub mod event;
pub mod lab;
pub mod netns;
pub mod pin;
pub mod policy;
pub mod process;
pub mod sys;

pub use agent::{Agent, AgentOptions};
pub use cgroup::CgroupTree;
pub use control::{CliRun, Creds, Subscriber};
pub use event::{Endpoint, Expected};
pub use lab::{Case, Client, Lab, Side, Violation};
pub use netns::{Family, Netns, Site, Topology, client_addr};
pub use pin::{Footprint, PinRoot};
pub use policy::{Mode, PolicyExtras, TempFile, violates};
pub use process::{ConnectLoop, FlowSpec, Place, Probe, ProbeResult, Proto, Server};
