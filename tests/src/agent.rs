//! `Agent`: a running `envguard run`, its stdout JSON lines collected by a
//! reader thread, stopped with SIGTERM (SIGKILL after 5 s) on drop.
//!
//! Every agent gets a pin root (`--pin-root`, owned by the caller: see
//! [`crate::pin::PinRoot`]); SIGTERM leaves its enforcement in place unless
//! it runs with `--detach-on-exit`.
//!
//! Every line an agent prints is also checked against the event contract by
//! a validator thread: its record kind's JSON Schema in `docs/schemas` (with
//! [`crate::schema_check`]: schema, header order, no undocumented field),
//! one `boot_id`, and `seq` 0, 1, 2… without a gap unless the stream itself
//! reports `queue:stdout` losses. A breach fails the test that owns the
//! agent, naming the offending lines: [`Agent::stop`] asserts it, and so
//! does dropping the agent (unless the test is already panicking), so no
//! test can skip it — whether it stops, kills (a line a SIGKILL cut short is
//! forgiven) or just drops its agent.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::policy::Mode;
use crate::sys;

/// How long the agent may take to print `policy_loaded`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Stream {
    /// Every stdout line that parsed as a JSON object, in order.
    lines: Vec<Value>,
    /// The same lines as the agent wrote them (without the newline).
    raw: Vec<String>,
    /// When the reader got each of them.
    received_at: Vec<Instant>,
    /// Protocol errors: lines that are not JSON objects, non-increasing seq.
    bad: Vec<String>,
    last_seq: Option<u64>,
    eof: bool,
}

struct Shared {
    stream: Mutex<Stream>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How to run an agent, beyond its policy, cgroup root and pin root.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// `--detach-on-exit`: SIGTERM/SIGINT remove everything it made.
    pub detach_on_exit: bool,
    /// `--ringbuf-bytes N`.
    pub ringbuf_bytes: Option<u32>,
    /// `--flow-cache-entries N`.
    pub flow_cache_entries: Option<u32>,
    /// What `policy_loaded`'s `adopted` must say (`None`: any bool).
    pub expect_adopted: Option<bool>,
    /// `--dedup-interval`; `None` passes `0`: these tests count one record per
    /// violating attempt, which dedup would fold into rollups.
    pub dedup_interval: Option<String>,
    /// `--control-group GROUP`: the control socket becomes 0660 for it.
    pub control_group: Option<String>,
    /// `--control-socket PATH` (and the client commands get it too);
    /// `None`: the agent derives its socket from the pin root, and the
    /// client commands find it with `--pin-root`.
    pub control_socket: Option<PathBuf>,
    /// What `policy_loaded`'s `envs` must be; `None`: [`STANDARD_ENVS`]
    /// (the [`crate::Lab`] fills it in from its policy).
    ///
    /// [`STANDARD_ENVS`]: crate::policy::STANDARD_ENVS
    pub envs: Option<Vec<String>>,
    /// `--events-file PATH`.
    pub events_file: Option<PathBuf>,
    /// `--events-file-max-mb N`.
    pub events_file_max_mb: Option<u64>,
    /// `--events-file-backups N`.
    pub events_file_backups: Option<u32>,
    /// `--syslog TARGET` (`unix:/path` or `udp:127.0.0.1:PORT`).
    pub syslog: Option<String>,
    /// `--sink-queue N`.
    pub sink_queue: Option<usize>,
    /// `--metrics-listen ADDR` (`127.0.0.1:0`: a port the kernel picks,
    /// found with [`Agent::metrics_addr`]).
    pub metrics_listen: Option<String>,
    /// `--rate-limit PER_SEC`.
    pub rate_limit: Option<String>,
    /// `--rate-burst N`.
    pub rate_burst: Option<u32>,
    /// `--state-dir DIR` (the history `envguard report` reads).
    pub state_dir: Option<PathBuf>,
    /// `--history-interval DURATION`.
    pub history_interval: Option<String>,
    /// `--tc-attach HOW` (`clsact`: the fallback of kernels without tcx).
    pub tc_attach: Option<String>,
    /// The program to run instead of `envguard` (the harness's own tests
    /// use a stand-in that prints chosen lines); `None`:
    /// [`sys::envguard_bin`].
    pub binary: Option<PathBuf>,
}

impl AgentOptions {
    /// `--detach-on-exit` on a fresh pin root: what the tests that are not
    /// about the life cycle use, so that a stopped agent leaves nothing.
    pub fn ephemeral() -> Self {
        AgentOptions {
            detach_on_exit: true,
            expect_adopted: Some(false),
            ..Default::default()
        }
    }

    /// Enforcement that outlives the agent, on a fresh pin root.
    pub fn pinned() -> Self {
        AgentOptions {
            expect_adopted: Some(false),
            ..Default::default()
        }
    }

    /// Expect `adopted: true`: the pin root holds a previous agent's state.
    pub fn adopting(mut self) -> Self {
        self.expect_adopted = Some(true);
        self
    }

    pub fn ringbuf_bytes(mut self, n: u32) -> Self {
        self.ringbuf_bytes = Some(n);
        self
    }

    pub fn flow_cache_entries(mut self, n: u32) -> Self {
        self.flow_cache_entries = Some(n);
        self
    }

    /// `--dedup-interval`, e.g. "10s".
    pub fn dedup_interval(mut self, d: &str) -> Self {
        self.dedup_interval = Some(d.to_owned());
        self
    }

    /// `--control-group GROUP`.
    pub fn control_group(mut self, group: &str) -> Self {
        self.control_group = Some(group.to_owned());
        self
    }

    /// `--control-socket PATH`.
    pub fn control_socket(mut self, path: &Path) -> Self {
        self.control_socket = Some(path.to_owned());
        self
    }

    /// Runs `program` instead of `envguard` (see [`AgentOptions::binary`]).
    pub fn binary(mut self, program: &Path) -> Self {
        self.binary = Some(program.to_owned());
        self
    }

    /// `--events-file PATH`, with `--events-file-max-mb` and
    /// `--events-file-backups` when given.
    pub fn events_file(mut self, path: &Path, max_mb: Option<u64>, backups: Option<u32>) -> Self {
        self.events_file = Some(path.to_owned());
        self.events_file_max_mb = max_mb;
        self.events_file_backups = backups;
        self
    }

    /// `--syslog TARGET`.
    pub fn syslog(mut self, target: &str) -> Self {
        self.syslog = Some(target.to_owned());
        self
    }

    /// `--sink-queue N`.
    pub fn sink_queue(mut self, n: usize) -> Self {
        self.sink_queue = Some(n);
        self
    }

    /// `--metrics-listen ADDR`.
    pub fn metrics_listen(mut self, addr: &str) -> Self {
        self.metrics_listen = Some(addr.to_owned());
        self
    }

    /// `--state-dir DIR --history-interval INTERVAL`.
    pub fn history(mut self, dir: &Path, interval: &str) -> Self {
        self.state_dir = Some(dir.to_owned());
        self.history_interval = Some(interval.to_owned());
        self
    }

    /// `--rate-limit PER_SEC --rate-burst BURST`.
    pub fn rate_limit(mut self, per_sec: &str, burst: u32) -> Self {
        self.rate_limit = Some(per_sec.to_owned());
        self.rate_burst = Some(burst);
        self
    }

    /// The `envguard run` arguments after `--policy`/`--cgroup-root`.
    fn args(&self, pin_root: &Path) -> Vec<String> {
        let mut a = vec!["--pin-root".to_owned(), pin_root.display().to_string()];
        if self.detach_on_exit {
            a.push("--detach-on-exit".into());
        }
        if let Some(n) = self.ringbuf_bytes {
            a.extend(["--ringbuf-bytes".into(), n.to_string()]);
        }
        if let Some(n) = self.flow_cache_entries {
            a.extend(["--flow-cache-entries".into(), n.to_string()]);
        }
        let dedup = self.dedup_interval.clone().unwrap_or_else(|| "0".into());
        a.extend(["--dedup-interval".into(), dedup]);
        if let Some(g) = &self.control_group {
            a.extend(["--control-group".into(), g.clone()]);
        }
        if let Some(p) = &self.control_socket {
            a.extend(["--control-socket".into(), p.display().to_string()]);
        }
        if let Some(p) = &self.events_file {
            a.extend(["--events-file".into(), p.display().to_string()]);
        }
        if let Some(n) = self.events_file_max_mb {
            a.extend(["--events-file-max-mb".into(), n.to_string()]);
        }
        if let Some(n) = self.events_file_backups {
            a.extend(["--events-file-backups".into(), n.to_string()]);
        }
        if let Some(t) = &self.syslog {
            a.extend(["--syslog".into(), t.clone()]);
        }
        if let Some(n) = self.sink_queue {
            a.extend(["--sink-queue".into(), n.to_string()]);
        }
        if let Some(addr) = &self.metrics_listen {
            a.extend(["--metrics-listen".into(), addr.clone()]);
        }
        if let Some(r) = &self.rate_limit {
            a.extend(["--rate-limit".into(), r.clone()]);
        }
        if let Some(n) = self.rate_burst {
            a.extend(["--rate-burst".into(), n.to_string()]);
        }
        if let Some(d) = &self.state_dir {
            a.extend(["--state-dir".into(), d.display().to_string()]);
        }
        if let Some(i) = &self.history_interval {
            a.extend(["--history-interval".into(), i.clone()]);
        }
        if let Some(t) = &self.tc_attach {
            a.extend(["--tc-attach".into(), t.clone()]);
        }
        a
    }
}

/// A running agent. See the module docs.
pub struct Agent {
    child: Option<Child>,
    shared: Arc<Shared>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Checks every stdout line against its schema; returns the failures
    /// once the stdout reader is done.
    validator: Option<JoinHandle<Vec<SchemaFailure>>>,
    /// The agent was SIGKILLed: its last line may have been cut short.
    killed: bool,
    /// Its pid, for messages written after it was reaped.
    started_pid: u32,
    ready: Value,
    pin_root: PathBuf,
    /// `--control-socket` as given, if it was.
    explicit_socket: Option<PathBuf>,
    /// The control socket the agent listens on, found through /proc once
    /// it is ready; removed should the agent leave it behind.
    control_socket: Option<PathBuf>,
}

impl Agent {
    /// Starts `envguard run --policy POLICY --cgroup-root CGROUP_ROOT
    /// --pin-root PIN_ROOT [options]` and waits (at most [`READY_TIMEOUT`])
    /// for its first stdout line, which must be a well-formed
    /// `policy_loaded` for `mode` and this pin root.
    pub fn start(
        policy: &Path,
        cgroup_root: &str,
        mode: Mode,
        pin_root: &Path,
        opts: &AgentOptions,
    ) -> Agent {
        sys::ensure_bpffs();
        let bin = opts.binary.clone().unwrap_or_else(sys::envguard_bin);
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .args(opts.args(pin_root))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Should the test process die, the agent still detaches and exits.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} run: {e}", bin.display()));
        let child_pid = child.id();
        let shared = Arc::new(Shared {
            stream: Mutex::new(Stream::default()),
            cond: Condvar::new(),
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let mut readers = Vec::new();
        let (to_validate, validate_rx) = mpsc::channel();
        let validator = std::thread::spawn(move || validate(&validate_rx));
        {
            let shared = Arc::clone(&shared);
            readers.push(std::thread::spawn(move || {
                read_stdout(out, &shared, &to_validate)
            }));
        }
        {
            let stderr = Arc::clone(&stderr);
            readers.push(std::thread::spawn(move || read_stderr(err, &stderr)));
        }
        let mut agent = Agent {
            child: Some(child),
            shared,
            stderr,
            readers,
            validator: Some(validator),
            killed: false,
            started_pid: child_pid,
            ready: Value::Null,
            pin_root: pin_root.to_owned(),
            explicit_socket: opts.control_socket.clone(),
            control_socket: None,
        };
        let envs = opts.envs.clone().unwrap_or_else(|| {
            crate::policy::STANDARD_ENVS
                .iter()
                .map(|e| (*e).to_owned())
                .collect()
        });
        agent.await_ready(policy, mode, pin_root, opts.expect_adopted, &envs);
        // The socket is bound before `policy_loaded` is printed.
        let listening = crate::control::listening_unix_sockets(agent.pid());
        agent.control_socket = match &agent.explicit_socket {
            Some(want) => {
                assert!(
                    listening.contains(want),
                    "the agent must listen on the --control-socket it was given ({}); it listens on {listening:?}",
                    want.display()
                );
                Some(want.clone())
            }
            None => listening
                .iter()
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("control"))
                })
                .or(listening.first())
                .cloned(),
        };
        agent
    }

    fn await_ready(
        &mut self,
        policy: &Path,
        mode: Mode,
        pin_root: &Path,
        expect_adopted: Option<bool>,
        envs: &[String],
    ) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let first = {
            let mut s = self.shared.lock();
            loop {
                if let Some(first) = s.lines.first() {
                    break first.clone();
                }
                if s.eof {
                    drop(s);
                    // Reap it and forget it: its pid must never be signalled again.
                    let status = self.child.take().and_then(|mut c| c.wait().ok());
                    panic!(
                        "envguard run exited (status {status:?}) before printing policy_loaded; bad stdout lines: {:?}; stderr:\n{}",
                        self.shared.lock().bad,
                        self.stderr()
                    );
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let bad = s.bad.clone();
                    drop(s);
                    panic!(
                        "envguard run printed no policy_loaded line within {READY_TIMEOUT:?}; bad stdout lines: {bad:?}; stderr:\n{}",
                        self.stderr()
                    );
                }
                s = self
                    .shared
                    .cond
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let mut errs = Vec::new();
        let want = |errs: &mut Vec<String>, field: &str, got: &Value, exp: Value| {
            if *got != exp {
                errs.push(format!("{field}: expected {exp}, got {got}"));
            }
        };
        want(&mut errs, "kind", &first["kind"], "policy_loaded".into());
        want(&mut errs, "seq", &first["seq"], 0.into());
        want(&mut errs, "host", &first["host"], sys::hostname().into());
        want(
            &mut errs,
            "policy",
            &first["policy"],
            policy.display().to_string().into(),
        );
        want(&mut errs, "mode", &first["mode"], mode.name().into());
        want(&mut errs, "envs", &first["envs"], envs.to_vec().into());
        want(
            &mut errs,
            "pin_root",
            &first["pin_root"],
            pin_root.display().to_string().into(),
        );
        match (expect_adopted, &first["adopted"]) {
            (Some(exp), got) => want(&mut errs, "adopted", got, exp.into()),
            (None, Value::Bool(_)) => {}
            (None, got) => errs.push(format!("adopted: expected a bool, got {got}")),
        }
        if let Err(e) = crate::event::check_time(&first["time"]) {
            errs.push(format!("time: {e}"));
        }
        // The contract: `"revision":"sha256:<64 hex digits of the file>"`.
        match first["revision"]
            .as_str()
            .and_then(|r| r.strip_prefix("sha256:"))
        {
            Some(r) if r.len() == 64 && r.chars().all(|c| c.is_ascii_hexdigit()) => {}
            _ => errs.push(format!(
                "revision: expected sha256:<64 hex digits>, got {}",
                first["revision"]
            )),
        }
        assert!(
            errs.is_empty(),
            "malformed policy_loaded line {first}:\n  {}\nagent stderr:\n{}",
            errs.join("\n  "),
            self.stderr()
        );
        self.ready = first;
    }

    /// The `policy_loaded` line.
    pub fn ready_line(&self) -> &Value {
        &self.ready
    }

    /// The agent's pid (it has not been reaped while this exists).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The pin root it runs with.
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    /// The path of the control socket it listens on (read from /proc when
    /// it became ready). Panics if it listens on none.
    pub fn control_socket(&self) -> &Path {
        self.control_socket.as_deref().unwrap_or_else(|| {
            panic!(
                "agent {} listens on no unix socket (no control socket found through /proc/{}/fd and /proc/net/unix)",
                self.pid(),
                self.pid()
            )
        })
    }

    /// How the client commands find this agent: `--control-socket PATH` if
    /// it was started with one, else `--pin-root DIR` (the agent derives
    /// its socket from its pin root, and so does the client).
    pub fn client_args(&self) -> Vec<String> {
        match &self.explicit_socket {
            Some(p) => vec!["--control-socket".into(), p.display().to_string()],
            None => vec!["--pin-root".into(), self.pin_root.display().to_string()],
        }
    }

    /// Runs `envguard ARGS... <client_args>` against this agent, as root
    /// or, with `creds`, as another user (see [`crate::control::Creds`]).
    pub fn cli(
        &self,
        args: &[&str],
        creds: Option<&crate::control::Creds>,
    ) -> crate::control::CliRun {
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(self.client_args());
        crate::control::run_cli(&all, creds)
    }

    /// `envguard status --json`'s result; panics with the command's output
    /// if it fails.
    pub fn status(&self) -> Value {
        let r = self.cli(&["status", "--json"], None);
        r.assert_ok("envguard status --json");
        r.json()
    }

    /// The agent's resident set size (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::control::vm_rss_kib(self.pid())
    }

    /// SIGSTOP: the agent stops reading events (the kernel keeps enforcing).
    pub fn pause(&self) {
        sys::signal(self.pid(), libc::SIGSTOP);
    }

    /// SIGCONT after [`Agent::pause`].
    pub fn resume(&self) {
        sys::signal(self.pid(), libc::SIGCONT);
    }

    /// SIGKILL: the agent gets no chance to clean up. Returns once it is
    /// reaped and its output is read to the end.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            self.killed = true;
            let _ = child.kill();
            let _ = child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.remove_stale_socket();
        // Dropping it now checks what it printed (see the module docs).
    }

    /// SIGHUP: the agent reopens its events file and reloads its policy.
    pub fn sighup(&self) {
        sys::signal(self.pid(), libc::SIGHUP);
    }

    /// The address `--metrics-listen` made the agent listen on (the
    /// kernel's choice for port 0), read from /proc. Panics if it listens
    /// on no TCP socket.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let found = crate::sinks::listening_tcp(self.pid());
        match found.as_slice() {
            [one] => *one,
            other => panic!(
                "agent {} must listen on exactly one TCP socket (its --metrics-listen); it listens on {other:?}",
                self.pid()
            ),
        }
    }

    /// Once the agent is gone: removes the control socket it left behind
    /// (a SIGKILLed agent cannot remove it; the next one would).
    fn remove_stale_socket(&mut self) {
        if let Some(p) = self.control_socket.take()
            && p.exists()
            && let Err(e) = std::fs::remove_file(&p)
        {
            eprintln!(
                "envguard-tests: cleanup: cannot remove the stale control socket {}: {e}",
                p.display()
            );
        }
    }

    /// Number of stdout lines received so far (`policy_loaded` included).
    pub fn len(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// Always false once started (`policy_loaded` was received).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the lines `range` (clamped to what was received).
    pub fn lines(&self, range: std::ops::Range<usize>) -> Vec<Value> {
        let s = self.shared.lock();
        let end = range.end.min(s.lines.len());
        s.lines[range.start.min(end)..end].to_vec()
    }

    /// When the reader received line `i` (`None` if it has not yet).
    pub fn received_at(&self, i: usize) -> Option<Instant> {
        self.shared.lock().received_at.get(i).copied()
    }

    /// The lines `range` exactly as the agent wrote them (without their
    /// newline), index for index with [`Agent::lines`].
    pub fn raw_lines(&self, range: std::ops::Range<usize>) -> Vec<String> {
        let s = self.shared.lock();
        let end = range.end.min(s.raw.len());
        s.raw[range.start.min(end)..end].to_vec()
    }

    /// Everything the agent wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (at most `timeout`) for the first line matching `pred` and
    /// returns its index and the line. Panics naming `what`, with every line
    /// received and the agent's stderr, if none appears.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        let mut scanned = 0;
        loop {
            if let Some(i) = s.lines[scanned..].iter().position(&pred) {
                return (scanned + i, s.lines[scanned + i].clone());
            }
            scanned = s.lines.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.eof {
                let dump = dump_lines(&s.lines);
                let bad = s.bad.clone();
                let why = if s.eof {
                    "the agent closed its stdout"
                } else {
                    "timed out"
                };
                drop(s);
                panic!(
                    "no agent event for {what} ({why} after {timeout:?}); lines received:\n{dump}\nbad lines: {bad:?}\nagent stderr:\n{}",
                    self.stderr()
                );
            }
            s = self
                .shared
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits (at most `timeout`) until `pred` holds for the lines received
    /// so far and returns them; if it never does, returns `Err` with them
    /// (the caller's assertion then says what was expected).
    pub fn wait_lines(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if pred(&s.lines) {
                return Ok(s.lines.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.eof {
                return Err(s.lines.clone());
            }
            s = self
                .shared
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops the agent with SIGTERM and asserts the contract of a clean
    /// stop: exit status 0 within [`STOP_TIMEOUT`], and every stdout line a
    /// JSON object with increasing `seq`.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// [`Agent::stop`], returning every line the agent printed, up to its
    /// exit (what it reports while stopping included).
    pub fn stop_collect(self) -> Vec<Value> {
        let shared = Arc::clone(&self.shared);
        self.stop();
        shared.lock().lines.clone()
    }

    /// [`Agent::stop`], returning every line the agent printed as it wrote
    /// it (without the newline), and parsed.
    pub fn stop_collect_raw(self) -> (Vec<String>, Vec<Value>) {
        let shared = Arc::clone(&self.shared);
        self.stop();
        let s = shared.lock();
        (s.raw.clone(), s.lines.clone())
    }

    /// [`Agent::stop`] with another signal (SIGINT must behave the same).
    pub fn stop_with(mut self, sig: libc::c_int) {
        let status = self.terminate(sig);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let left = self.control_socket.clone().filter(|p| p.exists());
        self.remove_stale_socket();
        let bad = self.shared.lock().bad.clone();
        match status {
            Some(st) if st.success() => {}
            other => panic!(
                "envguard run did not exit 0 within {STOP_TIMEOUT:?} of signal {sig} (status {other:?}); stderr:\n{}",
                self.stderr()
            ),
        }
        assert!(
            bad.is_empty(),
            "envguard run wrote malformed stdout lines: {bad:#?}"
        );
        assert!(
            left.is_none(),
            "envguard run exited 0 after signal {sig} but left its control socket {left:?} behind"
        );
        self.assert_contract();
    }

    /// Once the stdout reader is done: panics, naming the offending lines,
    /// if any line broke the event contract (see the module docs). Checks
    /// only once.
    fn assert_contract(&mut self) {
        let Some(validator) = self.validator.take() else {
            return;
        };
        let failures = validator.join().unwrap_or_else(|_| {
            vec![SchemaFailure {
                index: 0,
                complete: true,
                error: "the schema validator thread panicked".into(),
            }]
        });
        let mut errs: Vec<String> = failures
            .iter()
            // A SIGKILL may cut the last line short; nothing else may.
            .filter(|f| f.complete || !self.killed)
            .map(|f| format!("stdout line {}: {}", f.index, f.error))
            .collect();
        errs.extend(seq_errors(&self.shared.lock().lines));
        if errs.is_empty() {
            return;
        }
        let n = errs.len();
        errs.truncate(20);
        panic!(
            "envguard run (pid {}) printed {n} record(s) that break the event contract \
             (docs/schemas/<kind>.schema.json, one boot_id, gapless seq); the first ones:\n  {}",
            self.started_pid,
            errs.join("\n  ")
        );
    }

    /// `sig` (SIGCONT too, should it be paused), wait up to STOP_TIMEOUT,
    /// then SIGKILL. Returns the exit status if it exited by itself.
    fn terminate(&mut self, sig: libc::c_int) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        sys::signal(child.id(), sig);
        sys::signal(child.id(), libc::SIGCONT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    eprintln!(
                        "envguard-tests: agent {} ignored signal {sig} for {STOP_TIMEOUT:?}; killing it",
                        child.id()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
                Err(e) => {
                    eprintln!("envguard-tests: waiting for agent {}: {e}", child.id());
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            match self.terminate(libc::SIGTERM) {
                Some(st) if st.success() => {}
                other => eprintln!("envguard-tests: cleanup: agent stopped with status {other:?}"),
            }
        }
        self.remove_stale_socket();
        // The agent is gone, so its stdout ends and the readers with it.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        // A test that never stopped its agent explicitly still answers for
        // what the agent printed; one that is already failing says why.
        if !std::thread::panicking() {
            self.assert_contract();
        }
    }
}

/// A line that failed [`crate::schema_check::validate_line`].
struct SchemaFailure {
    /// Its index among the stdout lines (0: `policy_loaded`).
    index: usize,
    /// Whether it ended with a newline.
    complete: bool,
    error: String,
}

/// The validator thread: checks each line it is sent until the reader is done.
fn validate(lines: &mpsc::Receiver<(usize, String, bool)>) -> Vec<SchemaFailure> {
    let mut failures = Vec::new();
    for (index, line, complete) in lines {
        if let Err(error) = crate::schema_check::validate_line(&line) {
            failures.push(SchemaFailure {
                index,
                complete,
                error,
            });
        }
    }
    failures
}

/// One `boot_id` for every record, and `seq` equal to the line's index —
/// unless the stream reports that stdout itself lost records
/// (`lost_events` from `queue:stdout`), which leaves gaps by design.
fn seq_errors(lines: &[Value]) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(boot_id) = lines.first().map(|l| &l["boot_id"]) else {
        return errs;
    };
    let stdout_lost = lines
        .iter()
        .any(|l| l["kind"] == "lost_events" && l["source"] == "queue:stdout");
    for (i, l) in lines.iter().enumerate() {
        if l["boot_id"] != *boot_id {
            errs.push(format!(
                "stdout line {i}: boot_id {} differs from the first record's {boot_id}: {l}",
                l["boot_id"]
            ));
        }
        if !stdout_lost && l["seq"] != i {
            errs.push(format!(
                "stdout line {i}: seq {} where {i} was due (a gap, and no queue:stdout loss reported): {l}",
                l["seq"]
            ));
        }
    }
    errs
}

fn read_stdout(out: impl Read, shared: &Shared, to_validate: &mpsc::Sender<(usize, String, bool)>) {
    let mut reader = BufReader::new(out);
    let mut buf = Vec::new();
    let mut index = 0;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let complete = buf.last() == Some(&b'\n');
        if complete {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf).into_owned();
        let _ = to_validate.send((index, line.clone(), complete));
        index += 1;
        let mut s = shared.lock();
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => {
                match v["seq"].as_u64() {
                    Some(seq) if s.last_seq.is_none_or(|last| seq > last) => s.last_seq = Some(seq),
                    _ => {
                        let msg = format!("seq not increasing after {:?}: {line}", s.last_seq);
                        s.bad.push(msg);
                    }
                }
                s.lines.push(v);
                s.raw.push(line);
                s.received_at.push(Instant::now());
            }
            _ => s.bad.push(line),
        }
        shared.cond.notify_all();
    }
    shared.lock().eof = true;
    shared.cond.notify_all();
}

fn read_stderr(err: impl Read, buf: &Mutex<String>) {
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
        b.push_str(&line);
        b.push('\n');
    }
}

/// One line per event, numbered, for failure messages.
pub fn dump_lines(lines: &[Value]) -> String {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("  [{i}] {l}\n"))
        .collect()
}
