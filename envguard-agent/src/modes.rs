//! The modes in force, in one model: the policy file's global `mode` and its
//! `[[pair_mode]]` entries, with the operator's runtime switches on top
//! (`envguard mode`, for the host or one env pair, lasting or break-glass).
//!
//! It answers "in which mode is a violation from env `a` to env `b` handled
//! now, and where does that come from" ([`Modes::of`]) for everyone who asks:
//! the daemon (the kernel's mode entries, `status`, break-glass expiry) and
//! `explain` (offline with the policy's modes alone, on the agent with the
//! live ones). The order, first match wins:
//!
//! 1. a runtime switch of the pair (`envguard mode --from a --to b`);
//! 2. the policy's `[[pair_mode]]` entries, a later one beating an earlier;
//! 3. the global mode: the runtime one if switched, else the policy's.
//!
//! Runtime switches outlive reloads (operator intent); a timed one reverts on
//! time to the lasting switch it replaced, or to the policy.
use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use envguard_common::policy::PairKey;

use crate::{
    control::Scope,
    events,
    policy::{Mode, PairMode, Policy, Selector, compile::Compiled},
};

/// The policy's modes and the runtime switches over them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Modes {
    /// The policy file's `mode`.
    policy: Mode,
    /// The policy file's `[[pair_mode]]` entries, in file order.
    policy_pairs: Vec<PairMode>,
    global: Option<Override>,
    pairs: BTreeMap<(String, String), Override>,
}

/// An operator's runtime mode for a scope (the whole host, or one env pair).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub mode: Mode,
    /// Break-glass: when it reverts.
    pub expires: Option<Expiry>,
    /// The lasting switch it replaced, restored on expiry; `None`: back to
    /// the policy.
    pub revert_to: Option<Mode>,
}

/// When a break-glass switch reverts: on the monotonic clock (the timer), and
/// as a wall-clock time for people and records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Expiry {
    /// `secs` from now.
    pub fn after(secs: u64) -> Expiry {
        let d = std::time::Duration::from_secs(secs);
        Expiry {
            at: Instant::now() + d,
            wall: SystemTime::now() + d,
        }
    }
}

/// Where a mode comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source<'a> {
    /// The policy file's global `mode`.
    PolicyGlobal,
    /// `envguard mode` for the whole host.
    RuntimeGlobal(&'a Override),
    /// A `[[pair_mode]]` entry of the policy file.
    PolicyPair(&'a PairMode),
    /// `envguard mode --from --to`.
    RuntimePair(&'a Override),
}

impl Source<'_> {
    /// Whether the pair has a mode of its own (else the global one applies).
    pub fn is_pair(&self) -> bool {
        matches!(self, Source::PolicyPair(_) | Source::RuntimePair(_))
    }

    /// Whether an operator set it at runtime.
    pub fn is_runtime(&self) -> bool {
        matches!(self, Source::RuntimeGlobal(_) | Source::RuntimePair(_))
    }

    /// For people, where a pair's own mode comes from: `[[pair_mode]] * ->
    /// prod, line 40`, `envguard mode, until 2026-11-23T11:00:00Z`; `None`
    /// for the global mode.
    pub fn pair_origin(&self) -> Option<String> {
        match self {
            Source::PolicyPair(pm) => Some(format!(
                "[[pair_mode]] {} -> {}, line {}",
                pm.from, pm.to, pm.line
            )),
            Source::RuntimePair(o) => Some(match o.expires {
                Some(e) => format!("envguard mode, until {}", events::rfc3339(e.wall)),
                None => "envguard mode".to_owned(),
            }),
            Source::PolicyGlobal | Source::RuntimeGlobal(_) => None,
        }
    }
}

/// A break-glass switch whose time ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub scope: Scope,
    /// The mode it had set.
    pub from: Mode,
    /// The mode in force now.
    pub to: Mode,
}

impl Modes {
    /// The modes a policy file sets; no runtime switch.
    pub fn from_policy(policy: &Policy) -> Modes {
        Modes {
            policy: policy.mode,
            policy_pairs: policy.pair_modes.clone(),
            global: None,
            pairs: BTreeMap::new(),
        }
    }

    /// The same runtime switches over another policy's modes (a reload).
    /// Switches of pairs with an env `known` refuses have nothing left to act
    /// on and are dropped.
    pub fn reloaded(&self, policy: &Policy, known: impl Fn(&str) -> bool) -> Modes {
        let mut pairs = self.pairs.clone();
        pairs.retain(|(f, t), _| known(f) && known(t));
        Modes {
            pairs,
            global: self.global.clone(),
            ..Modes::from_policy(policy)
        }
    }

    /// The global mode, and where it comes from.
    pub fn global(&self) -> (Mode, Source<'_>) {
        match &self.global {
            Some(o) => (o.mode, Source::RuntimeGlobal(o)),
            None => (self.policy, Source::PolicyGlobal),
        }
    }

    /// The mode a violation from env `from` to env `to` is handled in, and
    /// where it comes from.
    pub fn of(&self, from: &str, to: &str) -> (Mode, Source<'_>) {
        if let Some(o) = self.pairs.get(&(from.to_owned(), to.to_owned())) {
            return (o.mode, Source::RuntimePair(o));
        }
        let matches = |s: &Selector, env: &str| match s {
            Selector::Any => true,
            Selector::Env(n) => n == env,
        };
        match self
            .policy_pairs
            .iter()
            .rev()
            .find(|p| matches(&p.from, from) && matches(&p.to, to))
        {
            Some(p) => (p.mode, Source::PolicyPair(p)),
            None => self.global(),
        }
    }

    /// The mode of a scope now.
    pub fn of_scope(&self, scope: &Scope) -> Mode {
        match scope {
            Scope::Global => self.global().0,
            Scope::Pair { from, to } => self.of(from, to).0,
        }
    }

    /// The kernel's entry for the pair of env ids: the pair's own mode, or
    /// `None` when the global mode applies.
    pub fn kernel_pair(&self, compiled: &Compiled, src: u32, dst: u32) -> Option<u32> {
        let (mode, source) = self.of(compiled.env_name(src), compiled.env_name(dst));
        source.is_pair().then(|| mode.kernel())
    }

    /// Every pair with a mode of its own, as the kernel's map has them.
    pub fn kernel_pairs(&self, compiled: &Compiled) -> Vec<(PairKey, u32)> {
        let ids: Vec<u32> = compiled.env_ids().collect();
        ids.iter()
            .flat_map(|&s| ids.iter().map(move |&d| (s, d)))
            .filter_map(|(s, d)| Some((PairKey::new(s, d), self.kernel_pair(compiled, s, d)?)))
            .collect()
    }

    /// Switches `scope` to `mode`, until `expires` if given (break-glass);
    /// returns the mode before. A timed switch reverts to what stood before
    /// it, never to another timed one.
    pub fn set(&mut self, scope: Scope, mode: Mode, expires: Option<Expiry>) -> Mode {
        let previous = self.of_scope(&scope);
        let switch = |existing: Option<&Override>| Override {
            mode,
            expires,
            revert_to: existing.and_then(|o| match o.expires {
                None => Some(o.mode),
                Some(_) => o.revert_to,
            }),
        };
        match scope {
            Scope::Global => self.global = Some(switch(self.global.as_ref())),
            Scope::Pair { from, to } => {
                let key = (from, to);
                let new = switch(self.pairs.get(&key));
                self.pairs.insert(key, new);
            }
        }
        previous
    }

    /// When the next break-glass switch reverts.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.global
            .iter()
            .chain(self.pairs.values())
            .filter_map(|o| o.expires.map(|e| e.at))
            .min()
    }

    /// Reverts every break-glass switch whose time is up at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let due = |o: &Override| o.expires.is_some_and(|e| e.at <= now);
        let lasting = |mode| Override {
            mode,
            expires: None,
            revert_to: None,
        };
        let mut expired = Vec::new();
        if self.global.as_ref().is_some_and(due) {
            let old = self.global.take().expect("checked");
            self.global = old.revert_to.map(lasting);
            expired.push(Expired {
                scope: Scope::Global,
                from: old.mode,
                to: self.global().0,
            });
        }
        let due_pairs: Vec<(String, String)> = self
            .pairs
            .iter()
            .filter(|(_, o)| due(o))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due_pairs {
            let old = self.pairs.remove(&key).expect("listed");
            if let Some(mode) = old.revert_to {
                self.pairs.insert(key.clone(), lasting(mode));
            }
            let (from, to) = key;
            expired.push(Expired {
                to: self.of(&from, &to).0,
                scope: Scope::Pair { from, to },
                from: old.mode,
            });
        }
        expired
    }

    /// The break-glass switches waiting to revert: the global one first,
    /// then the pairs' in order.
    pub fn pending(&self) -> impl Iterator<Item = (Scope, &Override)> {
        self.global
            .iter()
            .map(|o| (Scope::Global, o))
            .chain(self.pairs.iter().map(|((from, to), o)| {
                (
                    Scope::Pair {
                        from: from.clone(),
                        to: to.clone(),
                    },
                    o,
                )
            }))
            .filter(|(_, o)| o.expires.is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::*;
    use crate::policy::compile::compile;

    const POLICY: &str = r#"mode = "enforce"

[envs.prod]
cidrs = ["198.18.10.0/24"]

[envs.dev]
cidrs = ["198.18.20.0/24"]

[envs.staging]
cidrs = ["198.18.30.0/24"]

[[pair_mode]]
from = "*"
to = "staging"
mode = "audit"

[[pair_mode]]
from = "prod"
to = "staging"
mode = "enforce"
"#;

    fn policy() -> Policy {
        Policy::parse(Path::new("p.toml"), POLICY).expect("valid")
    }

    fn pair(from: &str, to: &str) -> Scope {
        Scope::Pair {
            from: from.to_owned(),
            to: to.to_owned(),
        }
    }

    #[test]
    fn runtime_pair_beats_policy_pair_beats_global() {
        let mut m = Modes::from_policy(&policy());
        assert_eq!(m.of("dev", "prod"), (Mode::Enforce, Source::PolicyGlobal));
        // A later [[pair_mode]] beats an earlier one.
        let (mode, source) = m.of("prod", "staging");
        assert_eq!(mode, Mode::Enforce);
        assert_eq!(
            source.pair_origin().as_deref(),
            Some("[[pair_mode]] prod -> staging, line 17")
        );
        assert_eq!(m.of("dev", "staging").0, Mode::Audit);

        assert_eq!(m.set(Scope::Global, Mode::Audit, None), Mode::Enforce);
        assert_eq!(m.of("dev", "prod").0, Mode::Audit);
        assert!(m.of("dev", "prod").1.is_runtime());
        assert!(!m.of("dev", "prod").1.is_pair());
        // The policy's pair modes stand over the runtime global.
        assert_eq!(m.of("prod", "staging").0, Mode::Enforce);

        assert_eq!(
            m.set(pair("dev", "staging"), Mode::Enforce, None),
            Mode::Audit
        );
        let (mode, source) = m.of("dev", "staging");
        assert_eq!(mode, Mode::Enforce);
        assert!(source.is_pair() && source.is_runtime());
        assert_eq!(source.pair_origin().as_deref(), Some("envguard mode"));
    }

    #[test]
    fn the_kernel_gets_every_pair_with_a_mode_of_its_own() {
        let p = policy();
        let c = compile(&p).unwrap();
        let mut m = Modes::from_policy(&p);
        // Before any switch: what the policy compiles to.
        let mut want = c.pair_modes.clone();
        want.sort_by_key(|(k, _)| (k.src_env, k.dst_env));
        let mut got = m.kernel_pairs(&c);
        got.sort_by_key(|(k, _)| (k.src_env, k.dst_env));
        assert_eq!(got, want);
        m.set(pair("dev", "prod"), Mode::Audit, None);
        let key = PairKey::new(c.env_id("dev").unwrap(), c.env_id("prod").unwrap());
        assert!(m.kernel_pairs(&c).contains(&(key, Mode::Audit.kernel())));
        assert_eq!(m.kernel_pairs(&c).len(), want.len() + 1);
        assert_eq!(
            m.kernel_pair(&c, c.env_id("prod").unwrap(), c.env_id("dev").unwrap()),
            None
        );
    }

    #[test]
    fn break_glass_reverts_to_the_lasting_switch_or_the_policy() {
        let mut m = Modes::from_policy(&policy());
        let now = Instant::now();
        let soon = |s| Expiry {
            at: now + Duration::from_secs(s),
            wall: SystemTime::now(),
        };
        m.set(pair("dev", "prod"), Mode::Audit, None);
        m.set(pair("dev", "prod"), Mode::Enforce, Some(soon(2)));
        // A second timed switch still reverts to the lasting one.
        m.set(pair("dev", "prod"), Mode::Enforce, Some(soon(1)));
        m.set(Scope::Global, Mode::Audit, Some(soon(3)));
        assert_eq!(m.pending().count(), 2);
        assert_eq!(m.next_expiry(), Some(now + Duration::from_secs(1)));
        assert!(m.expire(now).is_empty());
        assert_eq!(
            m.expire(now + Duration::from_secs(1)),
            vec![Expired {
                scope: pair("dev", "prod"),
                from: Mode::Enforce,
                to: Mode::Audit
            }]
        );
        assert!(m.of("dev", "prod").1.is_runtime());
        assert_eq!(
            m.expire(now + Duration::from_secs(5)),
            vec![Expired {
                scope: Scope::Global,
                from: Mode::Audit,
                to: Mode::Enforce
            }]
        );
        assert_eq!(m.global(), (Mode::Enforce, Source::PolicyGlobal));
        assert_eq!(m.next_expiry(), None);
    }

    #[test]
    fn switches_outlive_reloads_unless_their_envs_are_gone() {
        let mut m = Modes::from_policy(&policy());
        m.set(Scope::Global, Mode::Audit, None);
        m.set(pair("dev", "prod"), Mode::Audit, None);
        m.set(pair("staging", "prod"), Mode::Audit, None);
        let next = policy();
        let r = m.reloaded(&next, |e| e != "staging");
        assert_eq!(r.global().0, Mode::Audit);
        assert!(r.of("dev", "prod").1.is_runtime());
        assert!(!r.of("staging", "prod").1.is_pair());
    }
}
