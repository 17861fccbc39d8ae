//! Answers to `status` and `explain`.
use std::collections::HashMap;

use envguard_common::{
    event::{VERDICT_ALLOWED, VERDICT_AUDITED, VERDICT_DENIED},
    policy::RULE_PREFIX_PAIR,
};

use super::Daemon;
use crate::{
    control::{ModeSource, PairDecision, PairStatus, PendingRevert, StatusReply},
    events,
    explain::{Endpoint, PortProto},
    loader,
    modes::Source,
    policy::{Mode, compile::Compiled},
};

impl Daemon {
    pub(super) fn status(&mut self) -> anyhow::Result<StatusReply> {
        let mut counts: HashMap<(u32, u32), [u64; 3]> = HashMap::new();
        for (k, v) in self.kernel.decisions()? {
            let since = v.saturating_sub(self.decisions_baseline.get(&k).copied().unwrap_or(0));
            let slot = match k.verdict {
                VERDICT_ALLOWED => 0,
                VERDICT_DENIED => 1,
                VERDICT_AUDITED => 2,
                _ => continue,
            };
            counts.entry((k.src_env, k.dst_env)).or_default()[slot] += since;
        }
        let ids: Vec<u32> = self.compiled.env_ids().collect();
        let mut pairs = Vec::new();
        for &s in &ids {
            for &d in &ids {
                let (from, to) = (
                    self.compiled.env_name(s).to_owned(),
                    self.compiled.env_name(d).to_owned(),
                );
                let (mode, source) = self.modes.of(&from, &to);
                let mode_source = match source {
                    Source::RuntimePair(_) => ModeSource::Runtime,
                    Source::PolicyPair(_) => ModeSource::Policy,
                    Source::PolicyGlobal | Source::RuntimeGlobal(_) => ModeSource::Global,
                };
                let c = counts.get(&(s, d)).copied().unwrap_or_default();
                pairs.push(PairStatus {
                    decision: pair_decision(&self.compiled, s, d, mode),
                    mode,
                    mode_source,
                    from,
                    to,
                    allowed: c[0],
                    denied: c[1],
                    audited: c[2],
                });
            }
        }
        let pending_reverts = self
            .modes
            .pending()
            .filter_map(|(scope, o)| {
                Some(PendingRevert {
                    scope: scope.to_string(),
                    mode: o.mode,
                    reverts_to: o
                        .revert_to
                        .map_or_else(|| "policy".to_owned(), |m| m.to_string()),
                    expires_at: events::rfc3339(o.expires?.wall),
                })
            })
            .collect();
        let (mode, source) = self.modes.global();
        Ok(StatusReply {
            since: events::rfc3339(self.since),
            uptime_s: self.since.elapsed().map_or(0, |d| d.as_secs()),
            pid: std::process::id(),
            policy: self.settings.policy.display().to_string(),
            revision: self.policy.revision.clone(),
            mode,
            mode_source: if source.is_runtime() {
                ModeSource::Runtime
            } else {
                ModeSource::Policy
            },
            cgroup_root: self.root_rel.clone(),
            hooks: loader::PROGRAMS.iter().map(|&h| h.to_owned()).collect(),
            pin_root: self.kernel.pin_root().display().to_string(),
            adopted: self.kernel.adopted(),
            envs: ids
                .iter()
                .map(|&i| self.compiled.env_name(i).to_owned())
                .collect(),
            pending_reverts,
            pairs,
            control: self.gate.status(),
            containers: self.containers.iter().cloned().collect(),
            endpoints: self.endpoint_status(),
            interfaces: self
                .tc_interfaces
                .iter()
                .map(|i| crate::control::InterfaceStatus {
                    name: i.name.clone(),
                    ifindex: i.ifindex,
                    env: self.compiled.env_name(i.env).to_owned(),
                    attach: match i.mode {
                        loader::TcMode::Tcx => "tcx",
                        loader::TcMode::Clsact => "clsact",
                    }
                    .to_owned(),
                })
                .collect(),
        })
    }

    /// What-if against the live policy and modes, runtime switches included.
    pub(super) fn explain(
        &self,
        from: &str,
        to: &str,
        port: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let from: Endpoint = from.parse().map_err(anyhow::Error::msg)?;
        let to: Endpoint = to.parse().map_err(anyhow::Error::msg)?;
        let port: PortProto = port.parse().map_err(anyhow::Error::msg)?;
        let owners = self
            .endpoints
            .known()
            .iter()
            .map(|(a, k)| (*a, k.owner))
            .collect();
        let e = crate::explain::explain(
            &self.policy,
            &self.compiled,
            &from,
            &to,
            port.proto,
            port.port,
            &crate::explain::State {
                modes: &self.modes,
                endpoints: Some(&owners),
            },
        )?;
        Ok(serde_json::to_value(e)?)
    }
}

/// The policy's decision for a pair in general: `allow` (every flow), `ports`
/// (some ports or protocols allowed, or some denied), `deny`, or `audit` (a
/// violation, let through in audit mode).
fn pair_decision(c: &Compiled, s: u32, d: u32, mode: Mode) -> PairDecision {
    let pair = |k: &envguard_common::policy::RuleKey| {
        k.src_env == s.to_be_bytes() && k.dst_env == d.to_be_bytes()
    };
    let deny_all = c
        .deny_rules
        .iter()
        .any(|(p, k, _)| *p == RULE_PREFIX_PAIR && pair(k));
    let deny_some = c.deny_rules.iter().any(|(_, k, _)| pair(k));
    let allow_all = s == d
        || c.rules
            .iter()
            .any(|(p, k, _)| *p == RULE_PREFIX_PAIR && pair(k));
    let allow_some = c.rules.iter().any(|(_, k, _)| pair(k));
    let violation = if mode == Mode::Enforce {
        PairDecision::Deny
    } else {
        PairDecision::Audit
    };
    if deny_all {
        violation
    } else if allow_all && !deny_some {
        PairDecision::Allow
    } else if allow_all || allow_some {
        PairDecision::Ports
    } else {
        violation
    }
}
