//! Event sinks: where the JSON lines go (stdout, a rotated file, syslog), several
//! at once. The caller never waits for any of them.
//!
//! [`Fanout`] runs one OS thread per sink, each fed by its own bounded queue.
//! [`Fanout::send`] only tries to queue the line for each sink: a sink whose
//! queue is full (it is slow, or stuck) loses that line, and the loss is
//! counted for that sink alone; the other sinks and the caller go on. A line
//! the sink thread could not write (a write error, a syslog daemon that is not
//! listening) is counted the same way. [`Fanout::take_dropped`] hands the
//! counts to the caller, which reports them as
//! `{"kind":"lost_events","source":"queue:<sink>","count":N}` and in the
//! `envguard_events_lost_total{source="queue:<sink>"}` metric: a line is either
//! delivered to a sink or counted as lost for it, never silently gone.
//!
//! Lines travel in batches ([`Lines`]): one queue operation and at most one
//! wake-up of each sink thread per batch, not per line, which is what a flood
//! of violations costs the agent otherwise. A sink's queue is still bounded
//! in lines, and a batch that does not fit is cut at the bound, the rest
//! counted lost line by line.
//!
//! Sink names: `stdout`, `file`, `syslog`; a second sink of the same kind is
//! `file-2`, and so on.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::error::Error;

mod file;
mod stdout;
mod syslog;

pub use syslog::{FACILITY, MAX_MESSAGE_BYTES};

/// How long [`Fanout::flush_and_close`] waits for the sinks to write out
/// what is queued.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines a sink thread takes from its queue before it flushes its buffer.
const MAX_BATCH: usize = 1024;

/// How often an idle sink thread looks for a reopen request.
const IDLE_TICK: Duration = Duration::from_millis(200);

/// One sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// Standard output (the default).
    Stdout,
    /// A file, appended to, created mode 0640. When the next line would take
    /// it past `max_bytes`, it is rotated: `path` becomes `path.1`, `path.1`
    /// becomes `path.2`, … up to `path.<backups>`; the oldest is dropped
    /// (`backups` 0: the file is simply started anew). `max_bytes` 0: never
    /// rotated. A single line longer than `max_bytes` gets a file of its own.
    File {
        path: PathBuf,
        max_bytes: u64,
        backups: u32,
    },
    /// Syslog, RFC 5424, one datagram per record with the JSON record as
    /// MSG: facility daemon, severity warning for violations, notice for the
    /// rest; see `sinks/syslog.rs` for the format and [`MAX_MESSAGE_BYTES`].
    Syslog {
        target: SyslogTarget,
        app_name: String,
    },
}

/// Where syslog datagrams go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// A unix datagram socket, `/dev/log` by default.
    Unix(PathBuf),
    /// UDP, e.g. `127.0.0.1:514`.
    Udp(SocketAddr),
}

impl Default for SyslogTarget {
    fn default() -> Self {
        SyslogTarget::Unix(PathBuf::from("/dev/log"))
    }
}

impl SinkConfig {
    fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Stdout => "stdout",
            SinkConfig::File { .. } => "file",
            SinkConfig::Syslog { .. } => "syslog",
        }
    }
}

/// What a sink thread drives. `push` may buffer; `flush` writes the buffer
/// out. Both return how many lines were lost (not written, and never will be).
trait Sink: Send {
    fn push(&mut self, line: &str) -> u64;
    fn flush(&mut self) -> u64;
    /// Reopens the output (a file sink after logrotate moved its file);
    /// returns how many buffered lines could not be written before.
    fn reopen(&mut self) -> u64 {
        0
    }
}

/// Lines in one buffer, handed to every sink at once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lines {
    buf: String,
    /// End offset of each line in `buf`.
    ends: Vec<usize>,
}

impl Lines {
    pub fn with_capacity(lines: usize, bytes: usize) -> Self {
        Self {
            buf: String::with_capacity(bytes),
            ends: Vec::with_capacity(lines),
        }
    }

    /// Appends one line (without its newline).
    pub fn push(&mut self, line: &str) {
        self.buf.push_str(line);
        self.ends.push(self.buf.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The first `n` lines.
    pub fn iter(&self, n: usize) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends[..n.min(self.ends.len())].iter().map(move |&end| {
            let line = &self.buf[start..end];
            start = end;
            line
        })
    }

    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.iter(self.len())
    }
}

/// What a sink's queue carries: a batch, and how many of its lines (a
/// prefix) are this sink's, the rest having overflowed its queue.
type Item = (Arc<Lines>, usize);

/// Counters shared between the caller's side and one sink thread.
#[derive(Default)]
struct Shared {
    /// Lost since the last `take_dropped`.
    dropped: AtomicU64,
    /// Lines queued.
    queued: AtomicU64,
    /// Lines the thread has taken off its queue (being written, or done).
    taken: AtomicU64,
    /// Lines the thread has finished with (written out, or counted lost).
    done: AtomicU64,
    reopen: AtomicBool,
}

struct Handle {
    name: String,
    tx: SyncSender<Item>,
    /// How many lines its queue holds.
    capacity: u64,
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

/// Sends each line to every sink without ever blocking; see the module docs.
pub struct Fanout {
    sinks: Vec<Handle>,
}

impl Fanout {
    /// Opens every sink and starts its thread. Each sink's queue holds
    /// `queue_len` lines (at least 1). Fails if a file cannot be opened or a
    /// socket made; a syslog receiver that is not listening yet is not an
    /// error (its lines count as lost until it is; the sink retries).
    pub fn new(configs: Vec<SinkConfig>, queue_len: usize) -> Result<Fanout, Error> {
        let mut sinks: Vec<(String, Box<dyn Sink>)> = Vec::new();
        for config in configs {
            let kind = config.kind();
            let n = sinks
                .iter()
                .filter(|(name, _)| name == kind || name.starts_with(&format!("{kind}-")))
                .count();
            let name = if n == 0 {
                kind.to_owned()
            } else {
                format!("{kind}-{}", n + 1)
            };
            let sink: Box<dyn Sink> = match config {
                SinkConfig::Stdout => Box::new(stdout::StdoutSink::new()),
                SinkConfig::File {
                    path,
                    max_bytes,
                    backups,
                } => Box::new(file::FileSink::open(path, max_bytes, backups)?),
                SinkConfig::Syslog { target, app_name } => {
                    Box::new(syslog::SyslogSink::new(target, &app_name)?)
                }
            };
            sinks.push((name, sink));
        }
        Fanout::with_sinks(sinks, queue_len)
    }

    fn with_sinks(sinks: Vec<(String, Box<dyn Sink>)>, queue_len: usize) -> Result<Fanout, Error> {
        let mut handles = Vec::with_capacity(sinks.len());
        for (name, sink) in sinks {
            // Every item carries at least one line, and the lines queued
            // are bounded by `capacity`: the channel itself never fills.
            let (tx, rx) = mpsc::sync_channel::<Item>(queue_len.max(1));
            let shared = Arc::new(Shared::default());
            let thread = std::thread::Builder::new()
                .name(format!("sink-{name}"))
                .spawn({
                    let shared = shared.clone();
                    move || run(sink, &rx, &shared)
                })
                .map_err(|source| Error::Io {
                    context: format!("starting the thread of event sink {name}"),
                    source,
                })?;
            handles.push(Handle {
                name,
                tx,
                capacity: queue_len.max(1) as u64,
                shared,
                thread,
            });
        }
        Ok(Fanout { sinks: handles })
    }

    /// The sinks' names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|h| h.name.as_str())
    }

    /// Queues one line (without its newline) for every sink. Never blocks: a
    /// sink whose queue is full, or whose thread is gone, loses the line and
    /// counts it.
    pub fn send(&self, line: &str) {
        let mut one = Lines::with_capacity(1, line.len());
        one.push(line);
        self.send_lines(one);
    }

    /// Queues a batch of lines for every sink, in order. Never blocks: the
    /// lines that do not fit in a sink's queue are lost for that sink and
    /// counted.
    pub fn send_lines(&self, lines: Lines) {
        if lines.is_empty() {
            return;
        }
        let total = lines.len() as u64;
        let lines = Arc::new(lines);
        for h in &self.sinks {
            // Only this thread adds to `queued`; the sink's thread may take
            // more meanwhile, which only means the bound is met early.
            let waiting =
                h.shared.queued.load(Ordering::Relaxed) - h.shared.taken.load(Ordering::Acquire);
            let fits = total.min(h.capacity.saturating_sub(waiting));
            let mut lost = total - fits;
            if fits > 0 {
                // Counted before the thread can take them, so `taken` never
                // runs ahead of `queued`.
                h.shared.queued.fetch_add(fits, Ordering::Relaxed);
                if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                    h.tx.try_send((lines.clone(), fits as usize))
                {
                    h.shared.queued.fetch_sub(fits, Ordering::Relaxed);
                    lost = total;
                }
            }
            if lost > 0 {
                h.shared.dropped.fetch_add(lost, Ordering::Relaxed);
            }
        }
    }

    /// Lines lost per sink since the previous call, as
    /// `("queue:<sink name>", count)`; sinks that lost nothing are left out.
    pub fn take_dropped(&self) -> Vec<(String, u64)> {
        self.sinks
            .iter()
            .filter_map(|h| {
                let n = h.shared.dropped.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (format!("queue:{}", h.name), n))
            })
            .collect()
    }

    /// Asks every file sink to reopen its file (after logrotate moved it;
    /// call it on SIGHUP). The sink writes out what it has buffered to the
    /// old file, then opens the path anew before its next line.
    pub fn reopen(&self) {
        for h in &self.sinks {
            h.shared.reopen.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until every line queued so far has been written out or counted
    /// lost, at most `timeout`. Returns whether that happened in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.sinks.iter().any(|h| {
                h.shared.done.load(Ordering::Acquire) < h.shared.queued.load(Ordering::Relaxed)
                    && !h.thread.is_finished()
            });
            if !pending {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Shutdown: closes the queues and lets each sink write out what they
    /// hold, waiting at most [`CLOSE_TIMEOUT`] in all. A sink still stuck
    /// then (a blocked syslog socket) is abandoned with a warning in the log.
    pub fn flush_and_close(self) {
        self.close_within(CLOSE_TIMEOUT);
    }

    /// [`flush_and_close`](Self::flush_and_close) with another bound; returns
    /// whether every sink finished in time.
    pub fn close_within(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut all = true;
        for h in self.sinks {
            drop(h.tx);
            while !h.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.thread.is_finished() {
                let _ = h.thread.join();
            } else {
                all = false;
                let left =
                    h.shared.queued.load(Ordering::Relaxed) - h.shared.done.load(Ordering::Acquire);
                log::warn!(
                    "event sink {} did not finish within {timeout:?}; up to {left} queued records are lost",
                    h.name
                );
            }
        }
        all
    }
}

/// A sink thread: takes batches from the queue (what is there, until
/// `MAX_BATCH` lines), hands their lines to the sink, flushes when the queue
/// is empty.
fn run(mut sink: Box<dyn Sink>, rx: &mpsc::Receiver<Item>, shared: &Shared) {
    loop {
        let first = match rx.recv_timeout(IDLE_TICK) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                if shared.reopen.swap(false, Ordering::Relaxed) {
                    sink.reopen();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut lost = 0;
        if shared.reopen.swap(false, Ordering::Relaxed) {
            lost += sink.reopen();
        }
        let mut n: u64 = 0;
        let mut next = Some(first);
        while let Some((lines, count)) = next.take() {
            shared.taken.fetch_add(count as u64, Ordering::Release);
            for line in lines.iter(count) {
                lost += sink.push(line);
            }
            n += count as u64;
            if n < MAX_BATCH as u64 {
                next = rx.try_recv().ok();
            }
        }
        lost += sink.flush();
        if lost > 0 {
            shared.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        shared.done.fetch_add(n, Ordering::Release);
    }
    let lost = sink.flush();
    if lost > 0 {
        shared.dropped.fetch_add(lost, Ordering::Relaxed);
    }
}

/// Logs a sink's failure once until it recovers, instead of once per line.
struct Warned {
    what: String,
    failing: bool,
}

impl Warned {
    fn new(what: String) -> Warned {
        Warned {
            what,
            failing: false,
        }
    }

    fn fail(&mut self, e: &dyn std::fmt::Display) {
        if !self.failing {
            log::warn!(
                "event sink {}: {e}; its records are counted as lost until it recovers",
                self.what
            );
            self.failing = true;
        }
    }

    fn ok(&mut self) {
        if self.failing {
            log::info!("event sink {} works again", self.what);
            self.failing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, mpsc::Sender};

    use super::*;

    /// Collects lines in memory.
    struct Memory(Arc<Mutex<Vec<String>>>);
    impl Sink for Memory {
        fn push(&mut self, line: &str) -> u64 {
            self.0.lock().unwrap().push(line.to_owned());
            0
        }
        fn flush(&mut self) -> u64 {
            0
        }
    }

    /// Blocks on its first line until released; says when it is blocked.
    struct Stuck {
        blocked: Sender<()>,
        release: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<String>>>,
        first: bool,
    }
    impl Sink for Stuck {
        fn push(&mut self, line: &str) -> u64 {
            if self.first {
                self.first = false;
                self.blocked.send(()).unwrap();
                self.release.recv().unwrap();
            }
            self.got.lock().unwrap().push(line.to_owned());
            0
        }
        fn flush(&mut self) -> u64 {
            0
        }
    }

    /// Loses every line.
    struct Dead;
    impl Sink for Dead {
        fn push(&mut self, _: &str) -> u64 {
            1
        }
        fn flush(&mut self) -> u64 {
            0
        }
    }

    /// A memory sink and a sink stuck on its first line, fanned out to.
    struct StuckPair {
        fanout: Fanout,
        fast: Arc<Mutex<Vec<String>>>,
        stuck_got: Arc<Mutex<Vec<String>>>,
        /// Says when the stuck sink hangs on its first line.
        blocked_rx: mpsc::Receiver<()>,
        /// Lets it go on.
        release_tx: Sender<()>,
    }

    impl StuckPair {
        fn new(queue: usize) -> Self {
            let fast = Arc::new(Mutex::new(Vec::new()));
            let stuck_got = Arc::new(Mutex::new(Vec::new()));
            let (blocked_tx, blocked_rx) = mpsc::channel();
            let (release_tx, release_rx) = mpsc::channel();
            let fanout = Fanout::with_sinks(
                vec![
                    ("memory".to_owned(), Box::new(Memory(fast.clone()))),
                    (
                        "stuck".to_owned(),
                        Box::new(Stuck {
                            blocked: blocked_tx,
                            release: release_rx,
                            got: stuck_got.clone(),
                            first: true,
                        }),
                    ),
                ],
                queue,
            )
            .unwrap();
            Self {
                fanout,
                fast,
                stuck_got,
                blocked_rx,
                release_tx,
            }
        }
    }

    #[test]
    fn a_stuck_sink_loses_exactly_what_overflows_its_queue_and_nobody_waits() {
        const QUEUE: usize = 8;
        const MORE: usize = 100;
        let StuckPair {
            fanout,
            fast,
            stuck_got,
            blocked_rx,
            release_tx,
        } = StuckPair::new(QUEUE);
        fanout.send("line 0");
        // The stuck sink has taken line 0 off its queue and hangs on it.
        blocked_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let memory = &fanout.sinks[0].shared;
        for i in 1..=MORE {
            let start = Instant::now();
            fanout.send(&format!("line {i}"));
            assert!(
                start.elapsed() < Duration::from_millis(100),
                "send blocked: {:?}",
                start.elapsed()
            );
            // Pace the sender to the fast sink, whose queue then never fills.
            while memory.done.load(Ordering::Acquire) < memory.queued.load(Ordering::Relaxed) {
                std::thread::yield_now();
            }
        }
        assert!(!fanout.flush(Duration::from_millis(10)));
        // Its queue holds QUEUE lines; the rest are lost, counted exactly.
        let dropped = fanout.take_dropped();
        assert_eq!(dropped, [("queue:stuck".to_owned(), (MORE - QUEUE) as u64)]);
        assert_eq!(fanout.take_dropped(), []);
        release_tx.send(()).unwrap();
        assert!(fanout.flush(Duration::from_secs(10)));
        assert_eq!(fanout.take_dropped(), []);
        let want: Vec<String> = (0..=MORE).map(|i| format!("line {i}")).collect();
        assert_eq!(*fast.lock().unwrap(), want);
        let want_stuck: Vec<String> = (0..=QUEUE).map(|i| format!("line {i}")).collect();
        assert_eq!(*stuck_got.lock().unwrap(), want_stuck);
        assert!(fanout.close_within(Duration::from_secs(10)));
    }

    #[test]
    fn a_batch_is_cut_at_the_queue_bound_and_the_rest_counted() {
        const QUEUE: usize = 8;
        let StuckPair {
            fanout,
            fast,
            stuck_got,
            blocked_rx,
            release_tx,
        } = StuckPair::new(QUEUE);
        fanout.send("line 0");
        blocked_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut lines = Lines::default();
        for i in 1..=5 {
            lines.push(&format!("line {i}"));
        }
        fanout.send_lines(lines);
        // Pace the sender to the fast sink, whose queue then never fills.
        let memory = &fanout.sinks[0].shared;
        while memory.done.load(Ordering::Acquire) < memory.queued.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        // The second batch fits only in part: 3 of its 5 lines.
        let mut more = Lines::default();
        for i in 6..=10 {
            more.push(&format!("line {i}"));
        }
        fanout.send_lines(more);
        // Counted as the batch is handed over, not later.
        assert_eq!(fanout.take_dropped(), [("queue:stuck".to_owned(), 2)]);
        release_tx.send(()).unwrap();
        assert!(fanout.flush(Duration::from_secs(10)));
        let want: Vec<String> = (0..=10).map(|i| format!("line {i}")).collect();
        assert_eq!(*fast.lock().unwrap(), want);
        let want_stuck: Vec<String> = (0..=QUEUE).map(|i| format!("line {i}")).collect();
        assert_eq!(*stuck_got.lock().unwrap(), want_stuck);
        assert!(fanout.close_within(Duration::from_secs(10)));
    }

    #[test]
    fn a_dead_sink_counts_every_line() {
        let fanout = Fanout::with_sinks(vec![("dead".to_owned(), Box::new(Dead))], 4).unwrap();
        let mut total = 0;
        for i in 0..1000 {
            fanout.send(&format!("{i}"));
            if i % 100 == 0 {
                total += fanout.take_dropped().iter().map(|(_, n)| n).sum::<u64>();
            }
        }
        assert!(fanout.flush(Duration::from_secs(10)));
        total += fanout.take_dropped().iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!(total, 1000);
        fanout.flush_and_close();
    }

    #[test]
    fn names_are_unique() {
        let dir = tempdir();
        let fanout = Fanout::new(
            vec![
                SinkConfig::File {
                    path: dir.join("a"),
                    max_bytes: 0,
                    backups: 0,
                },
                SinkConfig::Stdout,
                SinkConfig::File {
                    path: dir.join("b"),
                    max_bytes: 0,
                    backups: 0,
                },
                SinkConfig::File {
                    path: dir.join("c"),
                    max_bytes: 0,
                    backups: 0,
                },
            ],
            4,
        )
        .unwrap();
        assert_eq!(
            fanout.names().collect::<Vec<_>>(),
            ["file", "stdout", "file-2", "file-3"]
        );
        fanout.flush_and_close();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unopenable_file_is_an_error() {
        let err = Fanout::new(
            vec![SinkConfig::File {
                path: "/nonexistent-dir/envguard/events.log".into(),
                max_bytes: 0,
                backups: 0,
            }],
            4,
        )
        .err()
        .expect("must fail");
        assert!(
            err.to_string()
                .contains("/nonexistent-dir/envguard/events.log"),
            "{err}"
        );
    }

    /// A fresh directory under the target's temp dir, removed by the test.
    pub(super) fn tempdir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "envguard-sinks-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
