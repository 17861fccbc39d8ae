//! Runtime modes on the daemon's side: `mode` requests and break-glass
//! expiry carried into the kernel and reported. What mode a pair is in, and
//! why, is [`crate::modes::Modes`]'s answer, the same one `status` and
//! `explain` give.
use envguard_common::policy::PairKey;
use serde::Serialize;

use super::Daemon;
use crate::{
    control::{Actor, ModeReply, ModeRequest, Scope},
    events,
    modes::Expiry,
    policy::Mode,
};

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
        if let Scope::Pair { from, to } = &scope {
            for n in [from, to] {
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
        }
        let expires = for_secs.map(Expiry::after);
        // The kernel first: a switch it refused is not recorded.
        self.write_mode(&scope, Some(mode))?;
        let name = scope.to_string();
        let previous = self.modes.set(scope, mode, expires);
        let expires_at = expires.map(|e| events::rfc3339(e.wall));
        self.stream.emit(
            "mode_change",
            None,
            &ModeChange {
                actor,
                scope: name.clone(),
                from: previous.to_string(),
                to: mode.to_string(),
                expires_at: expires_at.clone(),
                reason: "request",
            },
        )?;
        Ok(ModeReply {
            scope: name,
            from: previous,
            to: mode,
            expires_at,
        })
    }

    /// Writes a scope's mode into the kernel: `mode`, or for `None` what the
    /// modes in force give it now (for a pair: no entry when the global mode
    /// applies).
    fn write_mode(&mut self, scope: &Scope, mode: Option<Mode>) -> anyhow::Result<()> {
        match scope {
            Scope::Global => {
                let mode = mode.unwrap_or_else(|| self.modes.global().0);
                self.kernel.set_mode(mode.kernel())?;
            }
            Scope::Pair { from, to } => {
                let (Some(s), Some(d)) = (self.compiled.env_id(from), self.compiled.env_id(to))
                else {
                    anyhow::bail!("unknown env in {from}->{to}");
                };
                let value = match mode {
                    Some(m) => Some(m.kernel()),
                    None => self.modes.kernel_pair(&self.compiled, s, d),
                };
                self.kernel.set_pair_mode(PairKey::new(s, d), value)?;
            }
        }
        Ok(())
    }

    /// Reverts every break-glass switch whose time is up.
    pub(super) fn expire(&mut self) -> anyhow::Result<()> {
        for expired in self.modes.expire(std::time::Instant::now()) {
            self.write_mode(&expired.scope, None)?;
            self.stream.emit(
                "mode_change",
                None,
                &ModeChange {
                    actor: Actor::agent("envguard (break-glass expiry)"),
                    scope: expired.scope.to_string(),
                    from: expired.from.to_string(),
                    to: expired.to.to_string(),
                    expires_at: None,
                    reason: "expired",
                },
            )?;
        }
        Ok(())
    }
}
