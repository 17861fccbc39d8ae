//! Prometheus metrics: the text exposition format 0.0.4, served over a
//! minimal HTTP/1.1 server on `--metrics-listen ADDR` (off by default).
//!
//! The metric names and labels are a contract, like the event fields:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `envguard_decisions_total` | counter | `src_env`, `dst_env`, `verdict`, `mode`, `direction`, `proto` | decisions counted in the kernel, exact whatever happens to events |
//! | `envguard_events_emitted_total` | counter | `kind` | records written to the event stream |
//! | `envguard_events_lost_total` | counter | `source` (`ringbuf`, `queue:<sink>`) | records that could not be delivered |
//! | `envguard_events_suppressed_total` | counter | | records held back by the rate limit |
//! | `envguard_probe_events_total` | counter | `kind` | records caused by `envguard verify` probes (marked `"probe"`; also in `envguard_events_emitted_total`) |
//! | `envguard_control_refused_total` | counter | `reason` (`root`, `others`, `per_uid`, `subscribers`, `subscribers_per_uid`) | control-socket connections and `events` subscriptions refused over a limit |
//! | `envguard_policy_revision` | gauge | | generation of the policy in force: 1 at start, +1 per reload |
//! | `envguard_build_info` | gauge | `version` | always 1 |
//! | `envguard_heartbeat_timestamp_seconds` | gauge | | Unix time of the agent's last housekeeping tick (once a second; stale means a stuck agent even if the endpoint answers) |
//! | `process_resident_memory_bytes` | gauge | | the agent's RSS |
//! | `process_cpu_seconds_total` | counter | | user + system CPU time |
//! | `process_start_time_seconds` | gauge | | since the Unix epoch |
//! | `process_open_fds` | gauge | | open file descriptors |
//!
//! The server answers `GET /metrics` with 200 and
//! `Content-Type: text/plain; version=0.0.4; charset=utf-8`, anything else
//! with 404 (400 for what is not HTTP/1.x, 431 for a request head over
//! 8 KiB). It closes every connection after one response. A request head must
//! arrive within 5 s and the response be taken within 5 s; at most 16
//! connections are served at once, more are closed at once: a hostile or
//! stuck client costs a socket for a few seconds, nothing more.
//!
//! Kept hand-written (issue 13, item 5), both halves:
//! - Exposition: `prometheus-client` encodes OpenMetrics (`# EOF`, its own
//!   `_total`/`# TYPE` naming, `application/openmetrics-text`), not the 0.0.4
//!   text with the exact names, content type and promtool check the metrics
//!   tests hold; and its counters only go up by increments, while every value
//!   here is an absolute read of a kernel counter or a daemon total, so a
//!   custom collector would keep the rendering code anyway. The `prometheus`
//!   crate would keep 0.0.4 but has the same counter model and brings
//!   `procfs` for the `process_*` metrics that take 90 lines here.
//! - Server: one route, one response per connection. hyper (with
//!   hyper-util, http, http-body, httparse, tower for the connection limit;
//!   more with axum) is a dependency tree in a root daemon to replace ~150
//!   lines, and the hostile-client bounds the unit tests check (400 for
//!   non-HTTP/1.x, 431 over 8 KiB of head, 5 s head and write timeouts, 16
//!   connections then close at once) would be re-expressed in its
//!   configuration, not removed.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};

use crate::error::Error;

/// One kernel decision counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub src_env: String,
    pub dst_env: String,
    /// `allowed`, `denied`, `audited`.
    pub verdict: String,
    /// `enforce`, `audit`.
    pub mode: String,
    /// `egress`, `ingress`.
    pub direction: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    pub count: u64,
}

/// What the daemon knows, for the metrics endpoint. The daemon updates it
/// (under the mutex) whenever it has new numbers, e.g. every housekeeping tick.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Rows with the same labels are added up.
    pub decisions: Vec<Decision>,
    /// Per record kind, records emitted since the agent started.
    pub events_emitted: BTreeMap<String, u64>,
    /// Per source (`ringbuf`, `queue:<sink>`), records lost since the agent started.
    pub events_lost: BTreeMap<String, u64>,
    /// Records suppressed by the rate limit since the agent started.
    pub events_suppressed: u64,
    /// Per record kind, records caused by `envguard verify` probes (also in
    /// `events_emitted`).
    pub probe_events: BTreeMap<String, u64>,
    /// Per reason, control-socket refusals since the agent started.
    pub control_refused: BTreeMap<String, u64>,
    /// The policy's generation: 1 for the first one loaded, +1 per reload.
    pub policy_revision: u64,
    /// The agent's version, for `envguard_build_info`.
    pub version: String,
    /// Unix time of the last housekeeping tick.
    pub heartbeat_seconds: f64,
}

impl Snapshot {
    /// An empty snapshot carrying this build's version.
    pub fn new() -> Snapshot {
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            control_refused: crate::control::Refusal::ALL
                .iter()
                .map(|r| (r.name().to_owned(), 0))
                .collect(),
            ..Snapshot::default()
        }
    }
}

/// Label value escaping of the text format: `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // HELP texts are ours and contain no `\` or newline.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// The application's families (everything but the process metrics).
fn render_app(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut decisions: BTreeMap<[&str; 6], u64> = BTreeMap::new();
    for d in &s.decisions {
        let key = [
            d.src_env.as_str(),
            &d.dst_env,
            &d.verdict,
            &d.mode,
            &d.direction,
            &d.proto,
        ];
        let n = decisions.entry(key).or_default();
        *n = n.saturating_add(d.count);
    }
    header(
        &mut out,
        "envguard_decisions_total",
        "counter",
        "Connection decisions taken by the kernel programs, counted in the kernel.",
    );
    for ([src, dst, verdict, mode, direction, proto], n) in &decisions {
        sample(
            &mut out,
            "envguard_decisions_total",
            &[
                ("src_env", src),
                ("dst_env", dst),
                ("verdict", verdict),
                ("mode", mode),
                ("direction", direction),
                ("proto", proto),
            ],
            n,
        );
    }
    header(
        &mut out,
        "envguard_events_emitted_total",
        "counter",
        "Records written to the event stream, per kind.",
    );
    for (kind, n) in &s.events_emitted {
        sample(
            &mut out,
            "envguard_events_emitted_total",
            &[("kind", kind)],
            n,
        );
    }
    header(
        &mut out,
        "envguard_events_lost_total",
        "counter",
        "Records that could not be delivered, per source (ringbuf, queue:<sink>).",
    );
    for (source, n) in &s.events_lost {
        sample(
            &mut out,
            "envguard_events_lost_total",
            &[("source", source)],
            n,
        );
    }
    header(
        &mut out,
        "envguard_events_suppressed_total",
        "counter",
        "Records held back by the rate limit.",
    );
    sample(
        &mut out,
        "envguard_events_suppressed_total",
        &[],
        s.events_suppressed,
    );
    header(
        &mut out,
        "envguard_probe_events_total",
        "counter",
        "Records caused by envguard verify probes (also in envguard_events_emitted_total).",
    );
    for (kind, &n) in &s.probe_events {
        sample(
            &mut out,
            "envguard_probe_events_total",
            &[("kind", kind)],
            n,
        );
    }
    header(
        &mut out,
        "envguard_control_refused_total",
        "counter",
        "Control-socket connections and events subscriptions refused over a limit, per limit.",
    );
    for (reason, n) in &s.control_refused {
        sample(
            &mut out,
            "envguard_control_refused_total",
            &[("reason", reason)],
            n,
        );
    }
    header(
        &mut out,
        "envguard_policy_revision",
        "gauge",
        "Generation of the policy in force: 1 for the first one loaded, +1 per reload.",
    );
    sample(&mut out, "envguard_policy_revision", &[], s.policy_revision);
    header(
        &mut out,
        "envguard_build_info",
        "gauge",
        "Always 1; the version label names the envguard build.",
    );
    sample(
        &mut out,
        "envguard_build_info",
        &[("version", &s.version)],
        1,
    );
    header(
        &mut out,
        "envguard_heartbeat_timestamp_seconds",
        "gauge",
        "Unix time of the agent's last housekeeping tick (once a second).",
    );
    sample(
        &mut out,
        "envguard_heartbeat_timestamp_seconds",
        &[],
        s.heartbeat_seconds,
    );
    out
}

/// The process's own numbers, from /proc/self.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessStats {
    resident_bytes: u64,
    cpu_seconds: f64,
    start_time_seconds: f64,
    open_fds: u64,
}

/// Parses /proc/self/stat's fields (`man 5 proc`) and /proc/stat's `btime`.
fn parse_process(stat: &str, proc_stat: &str, clk_tck: u64, page: u64) -> Option<(u64, f64, f64)> {
    // The command name is in parentheses and may hold anything: fields are
    // counted from the last ')'. After it comes field 3, `state`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let ticks = clk_tck.max(1) as f64;
    let cpu = (field(14)? + field(15)?) as f64 / ticks;
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let start = btime as f64 + field(22)? as f64 / ticks;
    let rss = field(24)? * page;
    Some((rss, cpu, start))
}

fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let (clk_tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (resident_bytes, cpu_seconds, start_time_seconds) = parse_process(
        &stat,
        &proc_stat,
        u64::try_from(clk_tck).ok()?,
        u64::try_from(page).ok()?,
    )?;
    // The directory's own descriptor is listed too.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .count()
        .saturating_sub(1) as u64;
    Some(ProcessStats {
        resident_bytes,
        cpu_seconds,
        start_time_seconds,
        open_fds,
    })
}

fn render_process(p: &ProcessStats) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    sample(
        &mut out,
        "process_resident_memory_bytes",
        &[],
        p.resident_bytes,
    );
    header(
        &mut out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    sample(&mut out, "process_cpu_seconds_total", &[], p.cpu_seconds);
    header(
        &mut out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
    );
    sample(
        &mut out,
        "process_start_time_seconds",
        &[],
        p.start_time_seconds,
    );
    header(
        &mut out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    );
    sample(&mut out, "process_open_fds", &[], p.open_fds);
    out
}

/// The whole exposition: the application's families, then the process's
/// (left out if /proc cannot be read).
pub fn render(s: &Snapshot) -> String {
    let mut out = render_app(s);
    if let Some(p) = process_stats() {
        out.push_str(&render_process(&p));
    }
    out
}

/// Limits on what one client may cost.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_head: usize,
    read_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    /// How long a closed connection waits for the client's end.
    linger: Duration,
}

const LINGER_BYTES: usize = 64 * 1024;

const LIMITS: Limits = Limits {
    max_head: 8 * 1024,
    read_timeout: Duration::from_secs(5),
    write_timeout: Duration::from_secs(5),
    max_connections: 16,
    linger: Duration::from_secs(1),
};

/// Listens on `addr` and serves `GET /metrics` from the snapshot until the
/// returned task is aborted (or the runtime ends).
pub async fn serve(
    addr: SocketAddr,
    snapshot: Arc<Mutex<Snapshot>>,
) -> Result<JoinHandle<()>, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("listening for metrics on {addr} (--metrics-listen)"),
        source,
    })?;
    Ok(serve_listener(listener, snapshot))
}

/// [`serve`] on a listener the caller bound (e.g. to learn the port of
/// `127.0.0.1:0`).
pub fn serve_listener(listener: TcpListener, snapshot: Arc<Mutex<Snapshot>>) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, snapshot, LIMITS))
}

async fn accept_loop(listener: TcpListener, snapshot: Arc<Mutex<Snapshot>>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                log::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Too many at once: close this one now.
            drop(stream);
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(stream, &snapshot, limits).await {
                log::debug!("metrics: {e}");
            }
        });
    }
}

/// Where the request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The response to a request head: (status line, body).
fn route(head: &[u8], snapshot: &Mutex<Snapshot>) -> (&'static str, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "bad request\n".to_owned());
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", "bad request\n".to_owned());
    }
    let path = target.split('?').next().unwrap_or_default();
    if method != "GET" || path != "/metrics" {
        return ("404 Not Found", "not found; try GET /metrics\n".to_owned());
    }
    let s = snapshot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    ("200 OK", render(&s))
}

async fn connection(
    mut stream: TcpStream,
    snapshot: &Mutex<Snapshot>,
    limits: Limits,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read_head = async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = head_end(&buf) {
                return Ok::<_, std::io::Error>(Some(end));
            }
            if buf.len() >= limits.max_head {
                return Ok(None);
            }
            let room = (limits.max_head - buf.len()).min(chunk.len());
            let n = stream.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let head = match tokio::time::timeout(limits.read_timeout, read_head).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    let (status, body, content_type) = match head {
        Some(end) => {
            let (status, body) = route(&buf[..end], snapshot);
            let ct = if status.starts_with("200") {
                "text/plain; version=0.0.4; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            (status, body, ct)
        }
        None => (
            "431 Request Header Fields Too Large",
            "request head too large\n".to_owned(),
            "text/plain; charset=utf-8",
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(limits.write_timeout, write).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    // Lingering close: closing with unread input would send a reset, which
    // can destroy the response before the client reads it. The client has our
    // FIN; wait (a little) for its end, discarding what it still sends.
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(limits.linger, drain).await;
    Ok(())
}

#[cfg(test)]
mod tests;
