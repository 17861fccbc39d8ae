//! The host daemon: starts enforcement (or adopts it), then serves events,
//! housekeeping, signals and control requests until told to stop. It owns all
//! runtime state; the control socket's tasks send it requests.
use crate::cgroups::{CgroupTracker, is_below, normalize_root};
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
    event::{
        DecisionKey, DedupKey, VERDICT_ALLOWED, VERDICT_AUDITED, VERDICT_DENIED, ViolationEvent,
    },
    maps,
    policy::{PairKey, RULE_PREFIX_PAIR},
};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{broadcast, mpsc},
    time::Instant,
};

use crate::{
    control::{self, Actor, Call, ModeReply, ModeRequest, ReloadReply, Request, Response, Scope},
    error::Error,
    events::{self, CounterRecord, LostEvents, PolicyLoaded, Stream},
    explain::{Endpoint, ModeState, PortProto},
    loader::{self, Kernel, Options},
    metrics,
    policy::{
        Mode, Policy,
        compile::{Compiled, compile_with_ids, mode_value},
    },
    ratelimit::TokenBucket,
    scan,
    sinks::{Fanout, SinkConfig},
    sys::{self, CgroupNames},
};

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
    pub detach_on_exit: bool,
    /// Where records go; each sink has its own bounded queue.
    pub sinks: Vec<SinkConfig>,
    pub sink_queue: usize,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Records per second and burst for `violation` records.
    pub rate_limit: Option<(f64, u32)>,
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

    let mut kernel = Kernel::open(&settings.kernel)?;
    // Env ids as the adopted state has them, so its counters and the envs kept
    // on sockets stay right.
    let compiled = compile_with_ids(&policy, &kernel.env_names()?)?;
    let mut tracker = CgroupTracker::new(&mount, &compiled);
    // The policy goes into the maps before any new program is attached, so no
    // program ever runs without it.
    kernel
        .apply_policy(
            &compiled,
            || tracker.rescan(),
            compiled.mode,
            &compiled.pair_modes,
        )
        .context("writing the policy into the kernel")?;
    kernel.attach(&root_dir)?;
    let mut names = CgroupNames::new(&mount);
    for (path, id) in tracker.known() {
        names.insert(id, path);
    }
    // After attaching: a socket bound from now on is labelled by the kernel,
    // one bound before is labelled here; none falls in between.
    let mut holders = scan::Holders::default();
    let first_pass = holders.pass(
        &mut kernel,
        &mount,
        &root_rel,
        &compiled.cgroups,
        &mut names,
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
        global: None,
        pairs: BTreeMap::new(),
        dedup_reported,
        next_rollup: Instant::now() + settings.kernel.dedup_interval,
        snapshot,
        lost_totals: BTreeMap::new(),
        holders,
        gate,
    };
    // Before `policy_loaded`: whoever waits for it may signal the agent at
    // once, and a signal without a handler would kill it mid-way.
    let signals = Signals::install()?;
    daemon.emit_policy_loaded(None)?;
    daemon.report_shared(first_pass.shared)?;
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

/// An operator's runtime mode for a scope (the whole host, or one env pair).
#[derive(Debug, Clone)]
struct Override {
    mode: Mode,
    /// Break-glass: when it reverts.
    expires: Option<(Instant, SystemTime)>,
    /// The untimed override it replaced, restored on expiry; `None`: back to the policy file.
    revert_to: Option<Mode>,
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
    /// Runtime overrides; they outlive reloads (operator intent), and timed
    /// ones revert on time.
    global: Option<Override>,
    pairs: BTreeMap<(String, String), Override>,
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
}

#[derive(Serialize)]
struct ModeChange {
    actor: Actor,
    scope: String,
    from: String,
    to: String,
    expires_at: Option<String>,
    reason: &'static str,
}

#[derive(Serialize)]
struct PolicyRejected {
    policy: String,
    error: String,
    actor: Actor,
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
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        let mut holders_tick = tokio::time::interval(HOLDERS_PASS);
        loop {
            let next_expiry = self.next_expiry();
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for events")?;
                    self.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
                _ = tick.tick() => self.housekeeping()?,
                _ = holders_tick.tick() => self.holders_pass()?,
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
        self.housekeeping()
    }

    /// Gives sockets their holders' env; reports sockets shared between envs.
    fn holders_pass(&mut self) -> anyhow::Result<()> {
        let pass = self.holders.pass(
            &mut self.kernel,
            &self.mount,
            &self.root_rel,
            &self.compiled.cgroups,
            &mut self.names,
        );
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

    fn report_shared(&mut self, shared: Vec<scan::Shared>) -> anyhow::Result<()> {
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
    fn rollups(&mut self) -> anyhow::Result<()> {
        let entries = self.kernel.dedup()?;
        let live: std::collections::HashSet<DedupKey> = entries.iter().map(|(k, ..)| *k).collect();
        for (k, total, first, last) in entries {
            let seen = self.dedup_reported.entry(k).or_insert(0);
            if total > *seen {
                let body = events::rollup(
                    &self.compiled,
                    &mut self.names,
                    &k,
                    total - *seen,
                    first,
                    last,
                );
                *seen = total;
                self.stream.emit("violation_rollup", Some(last), &body)?;
            }
        }
        // Flows the kernel evicted are done; forget them too.
        self.dedup_reported.retain(|k, _| live.contains(k));
        Ok(())
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
    fn sync_cgroups(&mut self) -> anyhow::Result<()> {
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
        let want: HashMap<u64, u32> = self.tracker.present().into_iter().collect();
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

    fn housekeeping(&mut self) -> anyhow::Result<()> {
        self.sync_cgroups()?;
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

    fn stream_out(&mut self) -> &Fanout {
        self.stream.out()
    }

    fn update_metrics(&mut self) -> anyhow::Result<()> {
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
        s.events_emitted = self.stream.emitted.clone();
        s.events_lost = self.lost_totals.clone();
        s.events_suppressed = self.stream.suppressed();
        s.policy_revision = self.kernel.policy_loads();
        s.control_refused = self
            .gate
            .refused()
            .into_iter()
            .map(|(r, n)| (r.name().to_owned(), n))
            .collect();
        Ok(())
    }

    fn handle(&mut self, request: Request, actor: Actor) -> Response {
        let result = match request {
            Request::Status {} => self.status(),
            Request::Mode(m) => self
                .set_mode(m, actor)
                .and_then(|r| Ok(serde_json::to_value(r)?)),
            Request::Reload {} => self.reload(actor),
            Request::Explain { from, to, port } => self.explain(&from, &to, &port),
            // Served by the control task itself.
            Request::Events {} => Err(anyhow::anyhow!("events are streamed by the socket task")),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    /// What-if against the live policy and modes, runtime switches included.
    fn explain(&self, from: &str, to: &str, port: &str) -> anyhow::Result<serde_json::Value> {
        let from: Endpoint = from.parse().map_err(anyhow::Error::msg)?;
        let to: Endpoint = to.parse().map_err(anyhow::Error::msg)?;
        let port: PortProto = port.parse().map_err(anyhow::Error::msg)?;
        let mut modes = ModeState::from_policy(&self.policy);
        if let Some(o) = &self.global {
            modes.global = o.mode;
        }
        for ((f, t), o) in &self.pairs {
            let origin = match o.expires {
                Some((_, at)) => format!("envguard mode, until {}", events::rfc3339(at)),
                None => "envguard mode".to_owned(),
            };
            modes.push_pair(f, t, o.mode, origin);
        }
        let e = crate::explain::explain(
            &self.policy,
            &self.compiled,
            &from,
            &to,
            port.proto,
            port.port,
            &modes,
        )?;
        Ok(serde_json::to_value(e)?)
    }

    fn emit_policy_loaded(&mut self, actor: Option<Actor>) -> anyhow::Result<()> {
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
                mode: self.global_mode(&self.policy).to_string(),
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

    fn global_mode(&self, policy: &Policy) -> Mode {
        self.global.as_ref().map_or(policy.mode, |o| o.mode)
    }

    /// The pairs' modes for the kernel: the policy's, with runtime overrides on top.
    fn pair_modes(&self, compiled: &Compiled) -> Vec<(PairKey, u32)> {
        let mut modes: BTreeMap<(u32, u32), u32> = compiled
            .pair_modes
            .iter()
            .map(|(k, m)| ((k.src_env, k.dst_env), *m))
            .collect();
        for ((from, to), o) in &self.pairs {
            if let (Some(s), Some(d)) = (compiled.env_id(from), compiled.env_id(to)) {
                modes.insert((s, d), mode_value(o.mode));
            }
        }
        modes
            .into_iter()
            .map(|((s, d), m)| (PairKey::new(s, d), m))
            .collect()
    }

    /// The mode a pair is handled in now, and where that comes from.
    fn pair_mode(&self, from: &str, to: &str) -> (Mode, &'static str) {
        if let Some(o) = self.pairs.get(&(from.to_owned(), to.to_owned())) {
            return (o.mode, "runtime");
        }
        let ids = (self.compiled.env_id(from), self.compiled.env_id(to));
        if let (Some(s), Some(d)) = ids
            && let Some((_, m)) = self
                .compiled
                .pair_modes
                .iter()
                .find(|(k, _)| k.src_env == s && k.dst_env == d)
        {
            let mode = if *m == mode_value(Mode::Enforce) {
                Mode::Enforce
            } else {
                Mode::Audit
            };
            return (mode, "policy");
        }
        (self.global_mode(&self.policy), "global")
    }

    fn set_mode(&mut self, request: ModeRequest, actor: Actor) -> anyhow::Result<ModeReply> {
        let ModeRequest {
            mode,
            scope,
            for_secs,
        } = request;
        if for_secs == Some(0) {
            anyhow::bail!("a break-glass duration must be at least 1 s");
        }
        let expires = for_secs.map(|s| {
            let d = Duration::from_secs(s);
            (Instant::now() + d, SystemTime::now() + d)
        });
        let pair = match scope {
            Scope::Global => None,
            Scope::Pair { from: f, to: t } => {
                for n in [&f, &t] {
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
                Some((f, t))
            }
        };
        let (scope, previous) = match &pair {
            None => ("global".to_owned(), self.global_mode(&self.policy)),
            Some((f, t)) => (format!("{f}->{t}"), self.pair_mode(f, t).0),
        };
        let existing = match &pair {
            None => self.global.as_ref(),
            Some(k) => self.pairs.get(k),
        };
        // A timed override reverts to what stood before it, not to another timed one.
        let revert_to = existing.and_then(|o| {
            if o.expires.is_none() {
                Some(o.mode)
            } else {
                o.revert_to
            }
        });
        let new = Override {
            mode,
            expires,
            revert_to,
        };
        match &pair {
            None => {
                self.kernel.set_mode(mode_value(mode))?;
                self.global = Some(new);
            }
            Some((f, t)) => {
                let key = self.pair_key(f, t)?;
                self.kernel.set_pair_mode(key, Some(mode_value(mode)))?;
                self.pairs.insert((f.clone(), t.clone()), new);
            }
        }
        let expires_at = expires.map(|(_, at)| events::rfc3339(at));
        self.stream.emit(
            "mode_change",
            None,
            &ModeChange {
                actor,
                scope: scope.clone(),
                from: previous.to_string(),
                to: mode.to_string(),
                expires_at: expires_at.clone(),
                reason: "request",
            },
        )?;
        Ok(ModeReply {
            scope,
            from: previous,
            to: mode,
            expires_at,
        })
    }

    fn pair_key(&self, from: &str, to: &str) -> anyhow::Result<PairKey> {
        match (self.compiled.env_id(from), self.compiled.env_id(to)) {
            (Some(s), Some(d)) => Ok(PairKey::new(s, d)),
            _ => anyhow::bail!("unknown env in {from}->{to}"),
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.global
            .iter()
            .chain(self.pairs.values())
            .filter_map(|o| o.expires.map(|(at, _)| at))
            .min()
    }

    /// Reverts every break-glass override whose time is up.
    fn expire(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let due = |o: &Override| o.expires.is_some_and(|(at, _)| at <= now);
        if self.global.as_ref().is_some_and(due) {
            let old = self.global.take().expect("checked");
            self.global = old.revert_to.map(|mode| Override {
                mode,
                expires: None,
                revert_to: None,
            });
            let to = self.global_mode(&self.policy);
            self.kernel.set_mode(mode_value(to))?;
            self.emit_expiry("global".to_owned(), old.mode, to)?;
        }
        let due_pairs: Vec<(String, String)> = self
            .pairs
            .iter()
            .filter(|(_, o)| due(o))
            .map(|(k, _)| k.clone())
            .collect();
        for (f, t) in due_pairs {
            let old = self.pairs.remove(&(f.clone(), t.clone())).expect("listed");
            if let Some(mode) = old.revert_to {
                self.pairs.insert(
                    (f.clone(), t.clone()),
                    Override {
                        mode,
                        expires: None,
                        revert_to: None,
                    },
                );
            }
            let (to, source) = self.pair_mode(&f, &t);
            let key = self.pair_key(&f, &t)?;
            // Back to the global mode: no entry; else the pair's own.
            let value = (source != "global").then_some(mode_value(to));
            self.kernel.set_pair_mode(key, value)?;
            self.emit_expiry(format!("{f}->{t}"), old.mode, to)?;
        }
        Ok(())
    }

    fn emit_expiry(&mut self, scope: String, from: Mode, to: Mode) -> anyhow::Result<()> {
        self.stream.emit(
            "mode_change",
            None,
            &ModeChange {
                actor: Actor::agent("envguard (break-glass expiry)"),
                scope,
                from: from.to_string(),
                to: to.to_string(),
                expires_at: None,
                reason: "expired",
            },
        )?;
        Ok(())
    }

    /// Reads, validates and swaps in the policy file. A bad file changes
    /// nothing: the old policy stays in force, and the error is reported.
    fn reload(&mut self, actor: Actor) -> anyhow::Result<serde_json::Value> {
        let loaded = Policy::load(&self.settings.policy)
            .map_err(anyhow::Error::from)
            .and_then(|p| {
                let c = compile_with_ids(&p, &self.compiled.env_names)?;
                Ok((p, c))
            });
        let (policy, compiled) = match loaded {
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
        let mut tracker = CgroupTracker::new(&self.mount, &compiled);
        let mode = mode_value(self.global_mode(&policy));
        let pairs = self.pair_modes(&compiled);
        self.kernel
            .apply_policy(&compiled, || tracker.rescan(), mode, &pairs)
            .context("writing the new policy into the kernel")?;
        // Overrides of pairs whose envs are gone have nothing left to act on.
        self.pairs
            .retain(|(f, t), _| compiled.env_id(f).is_some() && compiled.env_id(t).is_some());
        for (path, id) in tracker.known() {
            self.names.insert(id, path);
        }
        self.policy = policy;
        self.compiled = compiled;
        self.tracker = tracker;
        // Cgroups may have changed env: every socket is looked at again.
        self.holders.forget();
        self.holders_pass()?;
        self.emit_policy_loaded(Some(actor))?;
        Ok(serde_json::to_value(ReloadReply {
            revision: self.policy.revision.clone(),
        })?)
    }

    fn status(&mut self) -> anyhow::Result<serde_json::Value> {
        #[derive(Serialize, Default)]
        struct Pair {
            from: String,
            to: String,
            decision: &'static str,
            mode: String,
            mode_source: &'static str,
            allowed: u64,
            denied: u64,
            audited: u64,
        }
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
                let (mode, mode_source) = self.pair_mode(&from, &to);
                let c = counts.get(&(s, d)).copied().unwrap_or_default();
                pairs.push(Pair {
                    decision: pair_decision(&self.compiled, s, d, mode),
                    mode: mode.to_string(),
                    mode_source,
                    from,
                    to,
                    allowed: c[0],
                    denied: c[1],
                    audited: c[2],
                });
            }
        }
        let pending: Vec<serde_json::Value> = self
            .global
            .iter()
            .map(|o| ("global".to_owned(), o))
            .chain(self.pairs.iter().map(|((f, t), o)| (format!("{f}->{t}"), o)))
            .filter_map(|(scope, o)| {
                let (_, at) = o.expires?;
                Some(serde_json::json!({
                    "scope": scope,
                    "mode": o.mode.to_string(),
                    "reverts_to": o.revert_to.map_or_else(|| "policy".to_owned(), |m| m.to_string()),
                    "expires_at": events::rfc3339(at),
                }))
            })
            .collect();
        Ok(serde_json::json!({
            "since": events::rfc3339(self.since),
            "uptime_s": self.since.elapsed().map_or(0, |d| d.as_secs()),
            "pid": std::process::id(),
            "policy": self.settings.policy.display().to_string(),
            "revision": self.policy.revision,
            "mode": self.global_mode(&self.policy).to_string(),
            "mode_source": if self.global.is_some() { "runtime" } else { "policy" },
            "cgroup_root": self.root_rel,
            "hooks": loader::PROGRAMS,
            "pin_root": self.kernel.pin_root().display().to_string(),
            "adopted": self.kernel.adopted(),
            "envs": ids.iter().map(|&i| self.compiled.env_name(i)).collect::<Vec<_>>(),
            "pending_reverts": pending,
            "pairs": pairs,
            "control": self.gate.status(),
        }))
    }
}

/// The policy's decision for a pair in general: `allow` (every flow), `ports`
/// (some ports or protocols allowed, or some denied), `deny`, or `audit` (a
/// violation, let through in audit mode).
fn pair_decision(c: &Compiled, s: u32, d: u32, mode: Mode) -> &'static str {
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
        "deny"
    } else {
        "audit"
    };
    if deny_all {
        violation
    } else if allow_all && !deny_some {
        "allow"
    } else if allow_all || allow_some {
        "ports"
    } else {
        violation
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
