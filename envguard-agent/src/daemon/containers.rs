//! Registered containers: the `register` request (from `envguard oci-hook`),
//! their cgroups in the kernel's cgroup → env map, kept across reloads (by env
//! name) and restarts (the pinned `REGISTERED_CGROUPS` map), forgotten when
//! their cgroup goes, and the containers found running at start.
use anyhow::{Context as _, anyhow, bail};
use envguard_common::{
    config::MAX_CGROUP_LEVEL,
    container::{MAX_CONTAINER_ID, MAX_CONTAINER_NAME, Registration, padded, unpadded},
    policy::{CgroupPath, ENV_HOST, ENV_WORLD, EnvName, MAX_ENV_NAME},
};

use super::Daemon;
use crate::{
    cgroups::is_below,
    containers::{
        self, Claim, ContainerRef, K8S_NAMESPACE_KEY, RegisterRequest, Registered, Registry,
    },
    control::Actor,
    events,
    loader::{Kernel, widened},
    policy::{Policy, cgroup_level, compile::Compiled},
    sys,
};

/// The pinned form of a registration.
fn pinned(r: &Registered, unix_s: u64) -> Option<Registration> {
    Some(Registration {
        path: CgroupPath::new(&r.cgroup)?,
        env: EnvName {
            name: padded::<{ MAX_ENV_NAME + 1 }>(&r.env),
        },
        container_id: padded::<MAX_CONTAINER_ID>(&r.container.id),
        container_name: padded::<MAX_CONTAINER_NAME>(&r.container.name),
        registered_unix_s: unix_s,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The registrations an earlier agent pinned whose cgroup is still there
/// (the others are forgotten now), for the first policy load.
pub(super) fn restore(kernel: &mut Kernel, mount: &std::path::Path) -> anyhow::Result<Registry> {
    let mut registry = Registry::default();
    for (id, r) in kernel.registrations()? {
        let path = unpadded(&r.path.bytes).to_owned();
        if sys::cgroup_id(&sys::cgroup_dir(mount, &path)) != Some(id) {
            log::info!("registered cgroup {path} (id {id}) is gone: forgotten");
            kernel.set_registration(id, None)?;
            continue;
        }
        registry.insert(Registered {
            container: ContainerRef {
                id: unpadded(&r.container_id).to_owned(),
                name: unpadded(&r.container_name).to_owned(),
            },
            env: unpadded(&r.env.name).to_owned(),
            cgroup: path,
            cgroup_id: id,
            registered_at: events::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.registered_unix_s),
            ),
        });
    }
    Ok(registry)
}

/// Widens a compiled policy's cgroup walk to the registered cgroups' levels.
pub(super) fn widen(compiled: &mut Compiled, registry: &Registry) {
    for r in registry.iter() {
        let m = widened(
            envguard_common::config::PolicyMeta::new(compiled.min_level, compiled.max_level),
            cgroup_level(&r.cgroup),
        );
        (compiled.min_level, compiled.max_level) = (m.min_level, m.max_level);
    }
}

/// (cgroup id, env id) of the registered containers whose env `compiled` has.
pub(super) fn env_ids(registry: &Registry, compiled: &Compiled) -> Vec<(u64, u32)> {
    registry
        .iter()
        .filter_map(|r| Some((r.cgroup_id, declared_env(compiled, &r.env)?)))
        .collect()
}

/// A declared env's id: `host` and `world` are what a container is without
/// registering, never something it registers into.
fn declared_env(compiled: &Compiled, name: &str) -> Option<u32> {
    compiled
        .env_id(name)
        .filter(|&id| id != ENV_HOST && id != ENV_WORLD)
}

/// The env a claim names under `policy`.
pub fn resolve(policy: &Policy, claim: &Claim) -> anyhow::Result<String> {
    match claim {
        Claim::Env(e) => Ok(e.clone()),
        Claim::K8sNamespace(ns) => containers::env_of_namespace(&policy.envs, ns)
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "k8s namespace {ns:?} maps to no env: no [envs.X] k8s_namespaces matches it"
                )
            }),
    }
}

impl Daemon {
    /// The listed cgroups and the registered ones, as the holder pass needs them.
    pub(super) fn listed_cgroups(&self) -> Vec<(String, u32)> {
        let mut listed = self.compiled.cgroups.clone();
        for r in self.containers.iter() {
            if let Some(env) = declared_env(&self.compiled, &r.env) {
                listed.push((r.cgroup.clone(), env));
            }
        }
        listed
    }

    /// The registered containers' (cgroup id, env id) under `compiled`.
    pub(super) fn container_envs(&self, compiled: &Compiled) -> Vec<(u64, u32)> {
        env_ids(&self.containers, compiled)
    }

    /// Registers a container's cgroup in an env: in the kernel's map of the
    /// policy in force at once (cached verdicts made stale), and pinned.
    pub(super) fn register(
        &mut self,
        req: RegisterRequest,
        actor: &Actor,
    ) -> anyhow::Result<Registered> {
        let env = resolve(&self.policy, &req.claim)?;
        let env_id = declared_env(&self.compiled, &env).ok_or_else(|| {
            anyhow!(
                "env {env:?} is not in the policy in force (its envs: {})",
                self.policy.env_names().join(", ")
            )
        })?;
        let path = req.cgroup.trim_end_matches('/');
        if !path.starts_with('/')
            || path.split('/').any(|c| c == "." || c == "..")
            || path.contains('\0')
        {
            bail!("cgroup {path:?} is not a path from the cgroup2 mount's root (/a/b)");
        }
        if !is_below(path, &self.root_rel) {
            bail!(
                "cgroup {path} is outside the agent's attach point {}: envguard does not see its traffic",
                self.root_rel
            );
        }
        let level = cgroup_level(path);
        if level > MAX_CGROUP_LEVEL {
            bail!("cgroup {path} is deeper than the {MAX_CGROUP_LEVEL} levels the kernel walks");
        }
        let id = sys::cgroup_id(&sys::cgroup_dir(&self.mount, path)).ok_or_else(|| {
            anyhow!(
                "no cgroup {path} under {} (the container's process must be in it)",
                self.mount.display()
            )
        })?;
        let now = unix_now();
        let registered = Registered {
            container: req.container,
            env: env.clone(),
            cgroup: path.to_owned(),
            cgroup_id: id,
            registered_at: events::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(now),
            ),
        };
        let value = pinned(&registered, now).ok_or_else(|| {
            anyhow!(
                "cgroup path {path} is longer than {} bytes",
                envguard_common::policy::MAX_CGROUP_PATH - 2
            )
        })?;
        // The walk reaches the level before the entry is there: a packet
        // judged in between walks one level for nothing.
        self.kernel.widen_levels(level)?;
        self.kernel
            .set_cgroup(id, Some(env_id))
            .with_context(|| format!("registering cgroup {path}"))?;
        self.kernel.set_registration(id, Some(&value))?;
        self.kernel.invalidate_verdicts()?;
        self.names.insert(id, path.to_owned());
        // Sockets the container's processes already hold (one found at
        // start) get its env at the next holder pass.
        self.holders.forget();
        log::info!(
            "container {} ({}) registered in env {env}: cgroup {path} (id {id}), by {} (uid {:?})",
            registered.container.name,
            registered.container.id,
            actor.comm,
            actor.uid
        );
        self.containers.insert(registered.clone());
        Ok(registered)
    }

    /// Forgets the registered containers whose cgroup is gone (its id
    /// removed from the kernel's map by the caller's sync).
    pub(super) fn forget_removed_containers(&mut self) -> anyhow::Result<()> {
        let gone: Vec<u64> = self
            .containers
            .iter()
            .filter(|r| {
                sys::cgroup_id(&sys::cgroup_dir(&self.mount, &r.cgroup)) != Some(r.cgroup_id)
            })
            .map(|r| r.cgroup_id)
            .collect();
        for id in gone {
            self.kernel.set_registration(id, None)?;
            if let Some(r) = self.containers.remove(id) {
                log::info!(
                    "container {} ({}) is gone (cgroup {}): forgotten",
                    r.container.name,
                    r.container.id,
                    r.cgroup
                );
            }
        }
        Ok(())
    }

    /// After a reload: registrations whose env the new policy lacks are
    /// dropped (their cgroup is `host` now), loudly.
    pub(super) fn drop_orphaned_containers(&mut self) -> anyhow::Result<()> {
        let orphans: Vec<u64> = self
            .containers
            .iter()
            .filter(|r| declared_env(&self.compiled, &r.env).is_none())
            .map(|r| r.cgroup_id)
            .collect();
        for id in orphans {
            self.kernel.set_registration(id, None)?;
            if let Some(r) = self.containers.remove(id) {
                log::warn!(
                    "container {} ({}) was registered in env {}, which the policy no longer has: unregistered, its cgroup {} is host now",
                    r.container.name,
                    r.container.id,
                    r.env,
                    r.cgroup
                );
            }
        }
        Ok(())
    }

    /// Registers the annotated containers runc's state directories know that
    /// are not registered yet: containers started before the agent (or while
    /// it was away, by a hook configured to fail open).
    pub(super) fn discover_containers(&mut self) {
        for found in containers::discover(containers::RUNC_ROOTS) {
            let s = found.state;
            let annotations = s.annotations();
            let key = &self.settings.container_env_key;
            let Some(claim) = containers::claim(&annotations, key, K8S_NAMESPACE_KEY) else {
                continue;
            };
            let Some(Ok(cgroup)) = s.pid.map(containers::cgroup_of_pid) else {
                continue;
            };
            if !is_below(&cgroup, &self.root_rel) {
                log::debug!(
                    "container {} is outside the attach point ({cgroup}): not registered",
                    s.id
                );
                continue;
            }
            let known = sys::cgroup_id(&sys::cgroup_dir(&self.mount, &cgroup))
                .is_some_and(|id| self.containers.get(id).is_some());
            if known {
                continue;
            }
            let req = RegisterRequest {
                cgroup,
                claim,
                container: ContainerRef {
                    name: containers::container_name(&s.id, &s.bundle, &annotations),
                    id: s.id.clone(),
                },
            };
            if let Err(e) = self.register(req, &Actor::agent("discovery")) {
                log::warn!("container {} found running, not registered: {e:#}", s.id);
            }
        }
    }
}
