//! The lint pass of `envguard check`: parts of a valid policy that do nothing,
//! or do something an operator may not expect. Warnings only — the policy
//! loads as it is.
//!
//! Found:
//! - an env with neither cgroups nor CIDRs (it matches nothing), and any rule
//!   or `[[pair_mode]]` naming one;
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
            .filter(|e| e.cgroups.is_empty() && e.cidrs.is_empty())
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
                        "env {} lists no cgroups and no CIDRs: it matches nothing",
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
                    "{what} can never match: env {n} has no cgroups and no CIDRs, so no flow is ever in it"
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
                    "{what} never matters: env {n} has no cgroups and no CIDRs, so no flow is ever in it"
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
mod tests {
    use std::path::Path;

    use super::*;

    fn lint_text(text: &str) -> Vec<(usize, String)> {
        let p = Policy::parse(Path::new("p.toml"), text).expect("valid policy");
        lint(&p)
            .into_iter()
            .map(|d| {
                assert_eq!(d.path, Path::new("p.toml"));
                (d.line.expect("every lint names a line"), d.message)
            })
            .collect()
    }

    /// The single warning of a policy.
    #[track_caller]
    fn one(text: &str) -> (usize, String) {
        let w = lint_text(text);
        assert_eq!(w.len(), 1, "expected one warning, got {w:#?}");
        w.into_iter().next().unwrap()
    }

    #[track_caller]
    fn clean(text: &str) {
        let w = lint_text(text);
        assert!(w.is_empty(), "expected no warning, got {w:#?}");
    }

    const ENVS: &str = r#"mode = "enforce"
[envs.dev]
cgroups = ["/dev.slice"]
cidrs = ["198.18.20.0/24"]
[envs.prod]
cgroups = ["/prod.slice"]
cidrs = ["198.18.10.0/24"]
[envs.shared]
cidrs = ["198.18.0.0/28"]
"#;
    /// Lines of `ENVS`.
    const ENVS_LINES: usize = 9;

    #[test]
    fn the_example_policy_is_clean() {
        let text = include_str!("../../../examples/policy.toml");
        clean(text);
        clean(ENVS);
    }

    #[test]
    fn an_env_with_nothing_in_it() {
        let (line, m) = one("[envs.dev]\ncgroups = [\"/dev.slice\"]\n\n[envs.ghost]\n");
        assert_eq!(line, 4);
        assert!(m.contains("env ghost lists no cgroups and no CIDRs"), "{m}");
        // And every rule naming it can never match.
        let w = lint_text(
            "[envs.dev]\ncgroups = [\"/dev.slice\"]\n[envs.ghost]\n[[allow]]\nfrom = \"dev\"\nto = \"ghost\"\n",
        );
        assert_eq!(w.len(), 2, "{w:#?}");
        assert_eq!(w[1].0, 4);
        assert!(w[1].1.contains("can never match: env ghost"), "{}", w[1].1);
    }

    #[test]
    fn an_allow_within_one_env() {
        let (line, m) = one(&format!("{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"dev\"\n"));
        assert_eq!(line, ENVS_LINES + 1);
        assert!(m.starts_with("allow dev -> dev never matters"), "{m}");
    }

    #[test]
    fn an_allow_under_an_earlier_broader_allow() {
        let text = format!(
            "{ENVS}[[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"8000-8100/tcp\", \"53\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8080/tcp\", \"53/udp\"]\n"
        );
        let (line, m) = one(&text);
        assert_eq!(line, ENVS_LINES + 5);
        assert!(
            m.contains("is redundant: the allow * -> shared")
                && m.contains(&format!("(line {})", ENVS_LINES + 1)),
            "{m}"
        );
    }

    #[test]
    fn adjacent_ranges_together_cover_but_separate_rules_do_not() {
        // One rule with two adjacent ranges covers a range spanning both.
        let (_, m) = one(&format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"1-100/tcp\", \"101-200/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"50-150/tcp\"]\n"
        ));
        assert!(m.contains("is redundant"), "{m}");
        // `b` (line 14) is not covered by `a` (line 10): another protocol, a
        // wider range, the port 0 a bare protocol also matches.
        for (a, b, a_covered) in [
            ("53/tcp", "53/udp", false),
            ("1-100/tcp", "1-101/tcp", true),
            ("1-65535/tcp", "tcp", true),
            ("tcp", "icmp", false),
        ] {
            let w = lint_text(&format!(
                "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"{a}\"]\n\
                 [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"{b}\"]\n"
            ));
            let lines: Vec<usize> = w.iter().map(|(l, _)| *l).collect();
            let expected = if a_covered {
                vec![ENVS_LINES + 1]
            } else {
                vec![]
            };
            assert_eq!(lines, expected, "{a} then {b}: {w:#?}");
        }
        // A narrower source does not cover a wider one.
        clean(&format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"shared\"\n[[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\"]\n"
        ));
    }

    #[test]
    fn an_allow_that_a_deny_covers() {
        let text = format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"5432/tcp\"]\n\
             [[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"tcp\"]\n"
        );
        let (line, m) = one(&text);
        assert_eq!(line, ENVS_LINES + 1);
        assert!(
            m.contains("never allows anything: the deny * -> prod [tcp]")
                && m.contains("deny beats allow"),
            "{m}"
        );
        // A deny of part of it leaves the rest allowed.
        clean(&format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\n[[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n"
        ));
    }

    #[test]
    fn duplicate_rules() {
        // Written differently, the same flows: `53` is 53/tcp and 53/udp.
        let text = format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53/udp\", \"53/tcp\"]\n"
        );
        let (line, m) = one(&text);
        assert_eq!(line, ENVS_LINES + 5);
        assert!(m.contains("duplicates the allow dev -> prod"), "{m}");

        let text = format!(
            "{ENVS}[[deny]]\nfrom = \"dev\"\nto = \"prod\"\n[[deny]]\nfrom = \"dev\"\nto = \"prod\"\n"
        );
        let (line, m) = one(&text);
        assert_eq!(line, ENVS_LINES + 4);
        assert!(m.starts_with("deny dev -> prod duplicates the deny"), "{m}");
    }

    #[test]
    fn a_deny_under_a_broader_deny() {
        let text = format!(
            "{ENVS}[[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n[[deny]]\nfrom = \"*\"\nto = \"prod\"\n"
        );
        let (line, m) = one(&text);
        assert_eq!(line, ENVS_LINES + 1);
        assert!(
            m.contains("is redundant: the deny * -> prod") && m.contains("already refuses"),
            "{m}"
        );
        // A deny within one env is meaningful (it refuses same-env flows).
        clean(&format!(
            "{ENVS}[[deny]]\nfrom = \"prod\"\nto = \"prod\"\nports = [\"22/tcp\"]\n"
        ));
    }

    #[test]
    fn an_allow_the_defaults_already_give() {
        let rule = "[[allow]]\nfrom = \"dev\"\nto = \"world\"\n";
        let (line, m) = one(&format!("{ENVS}{rule}"));
        assert_eq!(line, ENVS_LINES + 1);
        assert!(m.contains("changes nothing: [defaults]"), "{m}");
        // Not when the default denies, nor for host <-> world when one side does.
        let world_deny = ENVS.replace(
            "mode = \"enforce\"\n",
            "mode = \"enforce\"\n[defaults]\nworld = \"deny\"\n",
        );
        clean(&format!("{world_deny}{rule}"));
        let host_deny = ENVS.replace(
            "mode = \"enforce\"\n",
            "mode = \"enforce\"\n[defaults]\nhost = \"deny\"\n",
        );
        clean(&format!(
            "{host_deny}[[allow]]\nfrom = \"host\"\nto = \"world\"\n"
        ));
        // `*` includes declared envs, which no default covers.
        clean(&format!("{ENVS}[[allow]]\nfrom = \"*\"\nto = \"prod\"\n"));
    }

    #[test]
    fn ports_listed_twice_in_one_rule() {
        let text = format!(
            "{ENVS}[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"53\", \"53/udp\", \"8000-8100/tcp\", \"8080/tcp\"]\n"
        );
        let w = lint_text(&text);
        let msgs: Vec<&str> = w.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(w.len(), 2, "{msgs:#?}");
        assert!(msgs[0].ends_with("port 53/udp is listed twice"), "{msgs:?}");
        assert!(
            msgs[1].ends_with("port 8080/tcp is already covered by 8000-8100/tcp"),
            "{msgs:?}"
        );
    }

    #[test]
    fn nested_cidrs() {
        let text = r#"[envs.corp]
cidrs = ["10.0.0.0/8"]
[envs.lab]
cidrs = [
  "10.1.0.0/16",
  "10.1.2.0/24",
]
[envs.odd]
cidrs = ["10.1.2.128/25", "2001:db8::/32"]
"#;
        let w = lint_text(text);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert_eq!(w[0].0, 5);
        assert_eq!(
            w[0].1,
            "CIDR 10.1.0.0/16 of env lab lies inside 10.0.0.0/8 of env corp: its addresses belong to lab (the longest prefix wins), the rest of 10.0.0.0/8 to corp"
        );
        assert_eq!(w[1].0, 6);
        assert!(
            w[1].1.starts_with(
                "CIDR 10.1.2.0/24 of env lab is redundant: it lies inside 10.1.0.0/16"
            ),
            "{}",
            w[1].1
        );
        assert_eq!(w[2].0, 9);
        assert!(
            w[2].1
                .starts_with("CIDR 10.1.2.128/25 of env odd lies inside 10.1.2.0/24 of env lab"),
            "{}",
            w[2].1
        );

        // Inside its own env, but with another env's CIDR between: meaningful.
        let w = lint_text(
            "[envs.a]\ncidrs = [\"10.0.0.0/8\", \"10.1.2.0/24\"]\n[envs.b]\ncidrs = [\"10.1.0.0/16\"]\n",
        );
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w.iter().all(|(_, m)| !m.contains("redundant")), "{w:#?}");

        // IPv4 and IPv6 do not nest.
        clean("[envs.a]\ncidrs = [\"0.0.0.0/0\"]\n[envs.b]\ncidrs = [\"2001:db8::/32\"]\n");
    }

    #[test]
    fn an_ipv4_mapped_cidr() {
        let (line, m) = one("[envs.a]\ncidrs = [\"::ffff:198.18.0.0/112\"]\n");
        assert_eq!(line, 2);
        assert!(
            m.contains("never matches") && m.ends_with("write 198.18.0.0/16"),
            "{m}"
        );
    }

    #[test]
    fn pair_modes() {
        // Repeats the global mode.
        let (line, m) = one(&format!(
            "{ENVS}[[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"enforce\"\n"
        ));
        assert_eq!(line, ENVS_LINES + 1);
        assert!(m.contains("repeats the global mode \"enforce\""), "{m}");

        // Overridden by a later entry for a superset of its pairs.
        let (line, m) = one(&format!(
            "{ENVS}[[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n"
        ));
        assert_eq!(line, ENVS_LINES + 1);
        assert!(
            m.contains(&format!("at line {} covers the same pairs", ENVS_LINES + 5)),
            "{m}"
        );

        // Repeating the global mode to override an earlier, broader entry is
        // what makes it useful: no warning.
        clean(&format!(
            "{ENVS}[[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"enforce\"\n"
        ));

        // Within one env: only matters with a deny or a closed fail mode.
        let (_, m) = one(&format!(
            "{ENVS}[[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n"
        ));
        assert!(m.contains("never matters: flows within prod"), "{m}");
        clean(&format!(
            "{ENVS}[[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n"
        ));
        clean(&format!(
            "{}[[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"audit\"\n",
            ENVS.replace(
                "cgroups = [\"/prod.slice\"]\n",
                "cgroups = [\"/prod.slice\"]\non_agent_loss = \"closed\"\n"
            )
        ));
    }

    /// What happens to each flow between envs that can hold one (not the
    /// empty ones): allowed, or a violation in some mode.
    fn outcome(p: &Policy) -> Vec<String> {
        use crate::{
            explain::decide,
            modes::Modes,
            policy::{
                compile::compile,
                ports::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
            },
        };
        let flows: Vec<(u8, u16)> = [
            0, 1, 22, 53, 5432, 8000, 8079, 8080, 8081, 8100, 8101, 65535,
        ]
        .into_iter()
        .flat_map(|p| [(PROTO_TCP, p), (PROTO_UDP, p)])
        .chain([(PROTO_ICMP, 0)])
        .collect();
        let c = compile(p).unwrap();
        let modes = Modes::from_policy(p);
        let empty: Vec<&str> = p
            .envs
            .iter()
            .filter(|e| e.cgroups.is_empty() && e.cidrs.is_empty())
            .map(|e| e.name.as_str())
            .collect();
        let ids: Vec<u32> = c
            .env_ids()
            .filter(|&id| !empty.contains(&c.env_name(id)))
            .collect();
        let mut out = Vec::new();
        for &s in &ids {
            for &d in &ids {
                let (sn, dn) = (c.env_name(s), c.env_name(d));
                for &(proto, port) in &flows {
                    let what = if decide(&c, s, d, proto, port).allowed {
                        "allowed".to_owned()
                    } else {
                        format!("violation, {}", modes.of(sn, dn).0)
                    };
                    out.push(format!("{sn} -> {dn} {port}/{proto}: {what}"));
                }
            }
        }
        out
    }

    fn changes(a: &[String], b: &[String]) -> Vec<String> {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| format!("{x} => {y}"))
            .collect()
    }

    /// Removes, one at a time, each rule and pair mode the lint warns about,
    /// and asserts that no flow's fate changes (for a pair mode repeating the
    /// global mode, only while the global mode stays). Returns how many rules
    /// and pair modes were warned about.
    #[track_caller]
    fn assert_warned_are_useless(policy: &Policy) -> (usize, usize) {
        let warned: Vec<usize> = lint(policy).iter().filter_map(|d| d.line).collect();
        let before = outcome(policy);
        let mut counts = (0, 0);
        for r in policy.rules.iter().filter(|r| warned.contains(&r.line)) {
            counts.0 += 1;
            let mut p = policy.clone();
            p.rules.retain(|x| x.line != r.line);
            let changed = changes(&before, &outcome(&p));
            assert!(
                changed.is_empty(),
                "removing {r} changes: {changed:#?}\nlint: {:#?}",
                lint(policy)
            );
        }
        for pm in policy
            .pair_modes
            .iter()
            .filter(|p| warned.contains(&p.line))
        {
            counts.1 += 1;
            let mut p = policy.clone();
            p.pair_modes.retain(|x| x.line != pm.line);
            let changed = changes(&before, &outcome(&p));
            assert!(
                changed.is_empty(),
                "removing the pair mode at line {} changes: {changed:#?}",
                pm.line
            );
            if pm.mode != policy.mode {
                let other = match policy.mode {
                    crate::policy::Mode::Audit => crate::policy::Mode::Enforce,
                    crate::policy::Mode::Enforce => crate::policy::Mode::Audit,
                };
                let (mut q, mut q0) = (p.clone(), policy.clone());
                q.mode = other;
                q0.mode = other;
                let changed = changes(&outcome(&q0), &outcome(&q));
                assert!(
                    changed.is_empty(),
                    "removing the pair mode at line {} changes, in the other global mode: {changed:#?}",
                    pm.line
                );
            }
        }
        counts
    }

    /// Soundness, checked: removing a rule or pair mode the lint calls
    /// useless changes no flow's fate.
    #[test]
    fn what_the_lint_calls_useless_changes_nothing() {
        let text = format!(
            "{ENVS}[envs.ghost]\n[defaults]\nhost = \"deny\"\n\
             [[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\", \"8000-8100/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8080/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"dev\"\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"world\"\n\
             [[allow]]\nfrom = \"dev\"\nto = \"ghost\"\n\
             [[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"5432/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"5432/tcp\"]\n\
             [[deny]]\nfrom = \"*\"\nto = \"prod\"\nports = [\"tcp\"]\n\
             [[deny]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"dev\"\nto = \"shared\"\nmode = \"enforce\"\n\
             [[pair_mode]]\nfrom = \"shared\"\nto = \"shared\"\nmode = \"audit\"\n"
        );
        let policy = Policy::parse(Path::new("p.toml"), &text).unwrap();
        // Every kind above is found: the covered 8080, the self pair, the
        // denied 22, the world the defaults allow, the empty env, the
        // duplicate, the covered deny; the overridden, repeated and idle
        // pair modes.
        assert_eq!(
            assert_warned_are_useless(&policy),
            (7, 3),
            "{:#?}",
            lint(&policy)
        );
    }

    /// The same check over many generated policies.
    #[test]
    fn generated_policies_keep_the_lint_sound() {
        let mut seed: u64 = 0x5eed;
        let mut pick = |n: usize| {
            // xorshift64*
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        };
        let sels = ["*", "host", "world", "dev", "prod", "shared"];
        let ports = [
            None,
            Some("\"53\""),
            Some("\"53/udp\""),
            Some("\"tcp\""),
            Some("\"8000-8100/tcp\""),
            Some("\"8080/tcp\""),
            Some("\"1-65535/tcp\""),
            Some("\"icmp\""),
            Some("\"53\", \"8080/tcp\""),
            Some("\"8000-8079/tcp\", \"8080-8100/tcp\""),
        ];
        let defaults = ["allow", "deny"];
        let modes = ["audit", "enforce"];
        let (mut warned_rules, mut warned_pms) = (0, 0);
        for _ in 0..300 {
            let mut text = format!(
                "mode = \"{}\"\n[defaults]\nhost = \"{}\"\nworld = \"{}\"\n\
                 [envs.dev]\ncgroups = [\"/dev\"]\n[envs.prod]\ncidrs = [\"198.18.10.0/24\"]\n\
                 [envs.shared]\ncidrs = [\"198.18.0.0/28\"]\n",
                modes[pick(2)],
                defaults[pick(2)],
                defaults[pick(2)]
            );
            for _ in 0..pick(7) {
                let table = ["allow", "allow", "deny"][pick(3)];
                text.push_str(&format!(
                    "[[{table}]]\nfrom = \"{}\"\nto = \"{}\"\n",
                    sels[pick(sels.len())],
                    sels[pick(sels.len())]
                ));
                if let Some(p) = ports[pick(ports.len())] {
                    text.push_str(&format!("ports = [{p}]\n"));
                }
            }
            for _ in 0..pick(4) {
                text.push_str(&format!(
                    "[[pair_mode]]\nfrom = \"{}\"\nto = \"{}\"\nmode = \"{}\"\n",
                    sels[pick(sels.len())],
                    sels[pick(sels.len())],
                    modes[pick(2)]
                ));
            }
            let policy = Policy::parse(Path::new("p.toml"), &text).unwrap();
            let (r, p) = assert_warned_are_useless(&policy);
            warned_rules += r;
            warned_pms += p;
        }
        // The generator does exercise the lint.
        assert!(
            warned_rules > 50 && warned_pms > 30,
            "{warned_rules} {warned_pms}"
        );
    }

    #[test]
    fn a_realistic_policy_is_clean() {
        clean(&format!(
            "{ENVS}[defaults]\nworld = \"deny\"\n\
             [[allow]]\nfrom = \"*\"\nto = \"shared\"\nports = [\"53\", \"8000-8100/tcp\"]\n\
             [[allow]]\nfrom = \"prod\"\nto = \"world\"\nports = [\"443/tcp\"]\n\
             [[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"8443/tcp\"]\n\
             [[deny]]\nfrom = \"dev\"\nto = \"shared\"\nports = [\"8000/tcp\"]\n\
             [[deny]]\nfrom = \"prod\"\nto = \"prod\"\nports = [\"22/tcp\"]\n\
             [[pair_mode]]\nfrom = \"*\"\nto = \"prod\"\nmode = \"audit\"\n\
             [[pair_mode]]\nfrom = \"prod\"\nto = \"prod\"\nmode = \"enforce\"\n"
        ));
    }
}
