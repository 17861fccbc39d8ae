//! Runtime modes: operator overrides, break-glass expiry, the mode of a pair.
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use envguard_common::policy::PairKey;
use serde::Serialize;
use tokio::time::Instant;

use super::Daemon;
use crate::{
    control::{Actor, ModeReply, ModeRequest, Scope},
    events,
    policy::{
        Mode, Policy,
        compile::{Compiled, mode_value},
    },
};

/// An operator's runtime mode for a scope (the whole host, or one env pair).
#[derive(Debug, Clone)]
pub(super) struct Override {
    pub(super) mode: Mode,
    /// Break-glass: when it reverts.
    pub(super) expires: Option<(Instant, SystemTime)>,
    /// The untimed override it replaced, restored on expiry; `None`: back to the policy file.
    pub(super) revert_to: Option<Mode>,
}

#[derive(Serialize)]
struct ModeChange {
    actor: Actor,
    scope: String,
    from: String,
    to: String,
    expires_at: Option<String>,
    reason: &'static str,
}

impl Daemon {
    pub(super) fn global_mode(&self, policy: &Policy) -> Mode {
        self.global.as_ref().map_or(policy.mode, |o| o.mode)
    }

    /// The pairs' modes for the kernel: the policy's, with runtime overrides on top.
    pub(super) fn pair_modes(&self, compiled: &Compiled) -> Vec<(PairKey, u32)> {
        let mut modes: BTreeMap<(u32, u32), u32> = compiled
            .pair_modes
            .iter()
            .map(|(k, m)| ((k.src_env, k.dst_env), *m))
            .collect();
        for ((from, to), o) in &self.pairs {
            if let (Some(s), Some(d)) = (compiled.env_id(from), compiled.env_id(to)) {
                modes.insert((s, d), mode_value(o.mode));
            }
        }
        modes
            .into_iter()
            .map(|((s, d), m)| (PairKey::new(s, d), m))
            .collect()
    }

    /// The mode a pair is handled in now, and where that comes from.
    pub(super) fn pair_mode(&self, from: &str, to: &str) -> (Mode, &'static str) {
        if let Some(o) = self.pairs.get(&(from.to_owned(), to.to_owned())) {
            return (o.mode, "runtime");
        }
        let ids = (self.compiled.env_id(from), self.compiled.env_id(to));
        if let (Some(s), Some(d)) = ids
            && let Some((_, m)) = self
                .compiled
                .pair_modes
                .iter()
                .find(|(k, _)| k.src_env == s && k.dst_env == d)
        {
            let mode = if *m == mode_value(Mode::Enforce) {
                Mode::Enforce
            } else {
                Mode::Audit
            };
            return (mode, "policy");
        }
        (self.global_mode(&self.policy), "global")
    }

    pub(super) fn set_mode(
        &mut self,
        request: ModeRequest,
        actor: Actor,
    ) -> anyhow::Result<ModeReply> {
        let ModeRequest {
            mode,
            scope,
            for_secs,
        } = request;
        if for_secs == Some(0) {
            anyhow::bail!("a break-glass duration must be at least 1 s");
        }
        let expires = for_secs.map(|s| {
            let d = Duration::from_secs(s);
            (Instant::now() + d, SystemTime::now() + d)
        });
        let pair = match scope {
            Scope::Global => None,
            Scope::Pair { from: f, to: t } => {
                for n in [&f, &t] {
                    if self.compiled.env_id(n).is_none() {
                        anyhow::bail!(
                            "unknown env {n:?}; known: {}",
                            self.compiled
                                .env_ids()
                                .map(|i| self.compiled.env_name(i))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
                Some((f, t))
            }
        };
        let (scope, previous) = match &pair {
            None => ("global".to_owned(), self.global_mode(&self.policy)),
            Some((f, t)) => (format!("{f}->{t}"), self.pair_mode(f, t).0),
        };
        let existing = match &pair {
            None => self.global.as_ref(),
            Some(k) => self.pairs.get(k),
        };
        // A timed override reverts to what stood before it, not to another timed one.
        let revert_to = existing.and_then(|o| {
            if o.expires.is_none() {
                Some(o.mode)
            } else {
                o.revert_to
            }
        });
        let new = Override {
            mode,
            expires,
            revert_to,
        };
        match &pair {
            None => {
                self.kernel.set_mode(mode_value(mode))?;
                self.global = Some(new);
            }
            Some((f, t)) => {
                let key = self.pair_key(f, t)?;
                self.kernel.set_pair_mode(key, Some(mode_value(mode)))?;
                self.pairs.insert((f.clone(), t.clone()), new);
            }
        }
        let expires_at = expires.map(|(_, at)| events::rfc3339(at));
        self.stream.emit(
            "mode_change",
            None,
            &ModeChange {
                actor,
                scope: scope.clone(),
                from: previous.to_string(),
                to: mode.to_string(),
                expires_at: expires_at.clone(),
                reason: "request",
            },
        )?;
        Ok(ModeReply {
            scope,
            from: previous,
            to: mode,
            expires_at,
        })
    }

    pub(super) fn pair_key(&self, from: &str, to: &str) -> anyhow::Result<PairKey> {
        match (self.compiled.env_id(from), self.compiled.env_id(to)) {
            (Some(s), Some(d)) => Ok(PairKey::new(s, d)),
            _ => anyhow::bail!("unknown env in {from}->{to}"),
        }
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.global
            .iter()
            .chain(self.pairs.values())
            .filter_map(|o| o.expires.map(|(at, _)| at))
            .min()
    }

    /// Reverts every break-glass override whose time is up.
    pub(super) fn expire(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let due = |o: &Override| o.expires.is_some_and(|(at, _)| at <= now);
        if self.global.as_ref().is_some_and(due) {
            let old = self.global.take().expect("checked");
            self.global = old.revert_to.map(|mode| Override {
                mode,
                expires: None,
                revert_to: None,
            });
            let to = self.global_mode(&self.policy);
            self.kernel.set_mode(mode_value(to))?;
            self.emit_expiry("global".to_owned(), old.mode, to)?;
        }
        let due_pairs: Vec<(String, String)> = self
            .pairs
            .iter()
            .filter(|(_, o)| due(o))
            .map(|(k, _)| k.clone())
            .collect();
        for (f, t) in due_pairs {
            let old = self.pairs.remove(&(f.clone(), t.clone())).expect("listed");
            if let Some(mode) = old.revert_to {
                self.pairs.insert(
                    (f.clone(), t.clone()),
                    Override {
                        mode,
                        expires: None,
                        revert_to: None,
                    },
                );
            }
            let (to, source) = self.pair_mode(&f, &t);
            let key = self.pair_key(&f, &t)?;
            // Back to the global mode: no entry; else the pair's own.
            let value = (source != "global").then_some(mode_value(to));
            self.kernel.set_pair_mode(key, value)?;
            self.emit_expiry(format!("{f}->{t}"), old.mode, to)?;
        }
        Ok(())
    }

    pub(super) fn emit_expiry(
        &mut self,
        scope: String,
        from: Mode,
        to: Mode,
    ) -> anyhow::Result<()> {
        self.stream.emit(
            "mode_change",
            None,
            &ModeChange {
                actor: Actor::agent("envguard (break-glass expiry)"),
                scope,
                from: from.to_string(),
                to: to.to_string(),
                expires_at: None,
                reason: "expired",
            },
        )?;
        Ok(())
    }
}
