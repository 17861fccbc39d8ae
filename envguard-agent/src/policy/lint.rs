//! The lint pass of `envguard check`: parts of a valid policy that do nothing,
//! or do something an operator may not expect. Warnings only — the policy
//! loads as it is.
//!
//! Found:
//! - an env with neither cgroups, CIDRs nor k8s namespaces (only containers
//!   registered by their label are in it), and any rule or `[[pair_mode]]`
//!   naming one;
//! - an `[[allow]]` between an env and itself (same-env flows are always
//!   allowed), an allow that a single `[[deny]]` covers (deny beats allow), an
//!   allow that another allow covers or duplicates, and an allow of flows the
//!   `[defaults]` already allow;
//! - a `[[deny]]` that another deny covers or duplicates;
//! - a `ports` entry that another entry of the same rule covers;
//! - a CIDR inside another env's CIDR (legal, the longest prefix wins: said
//!   with both named), a CIDR inside one of its own env's that nothing lies
//!   between (redundant), an IPv4-mapped IPv6 CIDR (never matches: the kernel
//!   looks such addresses up as IPv4);
//! - a `[[pair_mode]]` that a later one overrides for all its pairs, one that
//!   repeats the global mode without overriding an earlier one, one between an
//!   env and itself that no deny or fail-closed mode can make matter.
//!
//! Sound, not complete: a warning is only given when it is true of every flow
//! (same decision, same mode, whichever flows arrive), so some dead rules pass
//! unnoticed. One rule is compared with one other rule at a time: an allow
//! covered only by the union of several rules (e.g. `dev -> prod` on
//! `1-100/tcp` and `101-200/tcp` against an allow of `50-150/tcp`), or a rule
//! with `from = "*"` covered by per-env rules, is not reported. A bare protocol
//! (`tcp`) also matches port 0, so `1-65535/tcp` does not cover it. "Redundant"
//! is about decisions: the rule named in a violation's `rule` may still change
//! when a redundant rule is removed. Whether listed cgroups exist is a fact of
//! the host, not of the file: `cgroups::policy_warnings` reports that.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnetwork::IpNetwork;

use super::{Action, Default, HOST, OnLoss, PairMode, Policy, PortSpec, Rule, Selector, WORLD};
use crate::error::Diagnostic;

/// Every lint warning of a validated policy, in file order.
pub fn lint(policy: &Policy) -> Vec<Diagnostic> {
    let mut l = Lint {
        policy,
        empty: policy
            .envs
            .iter()
            .filter(|e| {
                e.cgroups.is_empty()
                    && e.cidrs.is_empty()
                    && e.k8s_namespaces.is_empty()
                    && e.interfaces.is_empty()
            })
            .map(|e| e.name.as_str())
            .collect(),
        out: Vec::new(),
    };
    l.empty_envs();
    l.cidrs();
    l.rules();
    l.pair_modes();
    // Stable: warnings about one line keep the order they were found in.
    l.out
        .sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    l.out
}

struct Lint<'a> {
    policy: &'a Policy,
    /// Envs with neither cgroups nor CIDRs.
    empty: Vec<&'a str>,
    out: Vec<Diagnostic>,
}

impl Lint<'_> {
    fn warn(&mut self, line: usize, message: String) {
        let (path, line) = self.policy.locate(line);
        self.out.push(Diagnostic {
            path,
            line: Some(line),
            message,
        });
    }

    /// The first env of `sels` that has no cgroups and no CIDRs.
    fn empty_env<'s>(&self, sels: [&'s Selector; 2]) -> Option<&'s str> {
        sels.into_iter().find_map(|s| match s {
            Selector::Env(n) if self.empty.contains(&n.as_str()) => Some(n.as_str()),
            _ => None,
        })
    }

    fn empty_envs(&mut self) {
        for env in &self.policy.envs {
            if self.empty.contains(&env.name.as_str()) {
                self.warn(
                    env.lines.name,
                    format!(
                        "env {} lists no cgroups and no CIDRs: it matches nothing but containers registered into it (envguard oci-hook)",
                        env.name
                    ),
                );
            }
        }
    }

    fn cidrs(&mut self) {
        // (network, env, line) of every CIDR that can match an address.
        let mut all: Vec<(IpNetwork, &str, usize)> = Vec::new();
        for env in &self.policy.envs {
            for (i, net) in env.cidrs.iter().enumerate() {
                let line = env.lines.cidrs.get(i).copied().unwrap_or(env.lines.name);
                if let Some(v4) = v4_mapped(net) {
                    self.warn(
                        line,
                        format!(
                            "CIDR {net} of env {} never matches: the kernel looks IPv4-mapped addresses up as IPv4; write {v4}",
                            env.name
                        ),
                    );
                } else {
                    all.push((*net, &env.name, line));
                }
            }
        }
        // By (network, prefix) for the lookups below; validation refused the
        // same CIDR twice, so keys are unique.
        let by_net: HashMap<(IpAddr, u8), (IpNetwork, &str)> = all
            .iter()
            .map(|&(n, e, _)| ((n.network(), n.prefix()), (n, e)))
            .collect();
        let mut prefixes: Vec<u8> = all.iter().map(|(n, _, _)| n.prefix()).collect();
        prefixes.sort_unstable_by(|a, b| b.cmp(a));
        prefixes.dedup();
        for &(net, env, line) in &all {
            // The CIDR that decides an address of `net` once `net` is removed:
            // the longest one that contains it. One hash lookup per prefix
            // length the policy uses, not a scan of every CIDR (100 000 CIDRs
            // would make that 10^10 comparisons).
            let parent = prefixes
                .iter()
                .filter(|&&p| p < net.prefix())
                .find_map(|&p| {
                    let outer = IpNetwork::new(net.network(), p).ok()?;
                    by_net.get(&(outer.network(), p))
                });
            let Some(&(outer, outer_env)) = parent else {
                continue;
            };
            let message = if outer_env == env {
                format!(
                    "CIDR {net} of env {env} is redundant: it lies inside {outer}, also of {env}, and no other env's CIDR lies between them"
                )
            } else {
                format!(
                    "CIDR {net} of env {env} lies inside {outer} of env {outer_env}: its addresses belong to {env} (the longest prefix wins), the rest of {outer} to {outer_env}"
                )
            };
            self.warn(line, message);
        }
    }

    fn rules(&mut self) {
        let rules = &self.policy.rules;
        let ports: Vec<Option<PortSet>> = rules.iter().map(|r| port_set(&r.ports)).collect();
        let covers = |q: usize, r: usize| {
            selector_covers(&rules[q].from, &rules[r].from)
                && selector_covers(&rules[q].to, &rules[r].to)
                && ports_cover(&ports[q], &ports[r])
        };
        for (i, r) in rules.iter().enumerate() {
            let same_action = |j: &usize| *j != i && rules[*j].action == r.action;
            let earlier_equal = (0..i)
                .filter(same_action)
                .find(|&j| covers(j, i) && covers(i, j));
            let strictly_covering = (0..rules.len())
                .filter(same_action)
                .find(|&j| covers(j, i) && !covers(i, j));
            let what = describe(r);
            let message = if let Some(n) = self.empty_env([&r.from, &r.to]) {
                Some(format!(
                    "{what} matches only containers registered into env {n}: it has no cgroups and no CIDRs"
                ))
            } else if r.action == Action::Allow && is_self_pair(&r.from, &r.to) {
                Some(format!(
                    "{what} never matters: flows within one env are always allowed (only a [[deny]] can refuse them)"
                ))
            } else if let Some(d) = (r.action == Action::Allow)
                .then(|| {
                    (0..rules.len()).find(|&j| rules[j].action == Action::Deny && covers(j, i))
                })
                .flatten()
            {
                Some(format!(
                    "{what} never allows anything: the {} refuses every flow it matches (deny beats allow)",
                    rules[d]
                ))
            } else if let Some(j) = earlier_equal {
                Some(format!(
                    "{what} duplicates the {}: it matches the same flows",
                    rules[j]
                ))
            } else if let Some(j) = strictly_covering {
                let verb = match r.action {
                    Action::Allow => "allows",
                    Action::Deny => "refuses",
                };
                Some(format!(
                    "{what} is redundant: the {} already {verb} every flow it matches",
                    rules[j]
                ))
            } else if r.action == Action::Allow && self.defaults_allow(r) {
                Some(format!(
                    "{what} changes nothing: [defaults] already allow every flow it matches (host = {}, world = {})",
                    default_name(self.policy.default_host),
                    default_name(self.policy.default_world)
                ))
            } else {
                None
            };
            match message {
                Some(m) => self.warn(r.line, m),
                None => {
                    for m in overlapping_ports(r) {
                        self.warn(r.line, format!("{what}: {m}"));
                    }
                }
            }
        }
    }

    /// Whether `[defaults]` allow every flow of an allow rule, as compiled:
    /// a pair involving `host` unless `host = "deny"`, likewise `world`, and
    /// `host` with `world` only if neither denies.
    fn defaults_allow(&self, r: &Rule) -> bool {
        let p = self.policy;
        let names: Vec<&str> = [HOST, WORLD]
            .into_iter()
            .chain(p.envs.iter().map(|e| e.name.as_str()))
            .collect();
        fn expand<'n>(s: &'n Selector, names: &[&'n str]) -> Vec<&'n str> {
            match s {
                Selector::Any => names.to_vec(),
                Selector::Env(n) => vec![n.as_str()],
            }
        }
        let allowed = |s: &str, d: &str| {
            let involves = |e: &str| s == e || d == e;
            (involves(HOST) || involves(WORLD))
                && !(involves(HOST) && p.default_host == Default::Deny)
                && !(involves(WORLD) && p.default_world == Default::Deny)
        };
        let (from, to) = (expand(&r.from, &names), expand(&r.to, &names));
        from.iter()
            .all(|s| to.iter().all(|d| s == d || allowed(s, d)))
    }

    fn pair_modes(&mut self) {
        let pms = &self.policy.pair_modes;
        for (i, pm) in pms.iter().enumerate() {
            let what = format!("[[pair_mode]] {} -> {}", pm.from, pm.to);
            let later = pms[i + 1..]
                .iter()
                .find(|l| selector_covers(&l.from, &pm.from) && selector_covers(&l.to, &pm.to));
            let overrides_earlier = pms[..i].iter().any(|e| {
                e.mode != pm.mode
                    && selector_overlaps(&e.from, &pm.from)
                    && selector_overlaps(&e.to, &pm.to)
            });
            let message = if let Some(n) = self.empty_env([&pm.from, &pm.to]) {
                Some(format!(
                    "{what} matters only for containers registered into env {n}: it has no cgroups and no CIDRs"
                ))
            } else if let Some(l) = later {
                Some(format!(
                    "{what} has no effect: the [[pair_mode]] {} -> {} at {} covers the same pairs, and a later entry wins",
                    l.from,
                    l.to,
                    self.policy.place(l.line)
                ))
            } else if pm.mode == self.policy.mode && !overrides_earlier {
                Some(format!(
                    "{what} repeats the global mode \"{}\": it changes nothing unless the global mode is switched at run time (`envguard mode`)",
                    pm.mode
                ))
            } else {
                self.idle_self_pair(pm).map(|env| {
                    format!(
                        "{what} never matters: flows within {env} are violations only when a [[deny]] matches them or {env} fails closed, and neither can happen"
                    )
                })
            };
            if let Some(m) = message {
                self.warn(pm.line, m);
            }
        }
    }

    /// For a `[[pair_mode]]` from an env to itself: the env, if none of its
    /// same-env flows can ever be a violation (no deny rule matches the pair,
    /// and the env does not fail closed when the agent is gone).
    fn idle_self_pair<'p>(&self, pm: &'p PairMode) -> Option<&'p str> {
        let (Selector::Env(a), Selector::Env(b)) = (&pm.from, &pm.to) else {
            return None;
        };
        if a != b {
            return None;
        }
        let denied = self.policy.rules.iter().any(|r| {
            r.action == Action::Deny && selector_matches(&r.from, a) && selector_matches(&r.to, a)
        });
        let closed = self
            .policy
            .envs
            .iter()
            .any(|e| &e.name == a && e.on_agent_loss == OnLoss::Closed);
        (!denied && !closed).then_some(a.as_str())
    }
}

/// A rule as written, without its line.
fn describe(r: &Rule) -> String {
    let mut s = format!("{} {} -> {}", r.action, r.from, r.to);
    if let Some(ports) = &r.ports {
        let ports: Vec<String> = ports.iter().map(ToString::to_string).collect();
        s.push_str(&format!(" [{}]", ports.join(", ")));
    }
    s
}

fn default_name(d: Default) -> &'static str {
    match d {
        Default::Allow => "\"allow\"",
        Default::Deny => "\"deny\"",
    }
}

fn is_self_pair(from: &Selector, to: &Selector) -> bool {
    matches!((from, to), (Selector::Env(a), Selector::Env(b)) if a == b)
}

/// Whether every env `inner` matches, `outer` matches too.
fn selector_covers(outer: &Selector, inner: &Selector) -> bool {
    *outer == Selector::Any || outer == inner
}

/// Whether some env matches both.
fn selector_overlaps(a: &Selector, b: &Selector) -> bool {
    *a == Selector::Any || *b == Selector::Any || a == b
}

fn selector_matches(s: &Selector, env: &str) -> bool {
    match s {
        Selector::Any => true,
        Selector::Env(n) => n == env,
    }
}

/// The (protocol, port) pairs a `ports` list matches: per protocol, sorted,
/// merged inclusive port intervals (a bare protocol is 0-65535). `None`
/// stands for a rule without `ports`: any protocol and port.
type PortSet = BTreeMap<u8, Vec<(u32, u32)>>;

fn port_set(ports: &Option<Vec<PortSpec>>) -> Option<PortSet> {
    let ports = ports.as_ref()?;
    let mut set = PortSet::new();
    for spec in ports {
        set.entry(spec.proto).or_default().push(interval(spec));
    }
    for intervals in set.values_mut() {
        *intervals = merge(std::mem::take(intervals));
    }
    Some(set)
}

fn interval(spec: &PortSpec) -> (u32, u32) {
    match spec.ports {
        None => (0, u32::from(u16::MAX)),
        Some((lo, hi)) => (u32::from(lo), u32::from(hi)),
    }
}

/// Sorted, with overlapping and adjacent intervals joined.
fn merge(mut intervals: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    intervals.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(intervals.len());
    for (lo, hi) in intervals {
        match out.last_mut() {
            Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn ports_cover(outer: &Option<PortSet>, inner: &Option<PortSet>) -> bool {
    match (outer, inner) {
        (None, _) => true,
        // A list names a few protocols, never all 256.
        (Some(_), None) => false,
        (Some(outer), Some(inner)) => inner.iter().all(|(proto, intervals)| {
            let Some(o) = outer.get(proto) else {
                return false;
            };
            intervals
                .iter()
                .all(|&(lo, hi)| o.iter().any(|&(olo, ohi)| olo <= lo && hi <= ohi))
        }),
    }
}

/// Entries of a rule's `ports` that another entry of it already covers.
fn overlapping_ports(r: &Rule) -> Vec<String> {
    let Some(ports) = &r.ports else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let (lo, hi) = interval(p);
        let covering = ports.iter().enumerate().find(|&(j, q)| {
            let (qlo, qhi) = interval(q);
            let covers = j != i && q.proto == p.proto && qlo <= lo && hi <= qhi;
            // Of two equal entries, the second is the one to remove.
            covers && !(q == p && j > i)
        });
        if let Some((_, q)) = covering {
            out.push(if q == p {
                format!("port {p} is listed twice")
            } else {
                format!("port {p} is already covered by {q}")
            });
        }
    }
    out
}

/// The IPv4 form of an IPv6 CIDR inside `::ffff:0:0/96`.
fn v4_mapped(net: &IpNetwork) -> Option<String> {
    let IpNetwork::V6(v6) = net else {
        return None;
    };
    if v6.prefix() < 96 {
        return None;
    }
    let v4 = v6.network().to_ipv4_mapped()?;
    Some(format!("{v4}/{}", v6.prefix() - 96))
}

#[cfg(test)]
mod tests;
