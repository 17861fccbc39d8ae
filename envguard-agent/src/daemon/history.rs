//! The daemon's side of the history: a sample of the kernel's decision
//! counters at start, every `--history-interval` and at shutdown, and the
//! violation records tallied in between (see `crate::history`).
use envguard_common::event::DecisionKey;

use super::Daemon;
use crate::{
    events,
    history::{History, Key, Seen, Source, Tally, store::StateDir},
    policy::{Mode, compile::Compiled, compile::mode_value},
    sys,
};

/// The agent's open history.
pub(super) struct Recorder {
    pub dir: StateDir,
    pub history: History,
    pub tally: Tally,
    /// Written at least once by this agent (the first sample always is).
    pub saved: bool,
}

impl Recorder {
    pub fn open(dir: &std::path::Path) -> crate::error::Result<Recorder> {
        let dir = StateDir::open(dir)?;
        let history = dir.load()?;
        Ok(Recorder {
            dir,
            history,
            tally: Tally::default(),
            saved: false,
        })
    }
}

/// A kernel counter's labels, as the metrics name them.
pub(super) fn key_of(compiled: &Compiled, k: &DecisionKey) -> Key {
    Key {
        src_env: compiled.env_name(k.src_env).to_owned(),
        dst_env: compiled.env_name(k.dst_env).to_owned(),
        verdict: events::verdict_name(k.verdict).to_owned(),
        mode: if u32::from(k.mode) == mode_value(Mode::Enforce) {
            "enforce"
        } else {
            "audit"
        }
        .to_owned(),
        direction: events::direction_name(k.direction).to_owned(),
        proto: events::proto_label(k.proto),
    }
}

/// Opens the history `settings` ask for. The implicit default directory
/// may be unavailable (a read-only /var, a unit without `StateDirectory=`):
/// then the agent enforces without history, saying so. A directory refused
/// as unsafe, or one given with --state-dir, stops the start instead.
pub(super) fn open(settings: &super::Settings) -> anyhow::Result<Option<Recorder>> {
    let Some(dir) = settings.state_dir.as_deref() else {
        return Ok(None);
    };
    match Recorder::open(dir) {
        Ok(r) => {
            log::info!(
                "keeping history in {} (sampled every {:?})",
                dir.display(),
                settings.history_interval
            );
            Ok(Some(r))
        }
        Err(e @ crate::error::Error::Io { .. }) if !settings.state_dir_explicit => {
            log::warn!(
                "keeping no history: {e} (give a writable --state-dir, or --no-history to silence this)"
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

impl Daemon {
    /// Samples the counters into the history and writes it. A failure is
    /// logged, not fatal: enforcement does not depend on statistics, and
    /// the next sample computes its deltas from the last baseline written.
    pub(super) fn sample_history(&mut self) {
        if let Err(e) = self.try_sample_history() {
            log::error!("history: {e:#}");
        }
    }

    fn try_sample_history(&mut self) -> anyhow::Result<()> {
        let Some(rec) = self.history.as_mut() else {
            return Ok(());
        };
        let source = Source {
            boot_id: sys::kernel_boot_id()?,
            map_id: self.kernel.decisions_map_id()?,
        };
        let counters = self.kernel.decisions()?;
        let compiled = &self.compiled;
        let envs: Vec<String> = self.policy.envs.iter().map(|e| e.name.clone()).collect();
        let changed = rec.history.sample(
            sys::unix_secs(),
            &source,
            &counters,
            |k| key_of(compiled, k),
            &envs,
            &mut rec.tally,
        );
        if changed || !rec.saved {
            rec.dir.save(&rec.history)?;
            rec.saved = true;
        }
        Ok(())
    }
}

/// A `violation` record as the tally takes it: one attempt.
pub(super) fn seen_violation<'a>(v: &'a events::Violation) -> Seen<'a> {
    Seen {
        src_env: v.source.env,
        dst_env: v.destination.env,
        verdict: v.verdict,
        proto: &v.proto,
        dst_ip: v.destination.ip.as_deref(),
        dst_port: v.destination.port,
        comm: v.process.comm.as_deref(),
        cgroup: v.process.cgroup.as_deref(),
        cgroup_id: v.process.cgroup_id,
        count: 1,
    }
}

/// A `violation_rollup` as the tally takes it: its repeats.
pub(super) fn seen_rollup<'a>(r: &'a events::Rollup) -> Seen<'a> {
    Seen {
        src_env: r.source.env,
        dst_env: r.destination.env,
        verdict: r.verdict,
        proto: &r.proto,
        dst_ip: r.destination.ip.as_deref(),
        dst_port: r.destination.port,
        comm: r.process.comm.as_deref(),
        cgroup: r.process.cgroup.as_deref(),
        cgroup_id: r.process.cgroup_id,
        count: r.count,
    }
}
