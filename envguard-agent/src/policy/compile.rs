//! Policy → map entries. Pure: the loader writes these into the kernel.
use std::net::IpAddr;

use envguard_common::{
    config::{EnvLoss, ON_LOSS_CLOSED, ON_LOSS_FOLLOW, ON_LOSS_KEEP, ON_LOSS_OPEN},
    maps::{MAX_CGROUPS, MAX_CIDRS, MAX_PAIR_MODES, MAX_RULE_ENTRIES},
    policy::{
        ENV_CONFLICT, ENV_CONFLICT_NAME, ENV_HOST, ENV_WORLD, FIRST_DECLARED_ENV, PairKey,
        RULE_PREFIX_PAIR, RULE_PREFIX_PORT, RULE_PREFIX_PROTO, RuleKey,
    },
};

use super::{Action, Default, HOST, Mode, OnLoss, Policy, Rule, Selector, WORLD, cgroup_level};
use crate::error::PolicyError;

/// Rule ids of the entries that the `[defaults]` section produces; ids below
/// are indexes into `Policy::rules`.
pub const RULE_DEFAULT_HOST: u32 = u32::MAX - 1;
pub const RULE_DEFAULT_WORLD: u32 = u32::MAX - 2;

/// Everything the kernel maps hold for one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Env names by id: `host`, `world`, then the declared envs; an empty
    /// name is an id not in use.
    pub env_names: Vec<String>,
    pub mode: u32,
    /// (cgroup path relative to the mount, env id).
    pub cgroups: Vec<(String, u32)>,
    pub min_level: u32,
    pub max_level: u32,
    /// (prefix length, address, env id).
    pub cidrs_v4: Vec<(u32, [u8; 4], u32)>,
    pub cidrs_v6: Vec<(u32, [u8; 16], u32)>,
    /// Allow entries: (prefix length, key, rule id).
    pub rules: Vec<(u32, RuleKey, u32)>,
    /// Deny entries, same shape; deny beats allow.
    pub deny_rules: Vec<(u32, RuleKey, u32)>,
    /// Pairs with their own mode.
    pub pair_modes: Vec<(PairKey, u32)>,
    /// Fail mode per env id (`host` and `world`: follow if their default
    /// allows, else keep).
    pub env_loss: Vec<EnvLoss>,
    /// (interface name or prefix, env id), for the tc hooks.
    pub interfaces: Vec<(super::interfaces::IfacePattern, u32)>,
}

impl Compiled {
    pub fn env_name(&self, id: u32) -> &str {
        match self.env_names.get(id as usize) {
            Some(n) if !n.is_empty() => n,
            _ if id == ENV_CONFLICT => ENV_CONFLICT_NAME,
            _ => "unknown",
        }
    }

    pub fn env_id(&self, name: &str) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        self.env_names
            .iter()
            .position(|n| n == name)
            .map(|i| i as u32)
    }

    /// The ids in use, `host` and `world` included.
    pub fn env_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.env_names
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
            .map(|(i, _)| i as u32)
    }
}

/// Env ids for a policy: an env keeps the id it had in `previous` (the names
/// by id of the policy in force), so counters and the kernel's table of bound
/// sockets stay right across reloads; a new env takes an id never used yet, or
/// a freed one once there are none left.
pub fn assign_ids(policy: &Policy, previous: &[String]) -> Vec<String> {
    let mut names: Vec<String> = previous.to_vec();
    if names.len() < FIRST_DECLARED_ENV as usize {
        names = vec![HOST.to_owned(), WORLD.to_owned()];
    }
    let declared: std::collections::HashSet<&str> =
        policy.envs.iter().map(|e| e.name.as_str()).collect();
    for n in names.iter_mut().skip(FIRST_DECLARED_ENV as usize) {
        if !declared.contains(n.as_str()) {
            n.clear();
        }
    }
    for env in &policy.envs {
        if names.contains(&env.name) {
            continue;
        }
        // The last id is `endpoint-conflict`'s, never a declared env's.
        if names.len() < ENV_CONFLICT as usize {
            names.push(env.name.clone());
        } else if let Some(free) = names
            .iter_mut()
            .skip(FIRST_DECLARED_ENV as usize)
            .find(|n| n.is_empty())
        {
            *free = env.name.clone();
        } else {
            // compile() reports the overflow.
            names.push(env.name.clone());
        }
    }
    names
}

pub fn compile(policy: &Policy) -> Result<Compiled, PolicyError> {
    compile_with_ids(policy, &[])
}

pub fn compile_with_ids(policy: &Policy, previous: &[String]) -> Result<Compiled, PolicyError> {
    let env_names = assign_ids(policy, previous);
    let id_of = |name: &str| -> u32 {
        env_names
            .iter()
            .position(|n| n == name)
            .expect("validated env name") as u32
    };
    let all_ids: Vec<u32> = env_names
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .map(|(i, _)| i as u32)
        .collect();

    let mut cgroups = Vec::new();
    let mut interfaces = Vec::new();
    let mut cidrs_v4 = Vec::new();
    let mut cidrs_v6 = Vec::new();
    for env in &policy.envs {
        let id = id_of(&env.name);
        cgroups.extend(env.cgroups.iter().map(|c| (c.clone(), id)));
        interfaces.extend(env.interfaces.iter().map(|i| (i.clone(), id)));
        for net in &env.cidrs {
            match net.network() {
                IpAddr::V4(a) => cidrs_v4.push((u32::from(net.prefix()), a.octets(), id)),
                IpAddr::V6(a) => cidrs_v6.push((u32::from(net.prefix()), a.octets(), id)),
            }
        }
    }
    let levels = cgroups.iter().map(|(p, _)| cgroup_level(p));
    // With no cgroup listed the walk is empty: min above max.
    let min_level = levels.clone().min().unwrap_or(1);
    let max_level = levels.max().unwrap_or(0);

    let mut rules = Vec::new();
    let mut deny_rules = Vec::new();
    for (index, rule) in policy.rules.iter().enumerate() {
        let out = match rule.action {
            Action::Allow => &mut rules,
            Action::Deny => &mut deny_rules,
        };
        for src in expand(&rule.from, &all_ids, &id_of) {
            for dst in expand(&rule.to, &all_ids, &id_of) {
                rule_entries(rule, src, dst, index as u32, out);
            }
        }
    }
    let mut pair_modes = Vec::new();
    for pm in &policy.pair_modes {
        for src in expand(&pm.from, &all_ids, &id_of) {
            for dst in expand(&pm.to, &all_ids, &id_of) {
                pair_modes.push((PairKey::new(src, dst), mode_value(pm.mode)));
            }
        }
    }
    // A later [[pair_mode]] for the same pair wins, as in the file's reading order.
    let mut seen_pairs = std::collections::HashSet::new();
    pair_modes.reverse();
    pair_modes.retain(|(k, _)| seen_pairs.insert(*k));
    pair_modes.reverse();
    // Defaults: pair-wide entries, so a more specific rule still names itself.
    for (env, default, rule_id) in [
        (ENV_HOST, policy.default_host, RULE_DEFAULT_HOST),
        (ENV_WORLD, policy.default_world, RULE_DEFAULT_WORLD),
    ] {
        if default == Default::Deny {
            continue;
        }
        for &other in &all_ids {
            if other == env {
                continue;
            }
            // host <-> world is allowed only if neither side's default denies it.
            let other_default = match other {
                ENV_HOST => policy.default_host,
                ENV_WORLD => policy.default_world,
                _ => Default::Allow,
            };
            if other_default == Default::Deny {
                continue;
            }
            for (s, d) in [(env, other), (other, env)] {
                rules.push((RULE_PREFIX_PAIR, RuleKey::new(s, d, 0, 0), rule_id));
            }
        }
    }
    // Keep the first entry for a key: explicit rules come before defaults, and
    // earlier rules before later ones, which is the attribution operators expect.
    for list in [&mut rules, &mut deny_rules] {
        let mut seen = std::collections::HashSet::new();
        list.retain(|(prefix, key, _)| seen.insert((*prefix, *key)));
    }

    let mut env_loss = vec![EnvLoss::new(ON_LOSS_KEEP, 0); env_names.len()];
    // `host` and `world` have no fail mode of their own; one whose default
    // allows flows lets a peer env that failed open open the pair too.
    for (env, default) in [
        (ENV_HOST, policy.default_host),
        (ENV_WORLD, policy.default_world),
    ] {
        if default == Default::Allow {
            env_loss[env as usize] = EnvLoss::new(ON_LOSS_FOLLOW, 0);
        }
    }
    for e in &policy.envs {
        let mode = match e.on_agent_loss {
            OnLoss::Keep => ON_LOSS_KEEP,
            OnLoss::Open => ON_LOSS_OPEN,
            OnLoss::Closed => ON_LOSS_CLOSED,
        };
        env_loss[id_of(&e.name) as usize] =
            EnvLoss::new(mode, e.agent_loss_timeout.as_nanos() as u64);
    }

    check_size("env", env_names.len(), ENV_CONFLICT)?;
    check_size("cgroup", cgroups.len(), MAX_CGROUPS)?;
    check_size("IPv4 CIDR", cidrs_v4.len(), MAX_CIDRS)?;
    check_size("IPv6 CIDR", cidrs_v6.len(), MAX_CIDRS)?;
    check_size("allow rule", rules.len(), MAX_RULE_ENTRIES)?;
    check_size("deny rule", deny_rules.len(), MAX_RULE_ENTRIES)?;
    check_size("pair mode", pair_modes.len(), MAX_PAIR_MODES)?;

    Ok(Compiled {
        env_names,
        mode: mode_value(policy.mode),
        cgroups,
        min_level,
        max_level,
        cidrs_v4,
        cidrs_v6,
        rules,
        deny_rules,
        pair_modes,
        env_loss,
        interfaces,
    })
}

pub fn mode_value(mode: Mode) -> u32 {
    mode.kernel()
}

fn check_size(what: &'static str, needed: usize, max: u32) -> Result<(), PolicyError> {
    if needed > max as usize {
        return Err(PolicyError::TooLarge { what, needed, max });
    }
    Ok(())
}

fn expand(sel: &Selector, all: &[u32], id_of: &impl Fn(&str) -> u32) -> Vec<u32> {
    match sel {
        Selector::Any => all.to_vec(),
        Selector::Env(name) => vec![id_of(name)],
    }
}

fn rule_entries(rule: &Rule, src: u32, dst: u32, id: u32, out: &mut Vec<(u32, RuleKey, u32)>) {
    // Same-env flows are allowed in the kernel without a lookup; a deny rule
    // can still refuse them.
    if src == dst && rule.action == Action::Allow {
        return;
    }
    let Some(ports) = &rule.ports else {
        out.push((RULE_PREFIX_PAIR, RuleKey::new(src, dst, 0, 0), id));
        return;
    };
    for spec in ports {
        match spec.ports {
            None => out.push((RULE_PREFIX_PROTO, RuleKey::new(src, dst, spec.proto, 0), id)),
            Some((lo, hi)) => {
                for (port, bits) in port_prefixes(lo, hi) {
                    out.push((
                        RULE_PREFIX_PORT - 16 + bits,
                        RuleKey::new(src, dst, spec.proto, port),
                        id,
                    ));
                }
            }
        }
    }
}

/// Splits an inclusive port range into aligned blocks: (first port, prefix bits
/// of the 16-bit port). At most 30 blocks for any range.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest aligned block starting at `lo` that stays inside the range.
        let mut size_log = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << size_log) - 1 > hi {
            size_log -= 1;
        }
        out.push((lo as u16, 16 - size_log));
        lo += 1 << size_log;
    }
    out
}
