//! The daemon's periodic work: events out of the ring buffer, the holder
//! pass, cgroup sync, rollups, loss and counter records, metrics.
use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use envguard_common::{
    config::Counter,
    event::{DedupKey, VERDICT_AUDITED, VERDICT_DENIED, ViolationEvent},
    maps,
};
use tokio::time::Instant;

use super::{Daemon, HOUSEKEEPING};
use crate::{
    events::{self, CounterRecord, LostEvents},
    metrics,
    policy::{Mode, compile::mode_value},
    scan,
    sinks::Fanout,
};

impl Daemon {
    /// Gives sockets their holders' env; reports sockets shared between envs.
    pub(super) fn holders_pass(&mut self) -> anyhow::Result<()> {
        let listed = self.listed_cgroups();
        // The same walk collects the container endpoints' namespaces.
        let mut collector = crate::endpoints::Collector::new();
        let pass = self.holders.pass(
            &mut self.kernel,
            &self.mount,
            &self.root_rel,
            &listed,
            &mut self.names,
            &mut |pid, cgroup| collector.visit(pid, cgroup),
        );
        self.endpoints_pass(collector)?;
        if pass.relabeled > 0 {
            // Decisions taken with a socket's old env (a peer's cached allow
            // to it, its own flows) must not outlive the change.
            self.kernel.invalidate_verdicts()?;
            log::info!(
                "{} sockets given their holders' env; cached verdicts invalidated",
                pass.relabeled
            );
        }
        self.report_shared(pass.shared)
    }

    pub(super) fn report_shared(&mut self, shared: Vec<scan::Shared>) -> anyhow::Result<()> {
        for s in shared {
            let record = events::SocketShared {
                inode: s.inode,
                cookie: s.cookie,
                envs: s
                    .envs
                    .iter()
                    .map(|&e| self.compiled.env_name(e).to_owned())
                    .collect(),
                pids: s.pids,
                env: self.compiled.env_name(s.env).to_owned(),
            };
            self.stream.emit("socket_shared", None, &record)?;
        }
        Ok(())
    }

    /// One `violation_rollup` per flow whose repeats grew since the last one.
    pub(super) fn rollups(&mut self) -> anyhow::Result<()> {
        let entries = self.kernel.dedup()?;
        let live: std::collections::HashSet<DedupKey> = entries.iter().map(|(k, ..)| *k).collect();
        for (k, total, first, last) in entries {
            let seen = self.dedup_reported.entry(k).or_insert(0);
            if total > *seen {
                let mut body = events::rollup(
                    &self.compiled,
                    &mut self.names,
                    &self.containers,
                    &k,
                    total - *seen,
                    first,
                    last,
                );
                body.probe = super::probe_mark(
                    &self.probe_marks,
                    &mut self.probe_events,
                    k.cgroup_id,
                    "violation_rollup",
                );
                *seen = total;
                if let (Some(h), None) = (self.history.as_mut(), &body.probe) {
                    h.tally.add(&super::history::seen_rollup(&body));
                }
                self.stream.emit("violation_rollup", Some(last), &body)?;
            }
        }
        // Flows the kernel evicted are done; forget them too.
        self.dedup_reported.retain(|k, _| live.contains(k));
        Ok(())
    }

    pub(super) fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        // One hand-off to the sinks per drain (or per batch of records),
        // also when a record fails: nothing may stay held back.
        self.stream.begin_batch();
        let result = self.drain_records(ring);
        self.stream.end_batch();
        result
    }

    fn drain_records(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<ViolationEvent>() {
                log::error!(
                    "short event record ({} bytes); kernel and agent disagree on the layout",
                    item.len()
                );
                continue;
            }
            // SAFETY: the kernel wrote a whole ViolationEvent; read unaligned
            // because ring buffer records are only 8-byte aligned by contract.
            let e: ViolationEvent =
                unsafe { item.as_ptr().cast::<ViolationEvent>().read_unaligned() };
            let mut body = events::violation(
                &self.policy,
                &self.compiled,
                &mut self.names,
                &self.containers,
                &e,
            );
            body.probe = super::probe_mark(
                &self.probe_marks,
                &mut self.probe_events,
                e.cgroup_id,
                "violation",
            );
            // verify's probes are counted apart (the `probe` field), not as
            // what the workloads did.
            if let (Some(h), None) = (self.history.as_mut(), &body.probe) {
                h.tally.add(&super::history::seen_violation(&body));
            }
            self.stream.emit("violation", Some(e.boot_ns), &body)?;
        }
        Ok(())
    }

    /// Brings the kernel's cgroup → env map in line with the listed cgroups
    /// that exist now. The `cgroup_mkdir` watch normally recorded a new one
    /// already; this is the safety net (no watch, a path too long for it)
    /// and removes what is gone, including cgroups created and removed
    /// between two polls. What to remove comes from a read of the map made
    /// before the paths are looked at, so an id the watch records meanwhile
    /// is never taken for a stale one; what to add from a read after. A
    /// change that means verdicts were taken with the wrong env (a listed
    /// cgroup that was `host` until now, an existing cgroup whose env was
    /// wrong) makes every cached verdict stale, so none outlives the fix;
    /// forgetting a cgroup that is gone changes no verdict.
    pub(super) fn sync_cgroups(&mut self) -> anyhow::Result<()> {
        let in_kernel = self.kernel.cgroups()?;
        let appeared = self.tracker.refresh();
        // Read again for what to add: the watch may have recorded a cgroup
        // created between the first read and the lookups.
        let recorded = self.kernel.cgroups()?;
        for (path, id) in appeared {
            if recorded.contains_key(&id) {
                log::info!("cgroup {path} appeared (id {id}); the kernel recorded it at mkdir");
            } else {
                log::info!("cgroup {path} appeared (id {id}); recorded by the poll");
            }
        }
        self.forget_removed_containers()?;
        let mut want: HashMap<u64, u32> = self.tracker.present().into_iter().collect();
        // A registered container's cgroup is in its env whatever the policy
        // lists.
        want.extend(self.container_envs(&self.compiled));
        let mut changed = 0;
        for (&id, &env) in &want {
            if recorded.get(&id) != Some(&env) {
                self.kernel.set_cgroup(id, Some(env))?;
                changed += 1;
            }
        }
        for &id in in_kernel.keys() {
            if !want.contains_key(&id) {
                self.kernel.set_cgroup(id, None)?;
                if self.names.exists(id) {
                    log::info!("cgroup id {id} is not listed (any more): removed");
                    changed += 1;
                } else {
                    log::info!("cgroup id {id} is gone: removed");
                }
            }
        }
        if changed > 0 {
            self.kernel.invalidate_verdicts()?;
            // Sockets labelled while their cgroup had the wrong env get their
            // holders' env at the next holder pass, which looks at every one.
            self.holders.forget();
            log::info!("{changed} cgroup env changes: cached verdicts invalidated");
        }
        Ok(())
    }

    /// Interfaces that appeared (and match) get their hooks, those gone or
    /// no longer listed lose them.
    pub(super) fn sync_tc(&mut self) {
        match self.kernel.sync_interfaces(&self.compiled) {
            Ok(t) => self.tc_interfaces = t,
            Err(e) => log::error!("syncing the tc hooks with the interfaces: {e}"),
        }
    }

    pub(super) fn housekeeping(&mut self) -> anyhow::Result<()> {
        self.sync_cgroups()?;
        // A backstop to the link notifications (`serve`): a missed or
        // overflowed one is caught within a second.
        self.sync_tc();
        for (path, id) in self.tracker.known() {
            self.names.insert(id, path);
        }
        // Violations the rate limit held back and no later record reported.
        self.stream.flush_suppressed()?;
        for (counter, kind, what) in [
            (Counter::FlowCacheFull, "map_full", maps::FLOW_VERDICTS),
            (Counter::SockStorageFull, "map_full", maps::SOCK_ENVS),
            (Counter::Unparsable, "unparsable_packets", "skb"),
        ] {
            let now = self.kernel.counter(counter)?;
            let seen = &mut self.counters_reported[counter as usize];
            if now > *seen {
                self.stream.emit(
                    kind,
                    None,
                    &CounterRecord {
                        source: what,
                        count: now - *seen,
                    },
                )?;
                *seen = now;
            }
        }
        if Instant::now() >= self.next_rollup {
            self.next_rollup =
                Instant::now() + self.settings.kernel.dedup_interval.max(HOUSEKEEPING);
            self.rollups()?;
        }
        let lost = self.kernel.counter(Counter::EventsLost)?;
        let mut losses = Vec::new();
        if lost > self.kernel.lost_reported {
            losses.push(("ringbuf".to_owned(), lost - self.kernel.lost_reported));
            self.kernel.lost_reported = lost;
        }
        // A loss report that its own sink drops is counted at the next tick.
        losses.extend(self.stream_out().take_dropped());
        for (source, count) in losses {
            *self.lost_totals.entry(source.clone()).or_default() += count;
            self.stream
                .emit("lost_events", None, &LostEvents { source, count })?;
        }
        self.update_metrics()?;
        self.kernel.heartbeat()?;
        Ok(())
    }

    pub(super) fn stream_out(&mut self) -> &Fanout {
        self.stream.out()
    }

    pub(super) fn update_metrics(&mut self) -> anyhow::Result<()> {
        let mut decisions = Vec::new();
        for (k, count) in self.kernel.decisions()? {
            let (from, to) = (
                self.compiled.env_name(k.src_env),
                self.compiled.env_name(k.dst_env),
            );
            let verdict = match k.verdict {
                VERDICT_DENIED => "denied",
                VERDICT_AUDITED => "audited",
                _ => "allowed",
            };
            // The mode the kernel took the decision in, so a series keeps its
            // labels across mode switches.
            let mode = if u32::from(k.mode) == mode_value(Mode::Enforce) {
                "enforce"
            } else {
                "audit"
            }
            .to_owned();
            decisions.push(metrics::Decision {
                src_env: from.to_owned(),
                dst_env: to.to_owned(),
                verdict: verdict.to_owned(),
                mode,
                direction: events::direction_name(k.direction).to_owned(),
                proto: events::proto_label(k.proto),
                count,
            });
        }
        let mut s = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        s.decisions = decisions;
        s.events_emitted = self
            .stream
            .emitted
            .iter()
            .map(|(&kind, &n)| (kind.to_owned(), n))
            .collect();
        s.events_lost = self.lost_totals.clone();
        s.events_suppressed = self.stream.suppressed();
        s.probe_events = self.probe_events.clone();
        s.policy_revision = self.kernel.policy_loads();
        s.heartbeat_seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        s.control_refused = self
            .gate
            .refused()
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        Ok(())
    }
}
