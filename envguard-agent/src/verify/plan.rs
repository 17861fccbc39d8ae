//! What verify probes and what it expects of each probe, and how an observed
//! result is judged. Pure: the decision comes from a caller-given function
//! (the agent's `explain` over the policy in force, or `explain::explain`
//! over a file offline), so the expectation is the shared decision
//! (`envguard_common::decide`) and never a second implementation of it.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    explain::{Endpoint, Explanation, PortProto},
    policy::{Policy, probe::ProbeProto},
};

/// A local env and the cgroup its probes run below (its first listed one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEnv {
    pub env: String,
    pub cgroup: String,
}

/// The envs verify can probe from: those with at least one listed cgroup.
pub fn local_envs(policy: &Policy) -> Vec<LocalEnv> {
    policy
        .envs
        .iter()
        .filter_map(|e| {
            Some(LocalEnv {
                env: e.name.clone(),
                cgroup: e.cgroups.first()?.clone(),
            })
        })
        .collect()
}

/// Somewhere to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As written in the policy (`198.18.10.5:5432/tcp`), or a listener's
    /// description.
    pub label: String,
    /// `policy` (an env's `probes`) or `listener` (a same-host socket).
    pub kind: String,
    /// The env whose `probes` list it, or the listener's env.
    pub listed_in: String,
    /// The address to probe, or why there is none (a name that did not
    /// resolve, or is not resolved in a dry run).
    pub addr: Result<SocketAddr, String>,
    pub proto: ProbeProto,
    /// What the destination is to the policy: its address, or for a
    /// same-host listener the cgroup of the processes holding it.
    pub dest: Option<Endpoint>,
}

/// The policy targets of every env, resolved with `resolve` (name, port) →
/// addresses.
pub fn policy_targets(
    policy: &Policy,
    mut resolve: impl FnMut(&str, u16) -> Result<Vec<SocketAddr>, String>,
) -> Vec<Target> {
    let mut out = Vec::new();
    for env in &policy.envs {
        for t in &env.probes {
            let addr = match &t.host {
                crate::policy::probe::ProbeHost::Ip(ip) => Ok(SocketAddr::new(*ip, t.port)),
                crate::policy::probe::ProbeHost::Name(n) => resolve(n, t.port).and_then(|a| {
                    // IPv4 first: what a client library would most often pick.
                    a.iter()
                        .find(|a| a.is_ipv4())
                        .or_else(|| a.first())
                        .copied()
                        .ok_or_else(|| format!("{n} resolves to no address"))
                }),
            };
            out.push(Target {
                label: t.to_string(),
                kind: "policy".to_owned(),
                listed_in: env.name.clone(),
                dest: addr.as_ref().ok().map(|a| Endpoint::Ip(a.ip())),
                addr,
                proto: t.proto,
            });
        }
    }
    out
}

/// One probe: from a local env to a target, and what the policy in force
/// expects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planned {
    /// `1`, `2`, … in plan order.
    pub id: usize,
    pub from: String,
    /// The env's first listed cgroup; the probe runs in a transient child of it.
    pub cgroup: String,
    /// The destination env as the policy sees it (the address's CIDR, or the
    /// listener's cgroup); the listing env when unresolved.
    pub to: String,
    pub target: String,
    pub kind: String,
    pub addr: Option<String>,
    pub proto: String,
    /// `allowed`, `denied` (refused: enforce mode), `audited` (a violation
    /// let through and reported) or `unknown` (no address, or no decision).
    pub expect: String,
    /// The deciding rule, as events name it.
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Every local env × every target, with the decision `decide` gives.
pub fn plan(
    locals: &[LocalEnv],
    targets: &[Target],
    mut decide: impl FnMut(&Endpoint, &Endpoint, PortProto) -> Result<Explanation, String>,
) -> Vec<Planned> {
    let mut out = Vec::new();
    for l in locals {
        for t in targets {
            let mut p = Planned {
                id: out.len() + 1,
                from: l.env.clone(),
                cgroup: l.cgroup.clone(),
                to: t.listed_in.clone(),
                target: t.label.clone(),
                kind: t.kind.clone(),
                addr: t.addr.as_ref().ok().map(ToString::to_string),
                proto: t.proto.name().to_owned(),
                expect: "unknown".to_owned(),
                rule: String::new(),
                note: t.addr.as_ref().err().cloned(),
            };
            if let (Ok(addr), Some(dest)) = (&t.addr, &t.dest) {
                let port = PortProto {
                    proto: t.proto.number(),
                    port: addr.port(),
                };
                match decide(&Endpoint::Cgroup(l.cgroup.clone()), dest, port) {
                    Ok(e) => {
                        p.to = e.to.env.clone();
                        p.expect = e.mode.verdict.clone();
                        p.rule = e.rule.label.clone();
                        if t.kind == "policy" && e.to.env != t.listed_in {
                            p.note = Some(format!(
                                "listed in {}'s probes but {} is in env {} ({})",
                                t.listed_in, addr, e.to.env, e.to.reason
                            ));
                        }
                    }
                    Err(e) => p.note = Some(format!("no decision: {e}")),
                }
            }
            out.push(p);
        }
    }
    out
}

/// What a probe saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    /// TCP: the connection was established.
    Connected,
    /// UDP: the datagram was sent.
    Sent,
    /// `EPERM` from connect()/sendmsg(): refused by a cgroup program.
    Eperm,
    /// No answer within the probe's timeout.
    Timeout,
    /// `ECONNREFUSED`: nobody listens there.
    Refused,
    /// `ENETUNREACH`/`EHOSTUNREACH`: no route.
    Unreachable,
    /// Any other error (detail says which).
    Error,
    /// Not run: no address, or the probe could not be started.
    NotRun,
}

/// Whether what was observed is what the policy expects, and a sentence
/// saying so. `record`: the verdict of a violation record the probe caused,
/// if one was seen.
pub fn judge(
    expect: &str,
    observed: Observed,
    detail: &str,
    record: Option<&str>,
) -> (bool, String) {
    let network = |o: Observed| match o {
        Observed::Timeout => Some("timeout"),
        Observed::Refused => Some("connection refused"),
        Observed::Unreachable => Some("network unreachable"),
        _ => None,
    };
    match (expect, observed) {
        (_, Observed::NotRun) => (false, format!("not run: {detail}")),
        (_, Observed::Error) => (false, format!("probe failed: {detail}")),
        ("allowed", Observed::Connected) => (true, "allowed, reachable".to_owned()),
        ("allowed", Observed::Sent) => (true, "allowed, datagram sent".to_owned()),
        ("allowed", Observed::Eperm) => (
            false,
            "refused with EPERM, but the policy allows it".to_owned(),
        ),
        ("allowed", o) => (
            true,
            format!("allowed, unreachable ({})", network(o).unwrap_or("?")),
        ),
        ("denied", Observed::Eperm) => (true, "refused (EPERM)".to_owned()),
        ("denied", o) => (
            false,
            format!(
                "not refused ({}), but the policy refuses it",
                match o {
                    Observed::Connected => "connected",
                    Observed::Sent => "datagram sent",
                    o => network(o).unwrap_or("?"),
                }
            ),
        ),
        ("audited", Observed::Eperm) => (
            false,
            "refused with EPERM, but the pair is in audit mode".to_owned(),
        ),
        ("audited", _) if record == Some("audited") => {
            (true, "audited (violation record seen)".to_owned())
        }
        ("audited", _) => match record {
            Some(v) => (
                false,
                format!("violation record says {v:?}, not \"audited\""),
            ),
            None => (false, "let through but no violation record seen".to_owned()),
        },
        (e, _) => (false, format!("no expectation ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{explain, modes::Modes, policy::compile::compile};
    use std::path::Path;

    const POLICY: &str = r#"
mode = "enforce"
[envs.prod]
cgroups = ["/t/prod"]
cidrs = ["198.18.10.0/24"]
probes = ["198.18.10.5:5432/tcp", "db.example:5432/tcp", "[2001:db8::5]:53/udp"]
[envs.dev]
cgroups = ["/t/dev"]
cidrs = ["198.18.20.0/24"]
probes = ["198.18.20.5:80/tcp"]
[envs.shared]
cidrs = ["198.18.0.0/28"]
probes = ["198.18.0.3:53/udp"]
[[allow]]
from = "*"
to = "shared"
ports = ["53/udp"]
[[pair_mode]]
from = "prod"
to = "dev"
mode = "audit"
"#;

    fn offline() -> Vec<Planned> {
        let p = Policy::parse(Path::new("p.toml"), POLICY).unwrap();
        let c = compile(&p).unwrap();
        let m = Modes::from_policy(&p);
        let targets = policy_targets(&p, |name, _| Err(format!("{name} not resolved (dry run)")));
        plan(&local_envs(&p), &targets, |f, t, port| {
            explain::explain(
                &p,
                &c,
                f,
                t,
                port.proto,
                port.port,
                &explain::State::offline(&m),
            )
            .map_err(|e| e.to_string())
        })
    }

    #[test]
    fn every_local_env_probes_every_target_with_the_shared_decision() {
        let p = offline();
        // dev and prod are local (shared has no cgroups); 5 targets each.
        assert_eq!(p.len(), 10);
        let get = |from: &str, target: &str| {
            p.iter()
                .find(|x| x.from == from && x.target == target)
                .unwrap_or_else(|| panic!("{from} {target}"))
        };
        let d = get("dev", "198.18.10.5:5432/tcp");
        assert_eq!((d.to.as_str(), d.expect.as_str()), ("prod", "denied"));
        assert_eq!(d.cgroup, "/t/dev");
        assert_eq!(d.addr.as_deref(), Some("198.18.10.5:5432"));
        assert!(d.rule.contains("cross-env"), "{}", d.rule);
        let same = get("prod", "198.18.10.5:5432/tcp");
        assert_eq!(same.expect, "allowed");
        let audited = get("prod", "198.18.20.5:80/tcp");
        assert_eq!(
            (audited.to.as_str(), audited.expect.as_str()),
            ("dev", "audited")
        );
        let dns = get("dev", "198.18.0.3:53/udp");
        assert_eq!(
            (dns.to.as_str(), dns.expect.as_str(), dns.proto.as_str()),
            ("shared", "allowed", "udp")
        );
        let v6 = get("dev", "[2001:db8::5]:53/udp");
        assert_eq!(v6.to, "world");
        assert!(
            v6.note
                .as_deref()
                .unwrap()
                .contains("listed in prod's probes but"),
            "{:?}",
            v6.note
        );
        let name = get("dev", "db.example:5432/tcp");
        assert_eq!(
            (name.expect.as_str(), name.to.as_str(), name.addr.as_deref()),
            ("unknown", "prod", None)
        );
        assert_eq!(
            name.note.as_deref(),
            Some("db.example not resolved (dry run)")
        );
        assert_eq!(
            p.iter().map(|x| x.id).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn judging_follows_the_contract() {
        use Observed::*;
        for (expect, obs, record, ok, says) in [
            ("allowed", Connected, None, true, "allowed, reachable"),
            ("allowed", Sent, None, true, "allowed, datagram sent"),
            (
                "allowed",
                Timeout,
                None,
                true,
                "allowed, unreachable (timeout)",
            ),
            (
                "allowed",
                Refused,
                None,
                true,
                "allowed, unreachable (connection refused)",
            ),
            (
                "allowed",
                Unreachable,
                None,
                true,
                "allowed, unreachable (network unreachable)",
            ),
            (
                "allowed",
                Eperm,
                None,
                false,
                "refused with EPERM, but the policy allows it",
            ),
            ("denied", Eperm, None, true, "refused (EPERM)"),
            (
                "denied",
                Connected,
                None,
                false,
                "not refused (connected), but the policy refuses it",
            ),
            (
                "denied",
                Timeout,
                None,
                false,
                "not refused (timeout), but the policy refuses it",
            ),
            (
                "audited",
                Connected,
                Some("audited"),
                true,
                "audited (violation record seen)",
            ),
            (
                "audited",
                Timeout,
                Some("audited"),
                true,
                "audited (violation record seen)",
            ),
            (
                "audited",
                Connected,
                None,
                false,
                "let through but no violation record seen",
            ),
            (
                "audited",
                Eperm,
                None,
                false,
                "refused with EPERM, but the pair is in audit mode",
            ),
            ("unknown", NotRun, None, false, "not run: x"),
            ("allowed", Error, None, false, "probe failed: x"),
        ] {
            assert_eq!(
                judge(expect, obs, "x", record),
                (ok, says.to_owned()),
                "{expect} {obs:?}"
            );
        }
    }
}
