//! Container endpoints: the pass that keeps the kernel's address → env
//! table in line with the network namespaces (see `crate::endpoints`).
use std::time::SystemTime;

use serde::Serialize;

use super::Daemon;
use crate::{
    control::EndpointStatus,
    endpoints::{Collector, Conflict, resolve},
    events,
};

/// `endpoint_conflict`: an address claimed by more than one env.
#[derive(Serialize)]
struct EndpointConflict {
    address: String,
    /// The claiming envs, sorted by env id.
    envs: Vec<String>,
    /// The claiming network namespaces' inodes.
    netns: Vec<u64>,
    /// One process per claiming (namespace, env).
    pids: Vec<i32>,
    /// The env the address has now: always `endpoint-conflict`.
    env: &'static str,
}

impl Daemon {
    /// Resolves the namespaces the holder pass's walk found against the
    /// active slot's cgroups and writes what changed.
    pub(super) fn endpoints_pass(&mut self, collector: Collector) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let cgroups = self.kernel.cgroups()?;
        let namespaces = collector.finish(&self.mount, &cgroups);
        let (spaces, processes) = (
            namespaces.len(),
            namespaces.iter().map(|n| n.members.len()).sum::<usize>(),
        );
        let r = resolve(&namespaces, &cgroups);
        let diff = self.endpoints.update(namespaces, r, SystemTime::now());
        let changed = diff.set.len() + diff.remove.len();
        for &(a, env) in &diff.set {
            self.kernel.set_endpoint(a, Some(env))?;
            log::info!("endpoint {a} is {} now", self.compiled.env_name(env));
        }
        for &a in &diff.remove {
            self.kernel.set_endpoint(a, None)?;
            log::info!("endpoint {a} forgotten");
        }
        if changed > 0 {
            // Verdicts taken with the address's old env must not outlive it.
            self.kernel.invalidate_verdicts()?;
        }
        log::debug!(
            "endpoint pass: {spaces} other namespaces, {processes} processes in them, {} endpoints, {changed} changes, in {} µs",
            self.endpoints.known().len(),
            started.elapsed().as_micros()
        );
        self.report_conflicts(diff.new_conflicts)
    }

    pub(super) fn report_conflicts(&mut self, conflicts: Vec<Conflict>) -> anyhow::Result<()> {
        for c in conflicts {
            let record = EndpointConflict {
                address: c.address.to_string(),
                envs: c
                    .envs
                    .iter()
                    .map(|&e| self.compiled.env_name(e).to_owned())
                    .collect(),
                netns: c.netns,
                pids: c.pids,
                env: envguard_common::policy::ENV_CONFLICT_NAME,
            };
            self.stream.emit("endpoint_conflict", None, &record)?;
        }
        Ok(())
    }

    pub(super) fn endpoint_status(&self) -> Vec<EndpointStatus> {
        self.endpoints
            .known()
            .iter()
            .map(|(a, k)| EndpointStatus {
                address: a.to_string(),
                env: self.compiled.env_name(k.owner.env).to_owned(),
                netns: k.owner.netns,
                since: events::rfc3339(k.since),
            })
            .collect()
    }
}
