//! Reload: the policy file swapped in atomically, or refused whole.
use anyhow::Context as _;
use serde::Serialize;

use super::{Daemon, warn_about};
use crate::{
    cgroups::CgroupTracker,
    control::{Actor, ReloadReply},
    events::PolicyLoaded,
    loader,
    policy::{Policy, compile::compile_with_ids},
};

#[derive(Serialize)]
struct PolicyRejected {
    policy: String,
    error: String,
    actor: Actor,
}

impl Daemon {
    /// Reads, validates and swaps in the policy file. A bad file changes
    /// nothing: the old policy stays in force, and the error is reported.
    pub(super) fn reload(&mut self, actor: Actor) -> anyhow::Result<serde_json::Value> {
        let loaded = Policy::load(&self.settings.policy)
            .map_err(anyhow::Error::from)
            .and_then(|p| {
                let c = compile_with_ids(&p, &self.compiled.env_names)?;
                Ok((p, c))
            });
        let (policy, mut compiled) = match loaded {
            Ok(x) => x,
            Err(e) => {
                let error = format!("{e:#}");
                self.stream.emit(
                    "policy_rejected",
                    None,
                    &PolicyRejected {
                        policy: self.settings.policy.display().to_string(),
                        error: error.clone(),
                        actor,
                    },
                )?;
                anyhow::bail!(
                    "{error}\nthe policy in force is unchanged ({})",
                    self.policy.revision
                );
            }
        };
        warn_about(&policy, &self.mount, &self.root_rel);
        // What was counted under the old policy goes into the history with
        // its env names, before the new one may rename or drop envs.
        self.sample_history();
        let mut tracker = CgroupTracker::new(&self.mount, &compiled);
        // Registered containers follow their env by name into the new policy.
        super::containers::widen(&mut compiled, &self.containers);
        let registered = self.container_envs(&compiled);
        // The runtime switches stay, over the new policy's modes.
        let modes = self
            .modes
            .reloaded(&policy, |env| compiled.env_id(env).is_some());
        // The last pass's namespaces, judged by the new slot's cgroups; a
        // namespace that had no env before has its addresses read at the
        // next pass (≤ 500 ms).
        let endpoints = &mut self.endpoints;
        self.kernel
            .apply_policy(
                &compiled,
                || {
                    let mut ids = tracker.rescan();
                    ids.extend(registered);
                    ids
                },
                modes.global().0.kernel(),
                &modes.kernel_pairs(&compiled),
                |cgroups| {
                    let r = crate::endpoints::resolve(endpoints.last(), cgroups);
                    endpoints.replace(&r, std::time::SystemTime::now());
                    r.table.iter().map(|(a, o)| (*a, o.env)).collect()
                },
            )
            .context("writing the new policy into the kernel")?;
        for (path, id) in tracker.known() {
            self.names.insert(id, path);
        }
        self.policy = policy;
        self.modes = modes;
        self.compiled = compiled;
        self.tc_interfaces = self
            .kernel
            .sync_interfaces(&self.compiled)
            .context("attaching the tc hooks to the listed interfaces")?;
        self.tracker = tracker;
        self.drop_orphaned_containers()?;
        // Cgroups may have changed env: every socket is looked at again.
        self.holders.forget();
        self.holders_pass()?;
        self.emit_policy_loaded(Some(actor))?;
        Ok(serde_json::to_value(ReloadReply {
            revision: self.policy.revision.clone(),
        })?)
    }

    pub(super) fn emit_policy_loaded(&mut self, actor: Option<Actor>) -> anyhow::Result<()> {
        #[derive(Serialize)]
        struct Loaded<'a> {
            #[serde(flatten)]
            base: PolicyLoaded<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            actor: Option<Actor>,
        }
        let body = Loaded {
            base: PolicyLoaded {
                policy: std::fs::canonicalize(&self.settings.policy)
                    .unwrap_or_else(|_| self.settings.policy.clone())
                    .display()
                    .to_string(),
                revision: &self.policy.revision,
                envs: self.policy.env_names(),
                mode: self.modes.global().0.to_string(),
                cgroup_root: self.root_rel.clone(),
                hooks: loader::PROGRAMS,
                pin_root: self.kernel.pin_root().display().to_string(),
                adopted: self.kernel.adopted(),
            },
            actor,
        };
        self.stream.emit("policy_loaded", None, &body)?;
        Ok(())
    }
}
