//! The JSON-lines event stream. Field names are a contract with log pipelines
//! (documented in the README); add fields, never rename or remove them.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use envguard_common::{
    event::{self as ev, DedupKey, ViolationEvent},
    policy::{ENV_HOST, ENV_WORLD, RULE_AGENT_LOSS_CLOSED, RULE_AGENT_LOSS_OPEN, RULE_NONE},
};
use serde::Serialize;

use crate::{
    containers::{ContainerRef, Registry},
    policy::{
        Default, OnLoss, Policy,
        compile::{Compiled, RULE_DEFAULT_HOST, RULE_DEFAULT_WORLD},
        ports::proto_name,
    },
    ratelimit::{Admit, TokenBucket},
    sinks::{Fanout, Lines},
    sys::{self, CgroupNames},
};

#[derive(Serialize)]
struct Header<'a> {
    kind: &'static str,
    time: String,
    seq: u64,
    boot_id: &'a str,
    host: &'a str,
}

#[derive(Serialize)]
pub struct Endpoint<'a> {
    /// `None` when not known yet (the local address at connect time).
    pub ip: Option<String>,
    pub port: Option<u16>,
    pub env: &'a str,
    /// How the env was found; not known in rollups (omitted there).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub env_from: &'static str,
    /// The peer socket's cgroup when its env came from a local socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The registered container (`envguard oci-hook`) this side is in: the
    /// local socket's, or a same-host peer socket's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
}

#[derive(Serialize)]
pub struct Process {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
}

#[derive(Serialize)]
pub struct Violation<'a> {
    pub mode: &'static str,
    pub verdict: &'static str,
    pub direction: &'static str,
    pub hook: &'static str,
    /// The interface a tc hook saw the packet on (tc hooks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub proto: String,
    pub source: Endpoint<'a>,
    pub destination: Endpoint<'a>,
    pub process: Process,
    pub rule: String,
    /// The `envguard verify` run whose probe caused the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

#[derive(Serialize)]
pub struct PolicyLoaded<'a> {
    pub policy: String,
    pub revision: &'a str,
    pub envs: Vec<&'a str>,
    pub mode: String,
    pub cgroup_root: String,
    pub hooks: &'a [&'a str],
    pub pin_root: String,
    /// Whether enforcement was already in place (pinned by an earlier agent).
    pub adopted: bool,
}

/// How long no agent ran, and which envs' fail modes that gap triggered.
#[derive(Serialize)]
pub struct AgentGap {
    pub gap_ms: u64,
    pub envs_failed_open: Vec<String>,
    pub envs_failed_closed: Vec<String>,
}

/// The gap record, judged with the current policy's fail modes.
pub fn agent_gap(policy: &Policy, gap: std::time::Duration) -> AgentGap {
    let failed = |mode: OnLoss| {
        policy
            .envs
            .iter()
            .filter(|e| e.on_agent_loss == mode && gap > e.agent_loss_timeout)
            .map(|e| e.name.clone())
            .collect()
    };
    AgentGap {
        gap_ms: gap.as_millis() as u64,
        envs_failed_open: failed(OnLoss::Open),
        envs_failed_closed: failed(OnLoss::Closed),
    }
}

/// A kernel counter that grew: `map_full` (an insertion into the named map
/// failed; the flow is classified again next time, or a socket's env could not
/// be stored and it is `host` to its same-host peers) or `unparsable_packets`.
#[derive(Serialize)]
pub struct CounterRecord {
    pub source: &'static str,
    pub count: u64,
}

/// A socket held by processes of more than one env (`socket_shared`): it can
/// have one env only, so one side's peers are judged against the other's.
#[derive(Serialize)]
pub struct SocketShared {
    /// The socket's inode (as in `/proc/<pid>/fd` links: `socket:[inode]`).
    pub inode: u64,
    pub cookie: u64,
    /// The holders' envs, and one holder pid of each, in the same order.
    pub envs: Vec<String>,
    pub pids: Vec<i32>,
    /// The env the socket has now.
    pub env: String,
}

/// `source`: `ringbuf` (the kernel's buffer was full) or `queue:<sink>` (a
/// slow or dead sink's queue was).
#[derive(Serialize)]
pub struct LostEvents {
    pub source: String,
    pub count: u64,
}

/// Where a stream's lines go.
pub trait LineOut {
    /// One record, without its newline. Must not block on a slow consumer.
    fn send(&mut self, line: &str);

    /// Records in order, as one hand-off.
    fn send_lines(&mut self, lines: Lines) {
        for line in lines.all() {
            self.send(line);
        }
    }
}

impl LineOut for Fanout {
    fn send(&mut self, line: &str) {
        Fanout::send(self, line);
    }

    fn send_lines(&mut self, lines: Lines) {
        Fanout::send_lines(self, lines);
    }
}

impl LineOut for Vec<String> {
    fn send(&mut self, line: &str) {
        self.push(line.to_owned());
    }
}

/// Records a batch holds before it is handed on even though the ring buffer
/// still has more: bounds how long a record waits in a flood.
const BATCH_LINES: usize = 256;

/// Writes records with a header (`kind`, `time`, `seq`, `boot_id`, `host`) in
/// front of the body's fields. `seq` counts every record of this run from 0
/// with no gaps, so a consumer can tell whether it missed any.
///
/// Each record also goes to the control socket's subscribers (`envguard
/// events --follow`); a subscriber that falls behind loses records and is told.
/// With a rate limit, `violation` records beyond it are suppressed and the
/// next one that goes out carries `"suppressed": N`.
pub struct Stream<O: LineOut> {
    out: O,
    seq: u64,
    /// Names this agent run: with `seq`, a consumer can prove it saw every record.
    boot_id: String,
    host: String,
    subscribers: Option<tokio::sync::broadcast::Sender<String>>,
    limit: Option<TokenBucket>,
    /// Records sent, per kind (for metrics).
    pub emitted: BTreeMap<&'static str, u64>,
    /// Where each record is serialized, reused.
    line: Vec<u8>,
    /// Records held for one hand-off while a batch is open.
    batch: Option<Lines>,
}

impl<O: LineOut> Stream<O> {
    pub fn new(out: O) -> Self {
        Self {
            out,
            seq: 0,
            boot_id: sys::random_id(),
            host: sys::hostname(),
            subscribers: None,
            limit: None,
            emitted: BTreeMap::new(),
            line: Vec::with_capacity(1024),
            batch: None,
        }
    }

    /// Holds records until [`end_batch`](Self::end_batch) (or until
    /// [`BATCH_LINES`] of them) and hands them on together: for draining
    /// the ring buffer, where one hand-off per record would cost a queue
    /// operation and a sink thread wake-up each.
    pub fn begin_batch(&mut self) {
        if self.batch.is_none() {
            self.batch = Some(Lines::with_capacity(BATCH_LINES, BATCH_LINES * 600));
        }
    }

    /// Hands on what the batch holds and closes it.
    pub fn end_batch(&mut self) {
        if let Some(lines) = self.batch.take()
            && !lines.is_empty()
        {
            self.out.send_lines(lines);
        }
    }

    pub fn with_subscribers(mut self, tx: tokio::sync::broadcast::Sender<String>) -> Self {
        self.subscribers = Some(tx);
        self
    }

    pub fn with_rate_limit(mut self, bucket: TokenBucket) -> Self {
        self.limit = Some(bucket);
        self
    }

    /// `violation` records suppressed by the rate limit so far.
    pub fn suppressed(&self) -> u64 {
        self.limit.as_ref().map_or(0, TokenBucket::suppressed_total)
    }

    /// Reports violations the rate limit held back that no later violation
    /// record carried in its `suppressed` field, as one
    /// `{"kind":"violations_suppressed","count":N}`: called every housekeeping
    /// tick and at shutdown, so a suppressed violation is never unreported.
    pub fn flush_suppressed(&mut self) -> std::io::Result<()> {
        let pending = self.limit.as_mut().map_or(0, TokenBucket::take_pending);
        if pending == 0 {
            return Ok(());
        }
        #[derive(Serialize)]
        struct Suppressed {
            count: u64,
        }
        self.emit(
            "violations_suppressed",
            None,
            &Suppressed { count: pending },
        )
    }

    pub fn into_inner(self) -> O {
        self.out
    }

    pub fn out(&self) -> &O {
        &self.out
    }

    /// Emits one record; `boot_ns` is its CLOCK_BOOTTIME time, `None` for now.
    pub fn emit<T: Serialize>(
        &mut self,
        kind: &'static str,
        boot_ns: Option<u64>,
        body: &T,
    ) -> std::io::Result<()> {
        // Only violations are limited: a rollup's count, a loss report or a
        // mode change must never be what a flood pushes out.
        let mut suppressed = 0;
        if kind == "violation"
            && let Some(bucket) = &mut self.limit
        {
            match bucket.admit(std::time::Instant::now()) {
                Admit::Suppress => return Ok(()),
                Admit::Emit { suppressed: n } => suppressed = n,
            }
        }
        let unix_ns = match boot_ns {
            Some(ns) => sys::boot_ns_to_unix_ns(ns),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128),
        };
        let header = Header {
            kind,
            time: rfc3339_ns(unix_ns),
            seq: self.seq,
            boot_id: &self.boot_id,
            host: &self.host,
        };
        // Header and body are written straight into one buffer: the
        // header's object is left open, and the body's opening brace
        // becomes the comma that joins them.
        let line = &mut self.line;
        line.clear();
        serde_json::to_writer(&mut *line, &header).map_err(std::io::Error::other)?;
        line.pop();
        let body_at = line.len();
        serde_json::to_writer(&mut *line, body).map_err(std::io::Error::other)?;
        match &line[body_at..] {
            b"{}" => line.truncate(body_at),
            [b'{', ..] => {
                line[body_at] = b',';
                line.pop();
            }
            _ => return Err(std::io::Error::other("an event body must be a JSON object")),
        }
        if suppressed > 0 {
            line.extend_from_slice(b",\"suppressed\":");
            line.extend_from_slice(suppressed.to_string().as_bytes());
        }
        line.push(b'}');
        // serde_json writes UTF-8 only.
        let line = std::str::from_utf8(line).map_err(std::io::Error::other)?;
        match &mut self.batch {
            Some(batch) => {
                batch.push(line);
                if batch.len() >= BATCH_LINES {
                    let full = std::mem::replace(
                        batch,
                        Lines::with_capacity(BATCH_LINES, BATCH_LINES * 600),
                    );
                    self.out.send_lines(full);
                }
            }
            None => self.out.send(line),
        }
        self.seq += 1;
        *self.emitted.entry(kind).or_default() += 1;
        if let Some(tx) = &self.subscribers
            && tx.receiver_count() > 0
        {
            // A subscriber gone meanwhile is not an error.
            let _ = tx.send(line.to_owned());
        }
        Ok(())
    }
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn rfc3339_ns(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000) as u32;
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs.max(0) as u64, nanos);
    humantime::format_rfc3339_nanos(t).to_string()
}

fn ip(family: u8, addr: &[u8; 16]) -> Option<String> {
    if addr.iter().all(|&b| b == 0) {
        return None;
    }
    let v6 = Ipv6Addr::from(*addr);
    let ip = match (family, v6.to_ipv4_mapped()) {
        (ev::AF_INET, Some(v4)) | (_, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    };
    // An IPv4 wildcard arrives as ::ffff:0.0.0.0.
    (ip != IpAddr::V4(Ipv4Addr::UNSPECIFIED)).then(|| ip.to_string())
}

fn env_from(from: u8) -> &'static str {
    match from {
        ev::ENV_FROM_CGROUP => "cgroup",
        ev::ENV_FROM_CIDR => "cidr",
        ev::ENV_FROM_SOCKET => "socket",
        ev::ENV_FROM_ENDPOINT => "endpoint",
        ev::ENV_FROM_INTERFACE => "interface",
        _ => "default",
    }
}

/// Whether a record comes from a tc hook (an interface, no socket).
fn is_tc(h: u8) -> bool {
    h == ev::HOOK_TC_INGRESS || h == ev::HOOK_TC_EGRESS
}

/// An interface's name, or `if<index>` when it is gone and was never seen.
fn interface_name(ifindex: u32) -> String {
    crate::interfaces::name_of(ifindex).unwrap_or_else(|| format!("if{ifindex}"))
}

/// The `hook` of a record: the program named by its event id in the hook table.
fn hook(h: u8) -> &'static str {
    envguard_common::programs::by_event_id(h).map_or("unknown", |hook| hook.name)
}

pub fn verdict_name(v: u8) -> &'static str {
    if v == ev::VERDICT_ALLOWED {
        "allowed"
    } else if v == ev::VERDICT_DENIED {
        "denied"
    } else {
        "audited"
    }
}

pub fn direction_name(d: u8) -> &'static str {
    if d == ev::DIRECTION_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// A protocol's name, or its number when it has none here.
pub fn proto_label(p: u8) -> String {
    proto_name(p).map_or_else(|| p.to_string(), str::to_owned)
}

/// Names the decision behind a violation: which rule (or default) decided.
pub fn rule_label(policy: &Policy, compiled: &Compiled, e: &ViolationEvent) -> String {
    match e.rule {
        RULE_NONE => {
            let involves = |env: u32| e.src_env == env || e.dst_env == env;
            if involves(ENV_HOST) && policy.default_host == Default::Deny {
                "default:host=deny".to_owned()
            } else if involves(ENV_WORLD) && policy.default_world == Default::Deny {
                "default:world=deny".to_owned()
            } else {
                format!(
                    "default:cross-env (no allow rule for {} -> {})",
                    compiled.env_name(e.src_env),
                    compiled.env_name(e.dst_env)
                )
            }
        }
        RULE_DEFAULT_HOST => "default:host=allow".to_owned(),
        RULE_AGENT_LOSS_OPEN => "agent_loss:open".to_owned(),
        RULE_AGENT_LOSS_CLOSED => "agent_loss:closed".to_owned(),
        RULE_DEFAULT_WORLD => "default:world=allow".to_owned(),
        i => policy
            .rules
            .get(i as usize)
            .map_or_else(|| format!("rule #{i}"), ToString::to_string),
    }
}

/// Repeats of one violating flow, counted in the kernel instead of sent.
#[derive(Serialize)]
pub struct Rollup<'a> {
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub mode: &'static str,
    pub verdict: &'static str,
    pub direction: &'static str,
    pub hook: &'static str,
    /// The interface a tc hook saw the flow on (tc hooks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub proto: String,
    pub source: Endpoint<'a>,
    pub destination: Endpoint<'a>,
    pub process: Process,
    /// The `envguard verify` run whose probes caused the repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

pub fn rollup<'a>(
    compiled: &'a Compiled,
    names: &mut CgroupNames,
    containers: &Registry,
    k: &DedupKey,
    count: u64,
    first_ns: u64,
    last_ns: u64,
) -> Rollup<'a> {
    let egress = k.direction == ev::DIRECTION_EGRESS;
    let remote = ip(ev::AF_INET6, &k.remote_addr);
    let side = |env: u32, ip: Option<String>, port: Option<u16>| Endpoint {
        ip,
        port,
        env: compiled.env_name(env),
        env_from: "",
        cgroup: None,
        container: None,
    };
    let port = (k.dst_port != 0).then_some(k.dst_port);
    // At tc the key holds the interface where a cgroup would be, and the
    // destination's address whichever the direction.
    let tc = is_tc(k.hook);
    let (mut source, mut destination) = if egress || tc {
        (side(k.src_env, None, None), side(k.dst_env, remote, port))
    } else {
        (side(k.src_env, remote, None), side(k.dst_env, None, port))
    };
    if !tc {
        let local = if egress {
            &mut source
        } else {
            &mut destination
        };
        local.container = containers.container_of(k.cgroup_id, names).cloned();
    }
    let time = |ns: u64| rfc3339_ns(sys::boot_ns_to_unix_ns(ns));
    Rollup {
        count,
        first_seen: time(first_ns),
        last_seen: time(last_ns),
        // The key holds the verdict: a mode switch starts a new key.
        mode: if k.verdict == ev::VERDICT_DENIED {
            "enforce"
        } else {
            "audit"
        },
        verdict: verdict_name(k.verdict),
        direction: direction_name(k.direction),
        hook: hook(k.hook),
        interface: tc.then(|| interface_name(k.cgroup_id as u32)),
        proto: proto_label(k.proto),
        source,
        destination,
        process: Process {
            pid: None,
            comm: None,
            uid: None,
            cgroup_id: if tc { 0 } else { k.cgroup_id },
            cgroup: if tc { None } else { names.path(k.cgroup_id) },
        },
        probe: None,
    }
}

/// Turns a kernel record into the documented JSON shape.
pub fn violation<'a>(
    policy: &Policy,
    compiled: &'a Compiled,
    names: &mut CgroupNames,
    containers: &Registry,
    e: &ViolationEvent,
) -> Violation<'a> {
    let in_task = e.pid != 0;
    let egress = e.direction == ev::DIRECTION_EGRESS;
    let peer_cgroup = names.path(e.peer_cgroup_id);
    let local_container = containers.container_of(e.cgroup_id, names).cloned();
    let peer_container = containers.container_of(e.peer_cgroup_id, names).cloned();
    let endpoint = |addr: &[u8; 16], port: u16, env: u32, from: u8, is_peer: bool| Endpoint {
        ip: ip(e.family, addr),
        port: (port != 0).then_some(port),
        env: compiled.env_name(env),
        env_from: env_from(from),
        cgroup: if is_peer && from == ev::ENV_FROM_SOCKET {
            peer_cgroup.clone()
        } else {
            None
        },
        container: if is_peer {
            peer_container.clone()
        } else {
            local_container.clone()
        },
    };
    let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
    Violation {
        mode: if e.mode == envguard_common::config::MODE_ENFORCE as u8 {
            "enforce"
        } else {
            "audit"
        },
        verdict: verdict_name(e.verdict),
        direction: direction_name(e.direction),
        hook: hook(e.hook),
        interface: is_tc(e.hook).then(|| interface_name(e.ifindex)),
        proto: proto_label(e.proto),
        source: endpoint(&e.src_addr, e.src_port, e.src_env, e.src_env_from, !egress),
        destination: endpoint(&e.dst_addr, e.dst_port, e.dst_env, e.dst_env_from, egress),
        process: Process {
            pid: in_task.then_some(e.pid),
            comm: in_task.then(|| String::from_utf8_lossy(&e.comm[..comm_len]).into_owned()),
            uid: (e.uid != u32::MAX).then_some(e.uid),
            cgroup_id: e.cgroup_id,
            cgroup: names.path(e.cgroup_id),
        },
        rule: rule_label(policy, compiled, e),
        probe: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_render_canonically() {
        let mut v4 = [0u8; 16];
        v4[10] = 0xff;
        v4[11] = 0xff;
        v4[12..].copy_from_slice(&[198, 18, 10, 1]);
        assert_eq!(ip(ev::AF_INET, &v4).as_deref(), Some("198.18.10.1"));
        assert_eq!(ip(ev::AF_INET6, &v4).as_deref(), Some("198.18.10.1"));
        let v6: Ipv6Addr = "2001:db8:10::1".parse().unwrap();
        assert_eq!(
            ip(ev::AF_INET6, &v6.octets()).as_deref(),
            Some("2001:db8:10::1")
        );
        assert_eq!(ip(ev::AF_INET, &[0; 16]), None);
    }

    /// Counts hand-offs.
    #[derive(Default)]
    struct Handoffs(Vec<Vec<String>>);
    impl LineOut for Handoffs {
        fn send(&mut self, line: &str) {
            self.0.push(vec![line.to_owned()]);
        }
        fn send_lines(&mut self, lines: Lines) {
            self.0.push(lines.all().map(str::to_owned).collect());
        }
    }

    #[test]
    fn a_batch_is_one_hand_off_in_order_and_bounded() {
        #[derive(Serialize)]
        struct Empty {}
        let mut s = Stream::new(Handoffs::default());
        s.emit("first", None, &Empty {}).unwrap();
        s.begin_batch();
        for _ in 0..BATCH_LINES + 3 {
            s.emit("violation", None, &Empty {}).unwrap();
        }
        // Nothing beyond the full batches left until the batch ends.
        assert_eq!(
            s.out().0.iter().map(Vec::len).collect::<Vec<_>>(),
            [1, BATCH_LINES]
        );
        s.end_batch();
        s.emit("last", None, &Empty {}).unwrap();
        let handoffs = s.into_inner().0;
        assert_eq!(
            handoffs.iter().map(Vec::len).collect::<Vec<_>>(),
            [1, BATCH_LINES, 3, 1]
        );
        let seqs: Vec<u64> = handoffs
            .iter()
            .flatten()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (0..BATCH_LINES as u64 + 5).collect::<Vec<_>>());
        // An empty body leaves the header alone, still valid JSON.
        let v: serde_json::Value = serde_json::from_str(&handoffs[3][0]).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 5);
        assert_eq!(v["kind"], "last");
    }

    #[test]
    fn records_carry_header_then_body_with_gapless_seq() {
        let mut s = Stream::new(Vec::new());
        let lost = |count| LostEvents {
            source: "ringbuf".into(),
            count,
        };
        s.emit("lost_events", None, &lost(3)).unwrap();
        s.emit("lost_events", Some(0), &lost(1)).unwrap();
        let lines: Vec<serde_json::Value> = s
            .into_inner()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "lost_events");
        assert_eq!(lines[0]["seq"], 0);
        assert_eq!(lines[1]["seq"], 1);
        assert_eq!(lines[0]["count"], 3);
        let t = lines[0]["time"].as_str().unwrap();
        assert!(
            t.ends_with('Z') && t.len() == "2026-11-23T10:00:00.123456789Z".len(),
            "{t}"
        );
        let keys: Vec<&String> = lines[0].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["kind", "time", "seq", "boot_id", "host", "source", "count"]
        );
        assert_eq!(lines[0]["boot_id"], lines[1]["boot_id"]);
        assert_eq!(lines[0]["boot_id"].as_str().map(str::len), Some(32));
    }
}
