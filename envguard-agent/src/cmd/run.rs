//! `envguard run`: the host daemon.
use std::{
    io::{BufWriter, Stdout},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use envguard_common::{config::Counter, event::ViolationEvent};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    error::Error,
    events::{self, LostEvents, PolicyLoaded, Stream},
    loader,
    policy::{
        Policy,
        compile::{Compiled, compile},
    },
    scan,
    sys::{self, CgroupNames},
};

/// Enforce a policy: load it into the kernel, attach, stream violation events.
///
/// Runs in the foreground. Events are JSON lines on stdout (the first is
/// `policy_loaded`, printed once every program is attached); logs go to stderr.
/// SIGINT and SIGTERM detach every program and exit 0.
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
    /// Print the kernel verifier's log when it rejects a program.
    #[arg(long)]
    pub verifier_log: bool,
}

/// How often listed-but-missing cgroups are looked for, and kernel loss
/// counters read.
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
    let policy = Policy::load(&args.policy)?;
    let compiled = compile(&policy)?;
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
    for (c, _) in &compiled.cgroups {
        if !is_below(c, &root_rel) {
            log::warn!(
                "cgroup {c} is outside the attach point {root_rel}: envguard does not see its traffic"
            );
        }
    }

    let mut ebpf = loader::load(args.verifier_log)?;
    let tracker = CgroupTracker::new(&mount, &compiled);
    loader::fill_maps(&mut ebpf, &compiled, &tracker.present(), 1)
        .context("writing the policy into the kernel")?;
    loader::attach(&mut ebpf, &root_dir)?;
    // After attaching: a socket bound from now on is recorded by the kernel,
    // one bound before is found here; none falls in between.
    let bound = scan::bound_sockets(&mount, &root_rel, |cgroup| {
        scan::env_of_cgroup(cgroup, &compiled.cgroups)
    });
    loader::record_bound(&mut ebpf, &bound).context("recording sockets bound before start")?;
    log::info!("recorded {} local sockets bound before start", bound.len());
    log::info!(
        "enforcing {} ({}) in {} mode at {}",
        args.policy.display(),
        policy.revision,
        policy.mode,
        root_dir.display()
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
            hooks: loader::attached_hooks(),
        },
    )?;
    stream.flush()?;

    let events = loader::take_events(&mut ebpf)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    let mut daemon = Daemon {
        ebpf,
        policy,
        compiled,
        names,
        stream,
        tracker,
        lost_reported: 0,
    };
    let result = daemon.serve(ring).await;
    // Dropping the object closes the links: every program is detached.
    drop(daemon.ebpf);
    log::info!("detached from {}", root_dir.display());
    result
}

struct Daemon {
    ebpf: Ebpf,
    policy: Policy,
    compiled: Compiled,
    names: CgroupNames,
    stream: Stream<BufWriter<Stdout>>,
    tracker: CgroupTracker,
    lost_reported: u64,
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
        log::info!("signal received, detaching");
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
            loader::set_cgroup(&mut self.ebpf, id, env)?;
        }
        for (path, id) in self.tracker.known() {
            self.names.insert(id, path);
        }
        let lost = loader::counter(&mut self.ebpf, Counter::EventsLost)?;
        if lost > self.lost_reported {
            self.stream.emit(
                "lost_events",
                None,
                &LostEvents {
                    source: "ringbuf",
                    count: lost - self.lost_reported,
                },
            )?;
            self.stream.flush()?;
            self.lost_reported = lost;
        }
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
