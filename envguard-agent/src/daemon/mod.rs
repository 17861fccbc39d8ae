//! The host daemon: starts enforcement (or adopts it), then serves events,
//! housekeeping, signals and control requests until told to stop. It owns all
//! runtime state; the control socket's tasks send it requests.
//!
//! `impl Daemon` is spread by responsibility: start-up, the main loop and
//! request dispatch here; the periodic work in `housekeeping`, runtime modes
//! and break-glass expiry in `modes`, `reload`, and the `status` / `explain`
//! answers in `status`.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use envguard_common::{
    config::{Counter, NUM_COUNTERS},
    event::{DecisionKey, DedupKey},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
    time::Instant,
};

use crate::{
    cgroups::{CgroupTracker, is_below, normalize_root},
    control::{self, Actor, Call, Request, Response},
    error::Error,
    events::{self, Stream},
    loader::{self, Kernel, Options},
    metrics,
    modes::Modes,
    policy::{
        Policy,
        compile::{Compiled, compile_with_ids},
    },
    ratelimit::TokenBucket,
    scan,
    sinks::{Fanout, SinkConfig},
    sys::{self, CgroupNames},
};

mod containers;
mod endpoints;
mod history;
mod housekeeping;
mod modes;
mod reload;
mod status;

/// How often the agent beats, looks for listed-but-missing cgroups and reads
/// the kernel's loss counters.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often sockets are given their holders' env: the bound on how long a
/// socket handed to another env's process keeps its old env.
const HOLDERS_PASS: Duration = Duration::from_millis(500);
/// Records buffered for each `events --follow` subscriber.
const SUBSCRIBER_QUEUE: usize = 4096;

/// What `envguard run` was asked to do.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: PathBuf,
    pub cgroup_root: Option<String>,
    pub kernel: Options,
    pub control_socket: PathBuf,
    pub control_group: Option<u32>,
    /// The env annotation of containers found running at start.
    pub container_env_key: String,
    pub detach_on_exit: bool,
    /// Where records go; each sink has its own bounded queue.
    pub sinks: Vec<SinkConfig>,
    pub sink_queue: usize,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Records per second and burst for `violation` records.
    pub rate_limit: Option<(f64, u32)>,
    /// Where the history is kept (none: no history), and how often the
    /// decision counters are sampled into it.
    pub state_dir: Option<PathBuf>,
    /// --state-dir was given (not the default): failing to open it is fatal.
    pub state_dir_explicit: bool,
    pub history_interval: Duration,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if !sys::is_root() {
        return Err(Error::NotRoot.into());
    }
    let started = std::time::Instant::now();
    let policy = Policy::load(&settings.policy)?;
    let mount = sys::cgroup2_mount()?;
    let root_rel = normalize_root(settings.cgroup_root.as_deref().unwrap_or("/"), &mount);
    let root_dir = sys::cgroup_dir(&mount, &root_rel);
    if sys::cgroup_id(&root_dir).is_none() {
        return Err(Error::NoSuchCgroup {
            path: root_rel,
            mount,
        }
        .into());
    }
    warn_about(&policy, &mount, &root_rel);
    // Before anything is loaded: a state directory someone else could
    // write is refused while nothing has changed yet.
    let history = history::open(&settings)?;

    let mut kernel = Kernel::open(&settings.kernel)?;
    // Env ids as the adopted state has them, so its counters and the envs kept
    // on sockets stay right.
    let mut compiled = compile_with_ids(&policy, &kernel.env_names()?)?;
    let mut tracker = CgroupTracker::new(&mount, &compiled);
    // Containers an earlier agent registered go into the first load, so a
    // restart never leaves them out of their env.
    let registry = containers::restore(&mut kernel, &mount)?;
    containers::widen(&mut compiled, &registry);
    let registered = containers::env_ids(&registry, &compiled);
    let modes = Modes::from_policy(&policy);
    // Container endpoints go in with the policy, as its cgroups make them.
    let mut endpoints = crate::endpoints::Endpoints::default();
    let mut first_conflicts = Vec::new();
    // The policy goes into the maps before any new program is attached, so no
    // program ever runs without it.
    kernel
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
                let mut collector = crate::endpoints::Collector::new();
                collector.walk();
                let namespaces = collector.finish(&mount, cgroups);
                let r = crate::endpoints::resolve(&namespaces, cgroups);
                let table = r.table.iter().map(|(a, o)| (*a, o.env)).collect();
                first_conflicts = endpoints
                    .update(namespaces, r, SystemTime::now())
                    .new_conflicts;
                table
            },
        )
        .context("writing the policy into the kernel")?;
    kernel.attach(&root_dir)?;
    let tc_interfaces = kernel
        .sync_interfaces(&compiled)
        .context("attaching the tc hooks to the listed interfaces")?;
    let mut names = CgroupNames::new(&mount);
    for (path, id) in tracker.known() {
        names.insert(id, path);
    }
    // After attaching: a socket bound from now on is labelled by the kernel,
    // one bound before is labelled here; none falls in between.
    let mut holders = scan::Holders::default();
    let mut listed = compiled.cgroups.clone();
    for r in registry.iter() {
        names.insert(r.cgroup_id, r.cgroup.clone());
        if let Some(env) = compiled.env_id(&r.env) {
            listed.push((r.cgroup.clone(), env));
        }
    }
    let first_pass = holders.pass(
        &mut kernel,
        &mount,
        &root_rel,
        &listed,
        &mut names,
        &mut |_, _| {},
    );
    log::info!(
        "{} {} ({}) in {} mode at {} in {} ms; {} sockets labelled with their holders' env",
        if kernel.adopted() {
            "adopted pinned state, enforcing"
        } else {
            "enforcing"
        },
        settings.policy.display(),
        policy.revision,
        policy.mode,
        root_dir.display(),
        started.elapsed().as_millis(),
        first_pass.relabeled
    );
    let (events_tx, _) = broadcast::channel(SUBSCRIBER_QUEUE);
    let fanout = Fanout::new(settings.sinks.clone(), settings.sink_queue)?;
    let mut stream = Stream::new(fanout).with_subscribers(events_tx.clone());
    if let Some((rate, burst)) = settings.rate_limit {
        stream = stream.with_rate_limit(TokenBucket::new(rate, burst));
    }
    let snapshot = Arc::new(Mutex::new(metrics::Snapshot::new()));
    let metrics_server = match settings.metrics_listen {
        Some(addr) => {
            log::info!("serving Prometheus metrics on http://{addr}/metrics");
            Some(metrics::serve(addr, snapshot.clone()).await?)
        }
        None => None,
    };
    let (calls_tx, calls_rx) = mpsc::channel(64);
    let limits = control::Limits::default();
    sys::raise_nofile_limit((limits.root + limits.others + 1024) as u64);
    let gate = Arc::new(control::Gate::new(limits));
    let server = control::serve(
        &settings.control_socket,
        settings.control_group,
        calls_tx,
        events_tx,
        gate.clone(),
    )?;

    let ring = kernel.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    // Map-full and unparsable counts, and the status counters, run from this start on.
    let mut counters_reported = [0; NUM_COUNTERS as usize];
    for c in [
        Counter::FlowCacheFull,
        Counter::SockStorageFull,
        Counter::Unparsable,
    ] {
        counters_reported[c as usize] = kernel.counter(c)?;
    }
    let decisions_baseline = kernel.decisions()?.into_iter().collect();
    // Repeats counted before this start were a predecessor's to report.
    let dedup_reported = kernel
        .dedup()?
        .into_iter()
        .map(|(k, total, _, _)| (k, total))
        .collect();
    let previous = kernel.previous;
    let mut daemon = Daemon {
        kernel,
        policy,
        compiled,
        names,
        stream,
        tracker,
        counters_reported,
        decisions_baseline,
        mount,
        root_rel,
        settings: settings.clone(),
        since: SystemTime::now(),
        modes,
        dedup_reported,
        next_rollup: Instant::now() + settings.kernel.dedup_interval,
        snapshot,
        lost_totals: BTreeMap::new(),
        holders,
        gate,
        history,
        probe_marks: Default::default(),
        probe_events: BTreeMap::new(),
        containers: registry,
        endpoints,
        tc_interfaces,
    };
    daemon.drop_orphaned_containers()?;
    daemon.discover_containers();
    // Before `policy_loaded`: whoever waits for it may signal the agent at
    // once, and a signal without a handler would kill it mid-way.
    let signals = Signals::install()?;
    daemon.emit_policy_loaded(None)?;
    // What the kernel counted while no agent ran goes into the history now.
    daemon.sample_history();
    daemon.report_shared(first_pass.shared)?;
    daemon.report_conflicts(first_conflicts)?;
    if let Some(prev) = previous.filter(|p| p.heartbeat_ns != 0) {
        let gap = Duration::from_nanos(sys::boot_ns().saturating_sub(prev.heartbeat_ns));
        let body = events::agent_gap(&daemon.policy, gap);
        daemon.stream.emit("agent_gap", None, &body)?;
    }

    let result = daemon.serve(ring, calls_rx, signals).await;
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let _ = std::fs::remove_file(&settings.control_socket);
    let pin_root = daemon.kernel.pin_root().to_owned();
    // Whatever the sinks still hold goes out (bounded wait), then every fd of
    // ours closes; the pins keep enforcement in place.
    let Daemon { stream, kernel, .. } = daemon;
    stream.into_inner().flush_and_close();
    drop(kernel);
    if settings.detach_on_exit {
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

fn warn_about(policy: &Policy, mount: &Path, root_rel: &str) {
    for w in crate::cgroups::policy_warnings(policy, Some(mount)) {
        log::warn!("{w}");
    }
    for c in policy.envs.iter().flat_map(|e| &e.cgroups) {
        if !is_below(c, root_rel) {
            log::warn!(
                "cgroup {c} is outside the attach point {root_rel}: envguard does not see its traffic"
            );
        }
    }
}

/// The signals the agent handles, installed before it says it is ready.
struct Signals {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            sigterm: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            sigint: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            sighup: signal(SignalKind::hangup()).context("installing SIGHUP handler")?,
        })
    }
}

struct Daemon {
    kernel: Kernel,
    policy: Policy,
    compiled: Compiled,
    names: CgroupNames,
    stream: Stream<Fanout>,
    tracker: CgroupTracker,
    /// Per `Counter`: the value already reported.
    counters_reported: [u64; NUM_COUNTERS as usize],
    /// Decision counters at start: status counts from there.
    decisions_baseline: HashMap<DecisionKey, u64>,
    mount: PathBuf,
    root_rel: String,
    settings: Settings,
    since: SystemTime,
    /// The policy's modes and the operator's runtime switches over them.
    modes: Modes,
    /// Per violating flow: repeats already reported in rollups.
    dedup_reported: HashMap<DedupKey, u64>,
    next_rollup: Instant,
    /// What the metrics endpoint serves, refreshed every housekeeping tick.
    snapshot: Arc<Mutex<metrics::Snapshot>>,
    /// Records lost since start, per source (metrics).
    lost_totals: BTreeMap<String, u64>,
    /// Which env each socket's holders are in.
    holders: scan::Holders,
    /// The control socket's admission: open connections, refusals.
    gate: Arc<control::Gate>,
    /// The history in the state directory, if one is kept.
    history: Option<history::Recorder>,
    /// Cgroups of `envguard verify` probes, and records they caused per kind.
    probe_marks: crate::verify::marks::ProbeMarks,
    probe_events: BTreeMap<String, u64>,
    /// Containers registered into envs (`envguard oci-hook`).
    containers: crate::containers::Registry,
    /// Container endpoints: what the kernel's active slot holds.
    endpoints: crate::endpoints::Endpoints,
    /// The listed interfaces with the tc hooks on them.
    tc_interfaces: Vec<loader::TcInterface>,
}

impl Daemon {
    async fn serve(
        &mut self,
        mut ring: AsyncFd<RingBuf<MapData>>,
        mut calls: mpsc::Receiver<Call>,
        signals: Signals,
    ) -> anyhow::Result<()> {
        let Signals {
            mut sigterm,
            mut sigint,
            mut sighup,
        } = signals;
        // Link changes wake the agent at once; without the subscription the
        // housekeeping poll still finds new interfaces within a second.
        let links = match crate::interfaces::LinkEvents::open()
            // SAFETY: LinkEvents owns its fd, which stays open and the same
            // for as long as the AsyncFd owns it.
            .and_then(|l| unsafe {
                AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("no link notifications ({e}): new interfaces are found by the 1 s poll");
                None
            }
        };
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        let mut holders_tick = tokio::time::interval(HOLDERS_PASS);
        // The kernel wakes the agent only once a batch of records is pending;
        // this drain bounds how long fewer records wait.
        let mut events_tick = tokio::time::interval(std::time::Duration::from_millis(
            envguard_common::config::EVENTS_DRAIN_INTERVAL_MS,
        ));
        events_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut history_tick = tokio::time::interval_at(
            Instant::now() + self.settings.history_interval,
            self.settings.history_interval,
        );
        loop {
            let next_expiry = self.modes.next_expiry().map(Instant::from_std);
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for events")?;
                    self.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                _ = events_tick.tick() => self.drain(ring.get_mut())?,
                _ = tick.tick() => self.housekeeping()?,
                guard = link_change(links.as_ref()) => {
                    let mut guard = guard.context("waiting for link changes")?;
                    if guard.get_inner().drain() {
                        self.sync_tc();
                    }
                    guard.clear_ready();
                }
                _ = holders_tick.tick() => self.holders_pass()?,
                _ = history_tick.tick(), if self.history.is_some() => self.sample_history(),
                Some(call) = calls.recv() => {
                    let response = self.handle(call.request, call.actor);
                    let _ = call.reply.send(response);
                }
                _ = sleep_until(next_expiry) => {
                    self.expire()?;
                }
                _ = sighup.recv() => {
                    // logrotate moves the file, then sends SIGHUP.
                    self.stream_out().reopen();
                    if let Err(e) = self.reload(Actor::agent("SIGHUP")) {
                        log::error!("reload on SIGHUP refused, the old policy stays in force: {e}");
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        log::info!("signal received");
        self.drain(ring.get_mut())?;
        self.rollups()?;
        let result = self.housekeeping();
        // Last, so that the programs' counts up to the exit are in it.
        self.sample_history();
        result
    }

    fn handle(&mut self, request: Request, actor: Actor) -> Response {
        let result = match request {
            Request::Status {} => self.status().and_then(|r| Ok(serde_json::to_value(r)?)),
            Request::Mode(m) => self
                .set_mode(m, actor)
                .and_then(|r| Ok(serde_json::to_value(r)?)),
            Request::Reload {} => self.reload(actor),
            Request::Explain { from, to, port } => self.explain(&from, &to, &port),
            Request::Policy {} => self.loaded_policy(),
            Request::ProbeMark {
                cgroup_id,
                run,
                ttl_secs,
            } => self
                .probe_marks
                .set(
                    cgroup_id,
                    &run,
                    ttl_secs.map(Duration::from_secs),
                    std::time::Instant::now(),
                )
                .map(|()| serde_json::json!({"cgroup_id": cgroup_id, "run": run}))
                .map_err(anyhow::Error::msg),
            Request::Register(r) => self
                .register(r, &actor)
                .and_then(|r| Ok(serde_json::to_value(r)?)),
            // Served by the control task itself.
            Request::Events {} => Err(anyhow::anyhow!("events are streamed by the socket task")),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }
}

/// The run id of the verify probe `cgroup_id` is, if it is one (counted
/// per record `kind`).
fn probe_mark(
    marks: &crate::verify::marks::ProbeMarks,
    counts: &mut BTreeMap<String, u64>,
    cgroup_id: u64,
    kind: &str,
) -> Option<String> {
    let run = marks.get(cgroup_id, std::time::Instant::now())?.to_owned();
    *counts.entry(kind.to_owned()).or_insert(0) += 1;
    Some(run)
}

impl Daemon {
    /// The policy in force as its files read when it was loaded.
    fn loaded_policy(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::to_value(control::PolicyReply {
            path: self.policy.path.display().to_string(),
            revision: self.policy.revision.clone(),
            files: self
                .policy
                .files
                .iter()
                .map(|(path, text)| control::PolicyFileText {
                    path: path.display().to_string(),
                    text: text.clone(),
                })
                .collect(),
        })?)
    }
}

/// The next link notification, or never without the subscription.
async fn link_change(
    links: Option<&AsyncFd<crate::interfaces::LinkEvents>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, crate::interfaces::LinkEvents>> {
    match links {
        Some(l) => l.readable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
