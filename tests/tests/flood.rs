//! Violation floods: in-kernel dedup and rollups, exact counters, provable
//! completeness, bounded memory.
//!
//! - Flood (audit mode, `--dedup-interval 2s`): one dev process sends
//!   100 000 violating UDP datagrams to a prod address as fast as it can
//!   while 10 more dev processes send 10 000 each (200 000 attempts in
//!   all, about a second on 2 CPUs), and a prod→prod TCP loop runs at
//!   200/s. Then: violation records + rollup counts + lost counts == the
//!   attempts exactly; the kernel's dev→prod `audited` counter (`status
//!   --json`) == the attempts exactly; `seq` runs 0, 1, 2… without a gap
//!   under one `boot_id`; the agent's RSS, sampled every 5 ms, stays under
//!   64 MiB; no prod→prod attempt fails, some of them during the flood.
//! - Dedup (`--dedup-interval 2s`): 50 identical violating attempts — UDP
//!   datagrams in audit mode, refused TCP connects in enforce mode — give
//!   at least one and at most one-per-CPU violation record and rollups
//!   (every field checked) whose counts add up to the rest, within the
//!   interval plus the agent's 1 s tick; the counters say 50; once the
//!   interval has passed, the next attempt is reported again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use envguard_tests::agent::dump_lines;
use envguard_tests::control::{assert_fields, pair};
use envguard_tests::event::rfc3339_ns;
use envguard_tests::process::{FlowSpec, attempts_between, flows, udp_burst};
use envguard_tests::{AgentOptions, Client, Family, Lab, Mode, Proto, Site, sys};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const WAIT: Duration = Duration::from_secs(10);
/// The dedup interval of these tests.
const INTERVAL: &str = "2s";
const INTERVAL_MS: u64 = 2000;
/// How long after the last attempt every repeat must have been reported:
/// the interval, the agent's 1 s tick, and slack.
const REPORT_TIMEOUT: Duration = Duration::from_millis(INTERVAL_MS + 3000);

/// In prod's CIDR, but no host has it: in audit mode the datagrams leave
/// and the server namespace (which does not forward) drops them silently.
fn nowhere_in_prod() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 10, 200)), 9999)
}

fn any() -> IpAddr {
    Ipv6Addr::UNSPECIFIED.into()
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field:?} in {v}"))
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u64::try_from(n).unwrap_or(1).max(1)
}

/// Violation records to `dst` from env `src`, rollup counts for it, and
/// ring-buffer losses (which cannot be attributed, so all count), in `lines`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    records: u64,
    rollups: u64,
    rolled_up: u64,
    lost: u64,
}

impl Tally {
    fn of(lines: &[Value], src: &str, dst: SocketAddr) -> Tally {
        let ours = |l: &Value| {
            l["source"]["env"] == src
                && l["destination"]["ip"] == dst.ip().to_string().as_str()
                && l["destination"]["port"] == dst.port()
        };
        let mut t = Tally::default();
        for l in lines {
            match l["kind"].as_str() {
                Some("violation") if ours(l) => t.records += 1,
                Some("violation_rollup") if ours(l) => {
                    t.rollups += 1;
                    t.rolled_up += num(l, "count");
                }
                Some("lost_events") => t.lost += num(l, "count"),
                _ => {}
            }
        }
        t
    }

    fn total(&self) -> u64 {
        self.records + self.rolled_up + self.lost
    }
}

/// Samples a process's VmRSS every 5 ms until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut peak, mut samples) = (0, 0);
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = envguard_tests::control::vm_rss_kib(pid) {
                    peak = peak.max(kib);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (peak, samples)
        });
        RssSampler { stop, thread }
    }

    /// (peak KiB, samples)
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the RSS sampler")
    }
}

/// Checks the `seq`/`boot_id` contract over every line the agent printed.
fn assert_gapless(lines: &[Value]) {
    let boot_id = &lines[0]["boot_id"];
    assert!(
        boot_id
            .as_str()
            .is_some_and(|b| b.len() == 32 && b.chars().all(|c| c.is_ascii_hexdigit())),
        "boot_id must be 32 hex digits: {}",
        lines[0]
    );
    for (i, l) in lines.iter().enumerate() {
        assert!(
            l["seq"] == i && l["boot_id"] == *boot_id,
            "line {i} must have seq {i} and boot_id {boot_id}: {l}"
        );
    }
}

#[test]
fn flood_is_counted_exactly_with_bounded_memory() {
    const BIG: u32 = 100_000;
    const SMALL: u32 = 10_000;
    const SMALL_PROCS: usize = 10;
    let mut lab = Lab::new(EGPROBE, Mode::Audit);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().dedup_interval(INTERVAL));
    let agent_pid = lab.agent().pid();
    let rss_start = lab.agent().rss_kib().unwrap_or(0);
    let dst = nowhere_in_prod();
    let dev = lab.client_place(Client::Dev);

    // The pipeline works, and the gateway's neighbour entry is resolved.
    let warm = udp_burst(lab.egprobe(), &dev, dst, 1);
    assert!(
        warm["ok"] == 1,
        "audit mode lets the warm-up through: {warm}"
    );
    lab.agent().wait_for("the warm-up datagram", WAIT, |e| {
        e["kind"] == "violation" && e["process"]["pid"] == warm["pid"]
    });

    let prd = lab.connect_loop(
        Client::Prod,
        SocketAddr::new(Site::Prod.addr(Family::V4), 9000),
        200,
    );
    prd.wait_attempts(20, WAIT);
    let sampler = RssSampler::start(agent_pid);
    let t0 = sys::mono_ns();
    let reports: Vec<Value> = std::thread::scope(|s| {
        let mut hs = vec![s.spawn(|| udp_burst(lab.egprobe(), &dev, dst, BIG))];
        for _ in 0..SMALL_PROCS {
            hs.push(s.spawn(|| udp_burst(lab.egprobe(), &dev, dst, SMALL)));
        }
        hs.into_iter()
            .map(|h| h.join().expect("a flood thread"))
            .collect()
    });
    let t1 = sys::mono_ns();
    let sent: u64 = reports.iter().map(|r| num(r, "ok")).sum();
    let want_sent = u64::from(BIG) + SMALL_PROCS as u64 * u64::from(SMALL);
    assert!(
        sent == want_sent && reports.iter().all(|r| r["other"] == 0 && r["eperm"] == 0),
        "audit mode never blocks: all {want_sent} sendto calls must succeed; reports: {reports:?}"
    );
    let total = sent + 1;
    let now = prd.latest().map_or(0, |v| num(&v, "attempts"));
    prd.wait_attempts(now + 20, WAIT);
    let p = prd.finish();

    // Everything is reported within the interval and a tick.
    let lines = lab
        .agent()
        .wait_lines(REPORT_TIMEOUT, |l| {
            Tally::of(l, "dev", dst).total() >= total
        })
        .unwrap_or_else(|l| l);
    let reported_ns = sys::mono_ns();
    let (rss_peak, samples) = sampler.finish();
    let tally = Tally::of(&lines, "dev", dst);
    assert_eq!(
        tally.total(),
        total,
        "violation records + rollup counts + lost counts must equal the {total} violating attempts exactly \
         ({tally:?}, waited {REPORT_TIMEOUT:?} after the flood); last lines:\n{}",
        dump_lines(&lines[lines.len().saturating_sub(20)..])
    );
    let st = lab.status();
    let dp = pair(&st, "dev", "prod");
    assert_eq!(
        [num(dp, "allowed"), num(dp, "denied"), num(dp, "audited")],
        [0, 0, total],
        "the kernel's dev -> prod counters [allowed, denied, audited] after {total} violating datagrams: {dp}"
    );
    // Nothing more comes later, not even what the agent reports as it stops.
    let lines = lab.take_agent().stop_collect();
    assert_gapless(&lines);
    assert_eq!(
        Tally::of(&lines, "dev", dst),
        tally,
        "nothing more may be reported after the invariant held, not even at exit"
    );
    assert!(
        rss_peak < 64 * 1024 && samples >= 10,
        "the agent's RSS must stay under 64 MiB during the flood: peak {rss_peak} KiB over {samples} samples"
    );
    let during = attempts_between(&p, t0, t1);
    assert!(
        num(&p, "ok") == num(&p, "attempts") && during > 0,
        "prod -> prod must keep working during the flood: {} ok of {} ({} during the flood); errors {}",
        num(&p, "ok"),
        num(&p, "attempts"),
        during,
        p["errors"]
    );
    let secs = (t1 - t0) as f64 / 1e9;
    let rates: Vec<String> = reports
        .iter()
        .map(|r| format!("{:.0}", r["rate"].as_f64().unwrap_or(f64::NAN)))
        .collect();
    eprintln!(
        "flood: {sent} violating datagrams from {} processes in {secs:.2} s ({:.0}/s overall; per process/s: {}); \
         reported as {} violation records + {} rollups counting {} + {} lost = {total} (+1 warm-up), \
         {:.1} s after the flood; kernel counter {total}; agent RSS {rss_start} KiB at start, peak {rss_peak} KiB \
         ({samples} samples); prod->prod {}/{} ok, {during} during the flood",
        reports.len(),
        sent as f64 / secs,
        rates.join(", "),
        tally.records,
        tally.rollups,
        tally.rolled_up,
        tally.lost,
        (reported_ns - t1) as f64 / 1e9,
        num(&p, "ok"),
        num(&p, "attempts"),
    );
}

#[test]
fn flood_without_dedup_loses_nothing_silently() {
    // Every attempt is a record (or a counted loss): a small ring buffer,
    // so that some are lost, and fewer attempts, as the test keeps every
    // record it reads.
    const BIG: u32 = 10_000;
    const SMALL: u32 = 1_000;
    const SMALL_PROCS: usize = 10;
    let mut lab = Lab::new(EGPROBE, Mode::Audit);
    lab.spawn_agent(&AgentOptions::ephemeral().ringbuf_bytes(64 * 1024));
    let dst = nowhere_in_prod();
    let dev = lab.client_place(Client::Dev);
    let warm = udp_burst(lab.egprobe(), &dev, dst, 1);
    lab.agent().wait_for("the warm-up datagram", WAIT, |e| {
        e["kind"] == "violation" && e["process"]["pid"] == warm["pid"]
    });
    let sampler = RssSampler::start(lab.agent().pid());
    let t0 = sys::mono_ns();
    let reports: Vec<Value> = std::thread::scope(|s| {
        let mut hs = vec![s.spawn(|| udp_burst(lab.egprobe(), &dev, dst, BIG))];
        for _ in 0..SMALL_PROCS {
            hs.push(s.spawn(|| udp_burst(lab.egprobe(), &dev, dst, SMALL)));
        }
        hs.into_iter()
            .map(|h| h.join().expect("a flood thread"))
            .collect()
    });
    let t1 = sys::mono_ns();
    let sent: u64 = reports.iter().map(|r| num(r, "ok")).sum();
    assert_eq!(
        sent,
        u64::from(BIG) + SMALL_PROCS as u64 * u64::from(SMALL),
        "audit mode never blocks: {reports:?}"
    );
    let total = sent + 1;
    let lines = lab
        .agent()
        .wait_lines(WAIT, |l| Tally::of(l, "dev", dst).total() >= total)
        .unwrap_or_else(|l| l);
    let (rss_peak, samples) = sampler.finish();
    let tally = Tally::of(&lines, "dev", dst);
    assert!(
        tally.total() == total && tally.rollups == 0,
        "without dedup, violation records + lost counts must equal the {total} attempts exactly, with no rollup: {tally:?}"
    );
    let st = lab.status();
    assert_eq!(
        num(pair(&st, "dev", "prod"), "audited"),
        total,
        "the kernel counts every attempt"
    );
    let lines = lab.take_agent().stop_collect();
    assert_gapless(&lines);
    assert_eq!(Tally::of(&lines, "dev", dst), tally, "nothing more at exit");
    assert!(
        rss_peak < 64 * 1024,
        "the agent's RSS must stay under 64 MiB: peak {rss_peak} KiB over {samples} samples"
    );
    eprintln!(
        "flood without dedup: {sent} datagrams from {} processes in {:.2} s -> {} records + {} lost \
         (ring buffer of 64 KiB); agent RSS peak {rss_peak} KiB ({samples} samples)",
        reports.len(),
        (t1 - t0) as f64 / 1e9,
        tally.records,
        tally.lost
    );
}

/// The rollup record fields for dev's repeats to `dst`.
fn assert_rollup(lab: &Lab, r: &Value, mode: Mode, hook: &str, proto: Proto, dst: SocketAddr) {
    let what = "a violation_rollup";
    assert_fields(
        r,
        what,
        &[
            ("mode", mode.name().into()),
            ("verdict", mode.verdict().into()),
            ("direction", "egress".into()),
            ("hook", hook.into()),
            ("proto", proto.name().into()),
            ("source.ip", Value::Null),
            ("source.port", Value::Null),
            ("source.env", "dev".into()),
            ("destination.ip", dst.ip().to_string().into()),
            ("destination.port", dst.port().into()),
            ("destination.env", "prod".into()),
            ("process.cgroup_id", lab.cg.id("dev").into()),
            ("process.cgroup", lab.cg.rel("dev").into()),
            ("host", sys::hostname().into()),
        ],
    );
    assert!(
        r["source"].get("env_from").is_none() && r["destination"].get("env_from").is_none(),
        "{what}: env_from is omitted in rollups: {r}"
    );
    assert!(num(r, "count") > 0, "{what}: a positive count: {r}");
    let t = |f: &str| {
        rfc3339_ns(r[f].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("{what}: {f} is not RFC 3339: {r}"))
    };
    assert!(
        t("first_seen") <= t("last_seen"),
        "{what}: first_seen <= last_seen: {r}"
    );
}

/// Runs `attempts` (which makes `n` identical violating attempts from dev,
/// returning the process's pid) and checks the records and rollups.
/// Returns the time of the latest violation record and the line where it
/// started.
fn check_dedup(
    lab: &Lab,
    n: u64,
    mode: Mode,
    hook: &str,
    proto: Proto,
    dst: SocketAddr,
    attempts: impl FnOnce() -> u64,
) -> (i128, usize) {
    let mark = lab.agent().len();
    let started = Instant::now();
    let pid = attempts();
    let verdict = match mode {
        Mode::Enforce => "denied",
        Mode::Audit => "audited",
    };
    let done = Instant::now();
    let lines = lab
        .agent()
        .wait_lines(REPORT_TIMEOUT, |l| {
            Tally::of(&l[mark.min(l.len())..], "dev", dst).total() >= n
        })
        .unwrap_or_else(|l| l);
    let waited = done.elapsed();
    let lines = &lines[mark.min(lines.len())..];
    let t = Tally::of(lines, "dev", dst);
    let cpus = online_cpus();
    assert!(
        t.total() == n && t.lost == 0 && (1..=cpus).contains(&t.records),
        "{n} identical violating attempts within the dedup interval must give 1 to {cpus} (one per CPU) \
         violation records and rollups adding up to the rest, nothing lost; got {t:?} after {waited:?}:\n{}",
        dump_lines(lines)
    );
    let mut latest: Option<i128> = None;
    for l in lines {
        match l["kind"].as_str() {
            Some("violation") => {
                assert_fields(
                    l,
                    "the reported violation",
                    &[
                        ("process.pid", pid.into()),
                        ("mode", mode.name().into()),
                        ("hook", hook.into()),
                    ],
                );
                let t = rfc3339_ns(l["time"].as_str().unwrap_or_default())
                    .unwrap_or_else(|| panic!("a violation without a time: {l}"));
                latest = latest.max(Some(t));
            }
            Some("violation_rollup") => assert_rollup(lab, l, mode, hook, proto, dst),
            _ => {}
        }
    }
    assert!(
        waited <= REPORT_TIMEOUT,
        "the rollups came {waited:?} after the attempts"
    );
    let st = lab.status();
    let dp = pair(&st, "dev", "prod");
    assert_eq!(
        num(dp, verdict),
        n,
        "the kernel counts every attempt, deduplicated or not: {dp}"
    );
    eprintln!(
        "dedup {mode:?} {hook}: {n} attempts in {:?} -> {} records + {} rollups counting {}; all reported {:?} after the last attempt",
        done - started,
        t.records,
        t.rollups,
        t.rolled_up,
        waited
    );
    (latest.expect("a violation record was checked above"), mark)
}

/// Stops the agent: from `mark` on, the records, rollups and losses to
/// `dst` add up to exactly `n` (nothing is reported twice, even at exit).
fn assert_final_tally(lab: &mut Lab, mark: usize, dst: SocketAddr, n: u64) {
    let lines = lab.take_agent().stop_collect();
    let t = Tally::of(&lines[mark..], "dev", dst);
    assert_eq!(
        t.total(),
        n,
        "after the agent stopped, records + rollups + losses must still be exactly {n}: {t:?}; lines:\n{}",
        dump_lines(&lines[mark..])
    );
    assert_gapless(&lines);
}

#[test]
fn dedup_folds_repeated_datagrams_into_rollups() {
    const N: u32 = 50;
    let mut lab = Lab::new(EGPROBE, Mode::Audit);
    lab.spawn_agent(&AgentOptions::ephemeral().dedup_interval(INTERVAL));
    let dst = nowhere_in_prod();
    let dev = lab.client_place(Client::Dev);
    let (latest_ns, mark) = check_dedup(
        &lab,
        N.into(),
        Mode::Audit,
        "sendmsg4",
        Proto::Udp,
        dst,
        || {
            let r = udp_burst(lab.egprobe(), &dev, dst, N);
            assert!(r["ok"] == N, "audit mode lets all {N} through: {r}");
            num(&r, "pid")
        },
    );

    // Once the interval since the last record has passed, the flow is
    // reported again (its window restarts).
    let deadline = Instant::now() + WAIT;
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now > latest_ns + i128::from(INTERVAL_MS + 100) * 1_000_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the clock does not advance");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = udp_burst(lab.egprobe(), &dev, dst, 1);
    let pid = num(&r, "pid");
    lab.agent().wait_for(
        "a violation record once the dedup interval has passed",
        WAIT,
        |e| e["kind"] == "violation" && e["process"]["pid"] == pid,
    );
    assert_final_tally(&mut lab, mark, dst, u64::from(N) + 1);
}

#[test]
fn dedup_folds_repeated_refused_connects_into_rollups() {
    const N: u32 = 50;
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().dedup_interval(INTERVAL));
    let dst = SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    let dev = lab.client_place(Client::Dev);
    let (_, mark) = check_dedup(
        &lab,
        N.into(),
        Mode::Enforce,
        "connect4",
        Proto::Tcp,
        dst,
        || {
            let r = flows(
                lab.egprobe(),
                &dev,
                N,
                &[FlowSpec {
                    proto: Proto::Tcp,
                    dst,
                }],
            );
            let refused = format!("connect:{}", libc::EPERM);
            assert!(
                r.outcomes[0].len() == N as usize && r.outcomes[0].iter().all(|o| *o == refused),
                "all {N} connects refused with EPERM: {:?}",
                r.outcomes
            );
            u64::from(r.pid)
        },
    );
    assert_final_tally(&mut lab, mark, dst, N.into());
}
