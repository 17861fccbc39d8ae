//! The control protocol: requests, their answers, and who sent them. One JSON
//! line each way; these types are the wire format.
use serde::{Deserialize, Serialize};

use super::gate::ControlStatus;
use crate::policy::Mode;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Unit-like variants are written as `{}` so that unknown fields are
    // refused for them too.
    Status {},
    /// Switch the global mode, or one env pair's (`from` and `to` together).
    Mode(ModeRequest),
    Reload {},
    Explain {
        from: String,
        to: String,
        port: String,
    },
    /// Subscribe to the event stream.
    Events {},
    /// Put a container's cgroup into an env (`envguard oci-hook`).
    Register(crate::containers::RegisterRequest),
    /// The policy the agent loaded, as the files read then (`envguard
    /// verify` compiles it and compares the kernel maps with it).
    Policy {},
    /// `envguard verify`: violation records of processes in cgroup
    /// `cgroup_id` are probe traffic of verify run `run` (`"probe": run` on
    /// the records, counted apart in the metrics) until `ttl_secs` pass or a
    /// request with `run` empty clears the mark.
    ProbeMark {
        cgroup_id: u64,
        run: String,
        #[serde(default)]
        ttl_secs: Option<u64>,
    },
}

/// The answer to `policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReply {
    /// The policy file or directory.
    pub path: String,
    pub revision: String,
    /// Each file as read at the load in force, in merge order.
    pub files: Vec<PolicyFileText>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFileText {
    pub path: String,
    pub text: String,
}

/// Which mode a `mode` request switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Pair { from: String, to: String },
}

impl std::fmt::Display for Scope {
    /// `global` or `from->to`, as in `mode_change` records and replies.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Pair { from, to } => write!(f, "{from}->{to}"),
        }
    }
}

/// `{"cmd":"mode","mode":"audit"|"enforce","from":ENV,"to":ENV,"for_secs":N}`:
/// `from` and `to` together or neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ModeWire", into = "ModeWire")]
pub struct ModeRequest {
    pub mode: Mode,
    pub scope: Scope,
    /// Revert after this many seconds (break-glass).
    pub for_secs: Option<u64>,
}

/// A `mode` request as it travels.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeWire {
    mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    for_secs: Option<u64>,
}

impl TryFrom<ModeWire> for ModeRequest {
    type Error = &'static str;

    fn try_from(w: ModeWire) -> Result<Self, Self::Error> {
        let scope = match (w.from, w.to) {
            (None, None) => Scope::Global,
            (Some(from), Some(to)) => Scope::Pair { from, to },
            _ => return Err("a pair's mode needs both --from and --to"),
        };
        Ok(ModeRequest {
            mode: w.mode,
            scope,
            for_secs: w.for_secs,
        })
    }
}

impl From<ModeRequest> for ModeWire {
    fn from(r: ModeRequest) -> Self {
        let (from, to) = match r.scope {
            Scope::Global => (None, None),
            Scope::Pair { from, to } => (Some(from), Some(to)),
        };
        ModeWire {
            mode: r.mode,
            from,
            to,
            for_secs: r.for_secs,
        }
    }
}

/// The answer to `mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeReply {
    /// `global` or `from->to`.
    pub scope: String,
    /// The mode before.
    pub from: Mode,
    pub to: Mode,
    /// When a break-glass switch reverts (RFC 3339); `null` for a lasting one.
    pub expires_at: Option<String>,
}

/// The answer to `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// `sha256:…` of the policy file now in force.
    pub revision: String,
}

/// The answer to `status`. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// When the agent started (RFC 3339).
    pub since: String,
    pub uptime_s: u64,
    pub pid: u32,
    /// The policy file.
    pub policy: String,
    /// `sha256:…` of the policy file in force.
    pub revision: String,
    /// The global mode.
    pub mode: Mode,
    /// Where the global mode comes from: `runtime` or `policy`.
    pub mode_source: ModeSource,
    pub cgroup_root: String,
    /// The programs attached.
    pub hooks: Vec<String>,
    pub pin_root: String,
    /// Whether the agent adopted pinned state.
    pub adopted: bool,
    /// Every env, `host` and `world` included, in id order.
    pub envs: Vec<String>,
    /// Break-glass switches waiting to revert.
    pub pending_reverts: Vec<PendingRevert>,
    /// Every pair of envs, `from` major.
    pub pairs: Vec<PairStatus>,
    /// The control socket's admission (absent in answers of agents older than
    /// its limits).
    #[serde(default)]
    pub control: ControlStatus,
    /// Registered containers, by cgroup id (absent when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<crate::containers::Registered>,
    /// Container endpoints in force: addresses of other network namespaces
    /// and the env they belong to (absent in answers of older agents).
    #[serde(default)]
    pub endpoints: Vec<EndpointStatus>,
    /// The listed interfaces that exist, with the tc hooks on them (omitted
    /// when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
}

/// One container endpoint (see the README, "Container endpoints").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub address: String,
    /// An env of the policy, or `endpoint-conflict`.
    pub env: String,
    /// The inode of the network namespace that has it (the lowest one when
    /// several of the same env do).
    pub netns: u64,
    /// Since when it has had this env (RFC 3339).
    pub since: String,
}

/// One interface the policy lists, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub env: String,
    /// `tcx` (pinned links) or `clsact` (cls_bpf filters).
    pub attach: String,
}

/// Where a mode comes from, as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeSource {
    /// An operator's switch (`envguard mode`).
    Runtime,
    /// The policy file (its `mode`; for a pair, a `[[pair_mode]]`).
    Policy,
    /// A pair without a mode of its own: the global mode applies.
    Global,
}

/// One env pair in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    pub from: String,
    pub to: String,
    pub decision: PairDecision,
    pub mode: Mode,
    /// `runtime`, `policy` or `global`.
    pub mode_source: ModeSource,
    /// Decisions since the agent started.
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
}

/// The policy's decision for a pair in general.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairDecision {
    /// Every flow allowed.
    Allow,
    /// Some ports or protocols allowed, or some denied.
    Ports,
    /// A violation, refused (enforce mode).
    Deny,
    /// A violation, let through and reported (audit mode).
    Audit,
}

impl PairDecision {
    pub fn name(self) -> &'static str {
        match self {
            PairDecision::Allow => "allow",
            PairDecision::Ports => "ports",
            PairDecision::Deny => "deny",
            PairDecision::Audit => "audit",
        }
    }
}

/// A break-glass switch waiting to revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRevert {
    /// `global` or `from->to`.
    pub scope: String,
    pub mode: Mode,
    /// `audit`, `enforce`, or `policy` (back to the policy file's mode).
    pub reverts_to: String,
    /// RFC 3339.
    pub expires_at: String,
}

impl Request {
    /// Whether the request changes the agent's state.
    pub fn mutates(&self) -> bool {
        // Registering is a change of who is in which env: a user who could
        // register could put a prod cgroup into dev (or their own into prod).
        matches!(
            self,
            Request::Mode(_)
                | Request::Reload {}
                | Request::ProbeMark { .. }
                | Request::Register(_)
        )
    }
}

/// Who sent a request.
#[derive(Debug, Clone, Serialize)]
pub struct Actor {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub comm: String,
}

impl Actor {
    /// The agent itself (a break-glass expiry, SIGHUP).
    pub fn agent(what: &str) -> Actor {
        Actor {
            // SAFETY: geteuid cannot fail.
            uid: Some(unsafe { libc::geteuid() }),
            pid: Some(std::process::id() as i32),
            comm: what.to_owned(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    pub fn err(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            result: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Gate, Limits};

    #[test]
    fn requests_are_schema_checked() {
        let ok: Request =
            serde_json::from_str(r#"{"cmd":"mode","mode":"audit","for_secs":60}"#).unwrap();
        assert_eq!(
            ok,
            Request::Mode(ModeRequest {
                mode: Mode::Audit,
                scope: Scope::Global,
                for_secs: Some(60)
            })
        );
        assert!(ok.mutates());
        for bad in [
            r#"{"cmd":"rm -rf"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"mode"}"#,
            r#"{"cmd":"mode","mode":1}"#,
            "not json",
            "",
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "{bad} accepted"
            );
        }
        assert!(!Request::Status {}.mutates());
        assert!(!Request::Events {}.mutates());
        // verify's requests: reading the loaded policy is for anyone the
        // socket admits; marking probe cgroups changes records, root only.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"policy"}"#).unwrap(),
            Request::Policy {}
        );
        assert!(!Request::Policy {}.mutates());
        let mark: Request =
            serde_json::from_str(r#"{"cmd":"probe_mark","cgroup_id":42,"run":"verify-1-2"}"#)
                .unwrap();
        assert_eq!(
            mark,
            Request::ProbeMark {
                cgroup_id: 42,
                run: "verify-1-2".into(),
                ttl_secs: None
            }
        );
        assert!(mark.mutates());
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"probe_mark","run":"r"}"#).is_err(),
            "a mark without a cgroup id"
        );
    }

    /// `register` is the hook's wire format; it changes who is in which
    /// env, so only root may send it.
    #[test]
    fn register_is_schema_checked_and_root_only() {
        use crate::containers::{Claim, ContainerRef, RegisterRequest};
        let r: Request = serde_json::from_str(
            r#"{"cmd":"register","cgroup":"/m/libpod-1","claim":{"k8s_namespace":"prod-x"},"container":{"id":"1","name":"api"}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Register(RegisterRequest {
                cgroup: "/m/libpod-1".into(),
                claim: Claim::K8sNamespace("prod-x".into()),
                container: ContainerRef {
                    id: "1".into(),
                    name: "api".into()
                },
            })
        );
        assert!(r.mutates());
        for bad in [
            r#"{"cmd":"register","cgroup":"/a","claim":{"env":"dev"}}"#,
            r#"{"cmd":"register","cgroup":"/a","claim":{"team":"x"},"container":{"id":"1","name":"a"}}"#,
            r#"{"cmd":"register","cgroup":"/a","claim":{"env":"dev"},"container":{"id":"1","name":"a"},"pid":1}"#,
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    /// `status --json`'s fields, nesting and order are a contract.
    #[test]
    fn status_reply_keeps_its_wire_shape() {
        let reply = StatusReply {
            since: "2026-11-23T10:00:00Z".into(),
            uptime_s: 5,
            pid: 1,
            policy: "/etc/envguard/policy.toml".into(),
            revision: "sha256:00".into(),
            mode: Mode::Enforce,
            mode_source: ModeSource::Runtime,
            cgroup_root: "/".into(),
            hooks: vec!["connect4".into()],
            pin_root: "/sys/fs/bpf/envguard".into(),
            adopted: false,
            envs: vec!["host".into()],
            pending_reverts: vec![PendingRevert {
                scope: "global".into(),
                mode: Mode::Audit,
                reverts_to: "policy".into(),
                expires_at: "2026-11-23T11:00:00Z".into(),
            }],
            pairs: vec![PairStatus {
                from: "host".into(),
                to: "host".into(),
                decision: PairDecision::Allow,
                mode: Mode::Enforce,
                mode_source: ModeSource::Global,
                allowed: 1,
                denied: 2,
                audited: 3,
            }],
            control: Gate::new(Limits::default()).status(),
            containers: vec![],
            endpoints: vec![EndpointStatus {
                address: "198.18.1.1".into(),
                env: "prod".into(),
                netns: 4026532000,
                since: "2026-11-23T10:00:01Z".into(),
            }],
            interfaces: vec![],
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"since":"2026-11-23T10:00:00Z","uptime_s":5,"pid":1,"policy":"/etc/envguard/policy.toml","#,
                r#""revision":"sha256:00","mode":"enforce","mode_source":"runtime","cgroup_root":"/","#,
                r#""hooks":["connect4"],"pin_root":"/sys/fs/bpf/envguard","adopted":false,"envs":["host"],"#,
                r#""pending_reverts":[{"scope":"global","mode":"audit","reverts_to":"policy","expires_at":"2026-11-23T11:00:00Z"}],"#,
                r#""pairs":[{"from":"host","to":"host","decision":"allow","mode":"enforce","mode_source":"global","allowed":1,"denied":2,"audited":3}],"#,
                r#""control":{"open":{"root":0,"others":0,"subscribers":0},"refused_total":0,"#,
                r#""refused":{"root":0,"others":0,"per_uid":0,"subscribers":0,"subscribers_per_uid":0},"#,
                r#""limits":{"root":1024,"others":1024,"per_uid":64,"subscribers":256,"subscribers_per_uid":16}},"#,
                r#""endpoints":[{"address":"198.18.1.1","env":"prod","netns":4026532000,"since":"2026-11-23T10:00:01Z"}]}"#
            )
        );
        assert_eq!(serde_json::from_str::<StatusReply>(&json).unwrap(), reply);
    }
}
