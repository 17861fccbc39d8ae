//! What-if: the decision envguard takes for one flow, and why — each side's
//! env and what put it there, the deciding rule, and what the mode does.
//!
//! Pure: it runs the kernel's own decision (`envguard_common::decide`) over
//! the compiled policy (`policy::compile::Compiled`), with the same lookups
//! as the kernel's maps (longest-prefix match over the rule and CIDR entries,
//! deepest listed cgroup); the root suite's truth table checks that both
//! give the same verdicts and rule labels. The agent-loss fail modes are left out: they only apply while no
//! agent runs.
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use envguard_common::{
    config::EnvLoss,
    decide::{self as shared, ModeLookup, RuleLookup},
    event::{AF_INET, VERDICT_ALLOWED, VERDICT_DENIED, ViolationEvent},
    policy::{RULE_NONE, RULE_PREFIX_PORT, RuleKey},
};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::{
    cgroups,
    endpoints::Owner,
    events::{rule_label, verdict_name},
    modes::Modes,
    policy::{
        ANY, OnLoss, Policy, PortSpec, compile::Compiled, normalize_cgroup, ports::proto_name,
    },
};

/// One side of a flow, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// An address: its env is a learnt container endpoint's (asking the
    /// agent), else the longest-prefix match over the envs' CIDRs (an
    /// IPv4-mapped IPv6 address counts as IPv4), else `world`.
    Ip(IpAddr),
    /// A cgroup path below the cgroup2 mount (normalised): the env of its
    /// deepest listed ancestor, else `host`.
    Cgroup(String),
    /// An env by name: `host`, `world` or a declared env.
    Env(String),
    /// `iface:NAME`: traffic entering (source) or leaving (destination) the
    /// host through that interface, as the tc hooks see it: the env whose
    /// `interfaces` match the name.
    Interface(String),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with('/') {
            return normalize_cgroup(s).map(Endpoint::Cgroup);
        }
        if let Some(name) = s.strip_prefix("iface:") {
            return match crate::policy::interfaces::IfacePattern::parse(name)? {
                crate::policy::interfaces::IfacePattern::Name(n) => Ok(Endpoint::Interface(n)),
                crate::policy::interfaces::IfacePattern::Prefix(_) => {
                    Err(format!("{s:?}: name one interface (no `*`)"))
                }
            };
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse() {
            return Ok(Endpoint::Ip(ip));
        }
        if s == ANY {
            return Err(
                "\"*\" is not one env: give an IP address, a cgroup path or an env name".to_owned(),
            );
        }
        if s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            let hint = if s.parse::<IpNetwork>().is_ok() {
                " (a CIDR: give one address of it)"
            } else {
                ""
            };
            return Err(format!(
                "{s:?} is not an IP address, a cgroup path (starting with '/') or an env name{hint}"
            ));
        }
        Ok(Endpoint::Env(s.to_owned()))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ip(ip) => write!(f, "{ip}"),
            Endpoint::Cgroup(path) => f.write_str(path),
            Endpoint::Env(name) => f.write_str(name),
            Endpoint::Interface(name) => write!(f, "iface:{name}"),
        }
    }
}

/// A protocol and a destination port: `443/tcp`, `53/udp`, or a bare `icmp` /
/// `icmpv6` (no port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortProto {
    /// IP protocol number.
    pub proto: u8,
    /// 0 for ICMP, as the kernel looks it up.
    pub port: u16,
}

impl FromStr for PortProto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let specs = PortSpec::parse_entry(s)?;
        match specs.as_slice() {
            [PortSpec { proto, ports: None }]
                if proto_name(*proto).is_some_and(|n| n.starts_with("icmp")) =>
            {
                Ok(PortProto {
                    proto: *proto,
                    port: 0,
                })
            }
            [PortSpec { ports: None, .. }] => {
                Err(format!("{s:?} names no port: give one, e.g. 443/{s}"))
            }
            [
                PortSpec {
                    proto,
                    ports: Some((lo, hi)),
                },
            ] if lo == hi => Ok(PortProto {
                proto: *proto,
                port: *lo,
            }),
            [_] => Err(format!("{s:?} is a range: explain takes one port")),
            _ => Err(format!("{s:?} names no protocol: give {s}/tcp or {s}/udp")),
        }
    }
}

impl fmt::Display for PortProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match proto_name(self.proto) {
            Some(name) if name.starts_with("icmp") => f.write_str(name),
            Some(name) => write!(f, "{}/{name}", self.port),
            None => write!(f, "{}/{}", self.port, self.proto),
        }
    }
}

/// The policy's decision for a flow between two env ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding rule id as in events: an index into `Policy::rules`,
    /// `compile::RULE_DEFAULT_*`, or `RULE_NONE` (same env allowed, or no
    /// allow rule).
    pub rule: u32,
}

/// The kernel's decision, fail modes aside: the shared decision
/// (`envguard_common::decide::decide`, which the kernel's programs run over
/// their maps) over the compiled entries.
pub fn decide(compiled: &Compiled, src: u32, dst: u32, proto: u8, port: u16) -> Decision {
    let d = shared::decide(compiled, src, dst, proto, port);
    Decision {
        allowed: !d.is_violation(),
        rule: d.rule,
    }
}

/// The compiled policy answers the shared decision's questions as the
/// kernel's maps would: both rule lookups are longest-prefix matches, so the
/// rule named is the one the kernel names. No heartbeat: offline, the
/// agent-loss fail modes never apply (they only do while no agent runs).
impl RuleLookup for Compiled {
    fn deny_rule(&self, key: &RuleKey) -> Option<u32> {
        longest_match(&self.deny_rules, key)
    }

    fn allow_rule(&self, key: &RuleKey) -> Option<u32> {
        longest_match(&self.rules, key)
    }

    fn env_loss(&self, env: u32) -> Option<&EnvLoss> {
        self.env_loss.get(env as usize)
    }

    fn heartbeat_ns(&self) -> u64 {
        0
    }

    fn now_ns(&self) -> u64 {
        0
    }
}

/// The modes in force, by env id, with the kernel's encoding.
struct ModesById<'a> {
    modes: &'a Modes,
    compiled: &'a Compiled,
}

impl ModeLookup for ModesById<'_> {
    fn global_mode(&self) -> u32 {
        self.modes.global().0.kernel()
    }

    fn pair_mode(&self, src: u32, dst: u32) -> Option<u32> {
        self.modes.kernel_pair(self.compiled, src, dst)
    }
}

/// The rule id of the longest entry whose prefix matches `key`, as an LPM
/// trie lookup with the full key (`RULE_PREFIX_PORT` bits) finds it.
fn longest_match(entries: &[(u32, RuleKey, u32)], key: &RuleKey) -> Option<u32> {
    let bits = key_bits(key);
    entries
        .iter()
        .filter(|(prefix, k, _)| {
            *prefix <= RULE_PREFIX_PORT && prefix_matches(&key_bits(k), &bits, *prefix)
        })
        .max_by_key(|(prefix, _, _)| *prefix)
        .map(|(_, _, rule)| *rule)
}

/// A rule key's bytes in trie order.
fn key_bits(k: &RuleKey) -> [u8; 11] {
    let mut b = [0; 11];
    b[..4].copy_from_slice(&k.src_env);
    b[4..8].copy_from_slice(&k.dst_env);
    b[8] = k.proto;
    b[9..].copy_from_slice(&k.port);
    b
}

fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// One side of the flow: its env and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// As given: an address, a cgroup path or an env name.
    pub input: String,
    pub env: String,
    /// `cidr`, `cgroup`, `named` or `default`.
    pub env_from: String,
    /// E.g. `cidr 198.18.10.0/24 of prod`, `default: in no CIDR → world`.
    pub reason: String,
}

/// The rule that decided, named as in `violation` events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidingRule {
    pub label: String,
    /// The rule's line in the policy file; `None` for defaults.
    pub line: Option<usize>,
}

/// What the mode in force does with the decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeEffect {
    /// `audit` or `enforce`.
    pub mode: String,
    /// `global`, or `pair dev->prod` when the pair has its own mode.
    pub scope: String,
    /// Where the pair's mode comes from (`[[pair_mode]] …, line N`, a runtime
    /// override); `None` for the global mode.
    pub origin: Option<String>,
    /// As in events: `allowed`, `denied` (refused or dropped) or `audited`.
    pub verdict: String,
    /// For people: `allowed`, `refused`, `allowed and reported`.
    pub effect: String,
}

/// The answer of `envguard explain`; JSON with `--json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub from: Side,
    pub to: Side,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// `None` for ICMP.
    pub port: Option<u16>,
    /// `allowed` or `violation`.
    pub decision: String,
    pub rule: DecidingRule,
    pub mode: ModeEffect,
    /// What offline reasoning cannot see (e.g. a destination on this host).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown env {name:?}; known: {known}")]
    UnknownEnv { name: String, known: String },
}

/// What the decision depends on besides the policy file: the modes in
/// force, and the container endpoints the agent learnt (address → owner),
/// which the kernel consults before any CIDR. `endpoints` is `None`
/// offline: no agent, so nothing learnt to know.
pub struct State<'a> {
    pub modes: &'a Modes,
    pub endpoints: Option<&'a BTreeMap<IpAddr, Owner>>,
}

impl<'a> State<'a> {
    /// Without an agent: the modes a policy file sets, no endpoints.
    pub fn offline(modes: &'a Modes) -> Self {
        State {
            modes,
            endpoints: None,
        }
    }
}

/// Explains the flow from `from` to `to` on `proto`/`port` under `compiled`
/// (compiled from `policy`) in `state`.
pub fn explain(
    policy: &Policy,
    compiled: &Compiled,
    from: &Endpoint,
    to: &Endpoint,
    proto: u8,
    port: u16,
    state: &State<'_>,
) -> Result<Explanation, ExplainError> {
    let modes = state.modes;
    let mut notes = Vec::new();
    // The kernel looks up same-host peers for TCP and UDP only.
    let socket_peer = proto_name(proto).is_some_and(|n| n == "tcp" || n == "udp");
    let (src, from_side) = resolve(compiled, state, from, None, &mut notes)?;
    let (dst, to_side) = resolve(compiled, state, to, Some(socket_peer), &mut notes)?;
    if state.endpoints.is_none() && [from, to].iter().any(|e| matches!(e, Endpoint::Ip(_))) {
        notes.push(
            "offline: a container's address the agent learns as an endpoint takes its container's env before any CIDR; ask the running agent (no --policy) to see those"
                .to_owned(),
        );
    }
    let modes_by_id = ModesById { modes, compiled };
    let outcome = shared::outcome(compiled, &modes_by_id, src, dst, proto, port);
    let decision = Decision {
        allowed: !outcome.decision.is_violation(),
        rule: outcome.decision.rule,
    };

    let label = if decision.allowed && decision.rule == RULE_NONE {
        "same-env (flows within one env are allowed)".to_owned()
    } else {
        rule_label(
            policy,
            compiled,
            &labelled_event(src, dst, proto, decision.rule),
        )
    };
    let line = policy.rules.get(decision.rule as usize).map(|r| r.line);

    let (mode, source) = modes.of(&from_side.env, &to_side.env);
    let verdict = verdict_name(outcome.verdict);
    let effect = match outcome.verdict {
        VERDICT_ALLOWED => "allowed",
        VERDICT_DENIED => "refused",
        _ => "allowed and reported",
    };
    let scope = if source.is_pair() {
        format!("pair {}->{}", from_side.env, to_side.env)
    } else {
        "global".to_owned()
    };

    let same_env = from_side.env == to_side.env;
    for side in [&from_side, &to_side]
        .into_iter()
        .take(if same_env { 1 } else { 2 })
    {
        if let Some(env) = policy.envs.iter().find(|e| e.name == side.env)
            && env.on_agent_loss != OnLoss::Keep
        {
            notes.push(format!(
                "once no agent has run for {}, {}'s fail mode decides instead: {}",
                humantime::format_duration(env.agent_loss_timeout),
                env.name,
                match env.on_agent_loss {
                    OnLoss::Open => "allowed",
                    _ => "a violation",
                }
            ));
        }
    }

    let icmp = proto_name(proto).is_some_and(|n| n.starts_with("icmp"));
    Ok(Explanation {
        from: from_side,
        to: to_side,
        proto: proto_name(proto).map_or_else(|| proto.to_string(), str::to_owned),
        port: (!icmp).then_some(port),
        decision: if decision.allowed {
            "allowed"
        } else {
            "violation"
        }
        .to_owned(),
        rule: DecidingRule { label, line },
        mode: ModeEffect {
            mode: mode.to_string(),
            scope,
            origin: source.pair_origin(),
            verdict: verdict.to_owned(),
            effect: effect.to_owned(),
        },
        notes,
    })
}

/// The env id of one side, and why. `destination`: for the destination side,
/// whether the kernel would look for a receiving socket on this host.
fn resolve(
    compiled: &Compiled,
    state: &State<'_>,
    endpoint: &Endpoint,
    destination: Option<bool>,
    notes: &mut Vec<String>,
) -> Result<(u32, Side), ExplainError> {
    let input = endpoint.to_string();
    let side = |env: u32, env_from: &str, reason: String| {
        (
            env,
            Side {
                input: input.clone(),
                env: compiled.env_name(env).to_owned(),
                env_from: env_from.to_owned(),
                reason,
            },
        )
    };
    Ok(match endpoint {
        Endpoint::Env(name) => {
            let env = compiled
                .env_id(name)
                .ok_or_else(|| ExplainError::UnknownEnv {
                    name: name.clone(),
                    known: compiled
                        .env_ids()
                        .map(|id| compiled.env_name(id))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            side(env, "named", "named env".to_owned())
        }
        Endpoint::Cgroup(path) => {
            if path == "/sys/fs/cgroup" || path.starts_with("/sys/fs/cgroup/") {
                notes.push(format!(
                    "cgroup paths are relative to the cgroup2 mount: {path} is probably {}",
                    path.trim_start_matches("/sys/fs/cgroup/unified")
                        .trim_start_matches("/sys/fs/cgroup")
                ));
            }
            if destination == Some(true) {
                notes.push(
                    "a destination on this host: the kernel takes the env of the receiving socket's cgroup, as here, if the socket was bound while envguard ran (else host)"
                        .to_owned(),
                );
            }
            match cgroups::deepest_listed(path, &compiled.cgroups) {
                Some((listed, env)) if listed == path => {
                    side(*env, "cgroup", format!("cgroup {listed} (listed)"))
                }
                Some((listed, env)) => side(
                    *env,
                    "cgroup",
                    format!("cgroup {listed} (deepest listed ancestor)"),
                ),
                None => side(
                    envguard_common::policy::ENV_HOST,
                    "default",
                    "default: below no listed cgroup → host".to_owned(),
                ),
            }
        }
        Endpoint::Interface(name) => {
            match compiled.interfaces.iter().find(|(p, _)| p.matches(name)) {
                Some((pattern, env)) => side(
                    *env,
                    "interface",
                    format!(
                        "interface {name} matches {pattern} of {}",
                        compiled.env_name(*env)
                    ),
                ),
                None => {
                    notes.push(format!(
                        "no env lists interface {name}: no tc hook is attached to it, and its traffic's env comes from addresses (CIDR)"
                    ));
                    side(
                        envguard_common::policy::ENV_WORLD,
                        "default",
                        format!("default: interface {name} is listed by no env → world"),
                    )
                }
            }
        }
        Endpoint::Ip(ip) => {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(*v6), IpAddr::V4),
                v4 => *v4,
            };
            if destination == Some(true) && (ip.is_loopback() || ip.is_unspecified()) {
                notes.push(format!(
                    "{ip} is on this host: in the kernel the socket that receives it decides its env; explain that socket's cgroup instead"
                ));
            }
            if let Some(owner) = state.endpoints.and_then(|e| e.get(&ip)) {
                return Ok(side(
                    owner.env,
                    "endpoint",
                    format!(
                        "endpoint {ip}: an address of network namespace {} (learnt), whose processes are in {}",
                        owner.netns,
                        compiled.env_name(owner.env)
                    ),
                ));
            }
            match cidr_of(compiled, ip) {
                Some((net, env)) => side(
                    env,
                    "cidr",
                    format!("cidr {net} of {}", compiled.env_name(env)),
                ),
                None => side(
                    envguard_common::policy::ENV_WORLD,
                    "default",
                    "default: in no CIDR → world".to_owned(),
                ),
            }
        }
    })
}

/// The longest CIDR entry containing `ip`, and its env id.
fn cidr_of(compiled: &Compiled, ip: IpAddr) -> Option<(IpNetwork, u32)> {
    match ip {
        IpAddr::V4(a) => compiled
            .cidrs_v4
            .iter()
            .filter(|(p, net, _)| prefix_matches(net, &a.octets(), *p))
            .max_by_key(|(p, _, _)| *p)
            .and_then(|(p, net, env)| Some((IpNetwork::new((*net).into(), *p as u8).ok()?, *env))),
        IpAddr::V6(a) => compiled
            .cidrs_v6
            .iter()
            .filter(|(p, net, _)| prefix_matches(net, &a.octets(), *p))
            .max_by_key(|(p, _, _)| *p)
            .and_then(|(p, net, env)| Some((IpNetwork::new((*net).into(), *p as u8).ok()?, *env))),
    }
}

/// The fields `events::rule_label` reads, so that explain names a rule
/// exactly as a `violation` event does.
fn labelled_event(src: u32, dst: u32, proto: u8, rule: u32) -> ViolationEvent {
    ViolationEvent {
        boot_ns: 0,
        cgroup_id: 0,
        peer_cgroup_id: 0,
        src_addr: [0; 16],
        dst_addr: [0; 16],
        comm: [0; 16],
        pid: 0,
        uid: u32::MAX,
        src_env: src,
        dst_env: dst,
        src_port: 0,
        dst_port: 0,
        family: AF_INET,
        proto,
        hook: 0,
        verdict: 0,
        direction: 0,
        src_env_from: 0,
        dst_env_from: 0,
        mode: 0,
        rule,
        ifindex: 0,
        _pad: 0,
    }
}

impl fmt::Display for Explanation {
    /// A few aligned lines for people.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.from.input.len().max(self.to.input.len());
        let env_width = self.from.env.len().max(self.to.env.len());
        for (name, s) in [("from", &self.from), ("to", &self.to)] {
            writeln!(
                f,
                "{name:<9}{:<width$}  {:<env_width$}  {}",
                s.input, s.env, s.reason
            )?;
        }
        let port = match self.port {
            Some(p) => format!("{p}/{}", self.proto),
            None => self.proto.clone(),
        };
        writeln!(
            f,
            "{:<9}{} -> {}, {port}",
            "flow", self.from.env, self.to.env
        )?;
        writeln!(f, "{:<9}{}", "decision", self.decision)?;
        let line = self
            .rule
            .line
            .filter(|l| !self.rule.label.contains(&format!("(line {l})")))
            .map_or_else(String::new, |l| format!(" (line {l})"));
        writeln!(f, "{:<9}{}{line}", "rule", self.rule.label)?;
        let origin = self
            .mode
            .origin
            .as_ref()
            .map_or_else(String::new, |o| format!("  [{o}]"));
        write!(
            f,
            "{:<9}{} ({}): {}{origin}",
            "mode", self.mode.mode, self.mode.scope, self.mode.effect
        )?;
        for note in &self.notes {
            write!(f, "\n{:<9}{note}", "note")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
