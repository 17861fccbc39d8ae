//! `envguard run`: the host daemon.
use std::{
    io::{BufWriter, Stdout},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use envguard_common::{
    config::{Counter, NUM_COUNTERS},
    event::ViolationEvent,
    maps,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    error::Error,
    events::{self, CounterRecord, LostEvents, PolicyLoaded, Stream},
    loader::{self, Kernel, Options},
    policy::{
        Policy,
        compile::{Compiled, compile_with_ids},
    },
    scan,
    sys::{self, CgroupNames},
};

/// Enforce a policy: load it into the kernel, attach, stream violation events.
///
/// Runs in the foreground. Events are JSON lines on stdout (the first is
/// `policy_loaded`, printed once every program is attached); logs go to stderr.
/// Programs, links and maps are pinned under --pin-root, so enforcement does
/// not depend on this process: SIGINT and SIGTERM exit 0 and leave it in place
/// (`envguard detach` removes it), and the next `envguard run` adopts it
/// without a moment unguarded.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The policy file (TOML).
    #[arg(long, short)]
    pub policy: PathBuf,
    /// Attach at this cgroup instead of the root of the cgroup2 hierarchy: only
    /// workloads below it are guarded. A path relative to the cgroup2 mount
    /// (e.g. /test.slice), like the policy's cgroups.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<String>,
    /// Where programs, links and maps are pinned (on a bpf filesystem; bpffs
    /// is mounted at /sys/fs/bpf if nothing is).
    #[arg(long, value_name = "DIR", default_value = loader::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// On SIGINT/SIGTERM, remove every program, link and pin instead of
    /// leaving enforcement in place (for ephemeral use).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Size of the kernel's event ring buffer in bytes (a power of two, at
    /// least 4096). Changing it replaces the pinned maps.
    #[arg(long, value_name = "BYTES")]
    pub ringbuf_bytes: Option<u32>,
    /// Capacity of the kernel's per-flow verdict cache (an LRU: a flow evicted
    /// from it is classified again). Changing it replaces the pinned maps.
    #[arg(long, value_name = "N")]
    pub flow_cache_entries: Option<u32>,
    /// Print the kernel verifier's log when it rejects a program.
    #[arg(long)]
    pub verifier_log: bool,
}

/// How often the agent beats, looks for listed-but-missing cgroups and reads
/// the kernel's loss counters.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: &RunArgs) -> anyhow::Result<()> {
    if !sys::is_root() {
        return Err(Error::NotRoot.into());
    }
    let started = std::time::Instant::now();
    let policy = Policy::load(&args.policy)?;
    let mount = sys::cgroup2_mount()?;
    let root_rel = normalize_root(args.cgroup_root.as_deref().unwrap_or("/"), &mount);
    let root_dir = sys::cgroup_dir(&mount, &root_rel);
    if sys::cgroup_id(&root_dir).is_none() {
        return Err(Error::NoSuchCgroup {
            path: root_rel,
            mount,
        }
        .into());
    }
    for w in super::policy_warnings(&policy, Some(&mount)) {
        log::warn!("{}: {w}", args.policy.display());
    }
    for c in policy.envs.iter().flat_map(|e| &e.cgroups) {
        if !is_below(c, &root_rel) {
            log::warn!(
                "cgroup {c} is outside the attach point {root_rel}: envguard does not see its traffic"
            );
        }
    }

    let mut kernel = Kernel::open(&Options {
        pin_root: args.pin_root.clone(),
        verifier_log: args.verifier_log,
        ringbuf_bytes: args.ringbuf_bytes,
        flow_cache_entries: args.flow_cache_entries,
    })?;
    // Env ids as the adopted state has them, so its counters and bound-socket
    // table stay right.
    let compiled = compile_with_ids(&policy, &kernel.env_names()?)?;
    let tracker = CgroupTracker::new(&mount, &compiled);
    // The policy goes into the maps before any new program is attached, so no
    // program ever runs without it.
    kernel
        .apply_policy(
            &compiled,
            &tracker.present(),
            compiled.mode,
            &compiled.pair_modes,
        )
        .context("writing the policy into the kernel")?;
    kernel.attach(&root_dir)?;
    // After attaching: a socket bound from now on is recorded by the kernel,
    // one bound before is found here; none falls in between.
    let bound = scan::bound_sockets(&mount, &root_rel, |cgroup| {
        scan::env_of_cgroup(cgroup, &compiled.cgroups)
    });
    kernel
        .record_bound(&bound)
        .context("recording sockets bound before start")?;
    log::info!(
        "{} {} ({}) in {} mode at {} in {} ms; {} local sockets bound before start recorded",
        if kernel.adopted() {
            "adopted pinned state, enforcing"
        } else {
            "enforcing"
        },
        args.policy.display(),
        policy.revision,
        policy.mode,
        root_dir.display(),
        started.elapsed().as_millis(),
        bound.len()
    );

    let mut names = CgroupNames::new(&mount);
    for (path, id) in tracker.known() {
        names.insert(id, path);
    }
    let mut stream = Stream::new(BufWriter::new(std::io::stdout()));
    stream.emit(
        "policy_loaded",
        None,
        &PolicyLoaded {
            policy: std::fs::canonicalize(&args.policy)
                .unwrap_or_else(|_| args.policy.clone())
                .display()
                .to_string(),
            revision: &policy.revision,
            envs: policy.env_names(),
            mode: policy.mode.to_string(),
            cgroup_root: root_rel.clone(),
            hooks: loader::PROGRAMS,
            pin_root: args.pin_root.display().to_string(),
            adopted: kernel.adopted(),
        },
    )?;
    if let Some(prev) = kernel.previous.filter(|p| p.heartbeat_ns != 0) {
        let gap = Duration::from_nanos(sys::boot_ns().saturating_sub(prev.heartbeat_ns));
        stream.emit("agent_gap", None, &events::agent_gap(&policy, gap))?;
    }
    stream.flush()?;

    let events = kernel.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    // Map-full and unparsable counts are reported from this start on.
    let mut counters_reported = [0; NUM_COUNTERS as usize];
    for c in [
        Counter::FlowCacheFull,
        Counter::BoundTableFull,
        Counter::Unparsable,
    ] {
        counters_reported[c as usize] = kernel.counter(c)?;
    }
    let mut daemon = Daemon {
        kernel,
        policy,
        compiled,
        names,
        stream,
        tracker,
        counters_reported,
    };
    let result = daemon.serve(ring).await;
    let pin_root = daemon.kernel.pin_root().to_owned();
    // Closes every fd of ours; the pins keep enforcement in place.
    drop(daemon);
    if args.detach_on_exit {
        let removed = loader::detach(&pin_root)?;
        log::info!(
            "detached: removed {removed} pinned layouts under {}",
            pin_root.display()
        );
    } else {
        log::info!(
            "exiting; enforcement stays in place, pinned under {} (`envguard detach --pin-root {}` removes it)",
            pin_root.display(),
            pin_root.display()
        );
    }
    result
}

struct Daemon {
    kernel: Kernel,
    policy: Policy,
    compiled: Compiled,
    names: CgroupNames,
    stream: Stream<BufWriter<Stdout>>,
    tracker: CgroupTracker,
    /// Per `Counter`: the value already reported.
    counters_reported: [u64; NUM_COUNTERS as usize],
}

impl Daemon {
    async fn serve(&mut self, mut ring: AsyncFd<RingBuf<MapData>>) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for events")?;
                    self.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                _ = tick.tick() => self.housekeeping()?,
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        log::info!("signal received");
        self.drain(ring.get_mut())?;
        self.housekeeping()
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
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
            let body = events::violation(&self.policy, &self.compiled, &mut self.names, &e);
            self.stream.emit("violation", Some(e.boot_ns), &body)?;
        }
        self.stream.flush()?;
        Ok(())
    }

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        for (id, env) in self.tracker.refresh() {
            self.kernel.set_cgroup(id, env)?;
        }
        for (path, id) in self.tracker.known() {
            self.names.insert(id, path);
        }
        for (counter, kind, what) in [
            (Counter::FlowCacheFull, "map_full", maps::FLOW_VERDICTS),
            (Counter::BoundTableFull, "map_full", maps::BOUND_SOCKETS),
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
        let lost = self.kernel.counter(Counter::EventsLost)?;
        if lost > self.kernel.lost_reported {
            self.stream.emit(
                "lost_events",
                None,
                &LostEvents {
                    source: "ringbuf",
                    count: lost - self.kernel.lost_reported,
                },
            )?;
            self.stream.flush()?;
            self.kernel.lost_reported = lost;
        }
        self.kernel.heartbeat()?;
        Ok(())
    }
}

/// Accepts the attach point relative to the mount or as an absolute path under it.
fn normalize_root(given: &str, mount: &Path) -> String {
    let rel = Path::new(given)
        .strip_prefix(mount)
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_else(|_| given.to_owned());
    let trimmed = rel.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

pub fn is_below(path: &str, root: &str) -> bool {
    root == "/" || path == root || path.starts_with(&format!("{root}/"))
}

/// Keeps `CGROUP_ENVS` in step with the policy's cgroups as they are created,
/// removed and recreated (a recreated cgroup has a new id).
struct CgroupTracker {
    mount: PathBuf,
    /// (path, env id, id when last seen)
    entries: Vec<(String, u32, Option<u64>)>,
}

impl CgroupTracker {
    fn new(mount: &Path, compiled: &Compiled) -> Self {
        let entries = compiled
            .cgroups
            .iter()
            .map(|(p, env)| (p.clone(), *env, sys::cgroup_id(&sys::cgroup_dir(mount, p))))
            .collect();
        Self {
            mount: mount.to_owned(),
            entries,
        }
    }

    fn present(&self) -> Vec<(u64, u32)> {
        self.entries
            .iter()
            .filter_map(|(_, env, id)| id.map(|id| (id, *env)))
            .collect()
    }

    fn known(&self) -> Vec<(String, u64)> {
        self.entries
            .iter()
            .filter_map(|(p, _, id)| id.map(|id| (p.clone(), id)))
            .collect()
    }

    /// Map updates to apply: (cgroup id, Some(env) to add, None to remove).
    fn refresh(&mut self) -> Vec<(u64, Option<u32>)> {
        let mut updates = Vec::new();
        for (path, env, id) in &mut self.entries {
            let now = sys::cgroup_id(&sys::cgroup_dir(&self.mount, path));
            if now == *id {
                continue;
            }
            if let Some(old) = *id {
                updates.push((old, None));
                log::info!("cgroup {path} (id {old}) is gone");
            }
            if let Some(new) = now {
                updates.push((new, Some(*env)));
                log::info!("cgroup {path} appeared (id {new})");
            }
            *id = now;
        }
        updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_root_accepts_both_spellings() {
        let m = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(normalize_root("/", m), "/");
        assert_eq!(normalize_root("/a/b/", m), "/a/b");
        assert_eq!(normalize_root("/sys/fs/cgroup/unified/a", m), "/a");
        assert_eq!(normalize_root("/sys/fs/cgroup/unified", m), "/");
        assert!(is_below("/a/b", "/a"));
        assert!(!is_below("/ab", "/a"));
        assert!(is_below("/x", "/"));
    }
}
