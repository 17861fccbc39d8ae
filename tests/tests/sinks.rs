//! The agent's event sinks end to end, through the real agent (the sinks
//! themselves are tested without it in `envguard-agent/tests/`):
//!
//! - File: `--events-file` holds exactly the lines stdout got (byte for
//!   byte: same `seq`, same `boot_id`); with `--events-file-max-mb 1
//!   --events-file-backups 2` and about 3.5 MiB of records, the files are
//!   exactly what the documented rule makes of stdout's lines (rotate when
//!   the next line would pass the limit; `PATH.1`, `PATH.2` kept, the oldest
//!   dropped, no `PATH.3`), so across the kept files `seq` runs without a
//!   gap or a repeat up to the last record; logrotate's move-then-SIGHUP
//!   loses nothing: the moved file ends just before the SIGHUP's
//!   `policy_loaded` and the new `PATH` (0640) starts with it.
//! - Syslog to a real rsyslogd started by the test (imuxsock with
//!   `UseSpecialParser="off"`, and imudp on loopback): every record the
//!   agent printed on stdout arrives, in order, whole (the message is the
//!   stdout line byte for byte) with facility daemon, the documented
//!   severity, hostname, app-name `envguard`, the agent's pid and the kind as
//!   MSGID; a record too large for one syslog message arrives as its
//!   `oversized_record` stand-in.
//! - A stuck syslog receiver (a unix datagram socket the test binds and
//!   does not read) with `--sink-queue 32` while 300 violations come at
//!   500/s: stdout gets every record (it keeps up; `--sink-queue` bounds
//!   every sink's queue, so an instant burst of hundreds would overflow
//!   stdout's 32 too — counted, but not what this test is about), the syslog
//!   sink's losses are reported as `lost_events` from `queue:syslog`, and
//!   once the test reads the socket, records delivered to syslog + reported
//!   losses == records emitted, exactly, each delivered message being its
//!   stdout line whole and in order; enforcement goes on meanwhile.
//! - `--rate-limit 5 --rate-burst 5` (dedup off): see
//!   [`the_rate_limit_bounds_violation_records_and_accounts_for_every_one`].

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envguard_tests::process::udp_burst;
use envguard_tests::schema_check::validate_line;
use envguard_tests::sinks::{
    Rsyslog, StuckReceiver, TempDir, UDP_LOG, UNIX_LOG, http_get, parse_metrics, parse_rfc5424,
    samples,
};
use envguard_tests::{
    Agent, AgentOptions, Client, Family, Lab, Mode, PolicyExtras, Proto, Site, sys,
};
use serde_json::{Value, json};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const WAIT: Duration = Duration::from_secs(10);
/// Bursts of thousands of records: reported within this long.
const BURST_WAIT: Duration = Duration::from_secs(30);
/// rsyslog's default message size limit, which the agent's sink keeps to.
const SYSLOG_MAX: usize = 8096;

/// In prod's CIDR, but no host has it: dev's datagrams to it are refused.
fn nowhere_in_prod() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 10, 200)), 9999)
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field:?} in {v}"))
}

/// `count` violating datagrams from one dev process, each refused (the lab
/// is in enforce mode and dedup is off, so each is one violation record).
/// Returns the sender's pid.
fn refused_burst(lab: &Lab, count: u64) -> u64 {
    let count32 = u32::try_from(count).expect("a burst fits in u32");
    let r = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        nowhere_in_prod(),
        count32,
    );
    assert!(
        num(&r, "eperm") == count && num(&r, "ok") == 0 && num(&r, "other") == 0,
        "dev -> prod is refused in enforce mode: all {count} sendto calls must fail with EPERM; report: {r}"
    );
    num(&r, "pid")
}

fn violations_of(lines: &[Value], pid: u64) -> usize {
    lines
        .iter()
        .filter(|l| l["kind"] == "violation" && l["process"]["pid"] == pid)
        .count()
}

/// Waits until the agent printed `n` violation records of `pid`.
fn wait_violations(agent: &Agent, pid: u64, n: u64, timeout: Duration) {
    let n = usize::try_from(n).expect("fits");
    if let Err(lines) = agent.wait_lines(timeout, |l| violations_of(l, pid) >= n) {
        panic!(
            "the agent printed {} of the {n} violation records of pid {pid} within {timeout:?}; stderr:\n{}",
            violations_of(&lines, pid),
            agent.stderr()
        );
    }
}

/// The lines of a file, without their newlines; panics if it cannot be read.
fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `path` with `.suffix` appended.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{suffix}"));
    PathBuf::from(s)
}

fn seq_of(line: &str) -> String {
    serde_json::from_str::<Value>(line)
        .map(|v| v["seq"].to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Panics unless `got` and `want` are the same lines, saying how they
/// differ (counts, first difference, `seq` at either end) rather than
/// printing thousands of lines.
fn assert_same_lines(what: &str, got: &[String], want: &[String]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let ends = |l: &[String]| {
        format!(
            "{} lines, seq {}..={}",
            l.len(),
            l.first().map_or("-".into(), |x| seq_of(x)),
            l.last().map_or("-".into(), |x| seq_of(x))
        )
    };
    panic!(
        "{what}: got {}, expected {}; first difference at line {first}:\n  got:      {}\n  expected: {}",
        ends(got),
        ends(want),
        got.get(first).map_or("(none)", String::as_str),
        want.get(first).map_or("(none)", String::as_str),
    );
}

fn file_mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The file sink's documented rule applied to `lines`: a line goes to the
/// current file unless that file is not empty and the line would take it
/// past `max_bytes`; then the file is rotated and a new one started.
/// Returns each file's lines, oldest first.
fn rotated(lines: &[String], max_bytes: u64) -> Vec<Vec<String>> {
    let mut files: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0u64;
    for l in lines {
        let len = l.len() as u64 + 1;
        if size > 0 && size + len > max_bytes {
            files.push(Vec::new());
            size = 0;
        }
        size += len;
        files.last_mut().expect("one file at least").push(l.clone());
    }
    files
}

fn lost_events(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["kind"] == "lost_events")
        .collect()
}

#[test]
fn the_events_file_matches_stdout_and_rotates_without_losing_or_repeating_a_record() {
    const MAX_MB: u64 = 1;
    const MAX: u64 = MAX_MB << 20;
    const BACKUPS: u32 = 2;
    let dir = TempDir::new();
    let path = dir.join("events.log");
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral().events_file(&path, Some(MAX_MB), Some(BACKUPS)));
    assert_eq!(
        file_mode(&path),
        0o640,
        "the events file is created mode 0640"
    );

    // One record sizes the burst: enough for BACKUPS + 1 full files and
    // half of another, so the oldest file has to be dropped.
    let pid = refused_burst(&lab, 1);
    wait_violations(lab.agent(), pid, 1, WAIT);
    let last = lab.agent().len() - 1;
    let len = lab.agent().raw_lines(last..last + 1)[0].len() as u64 + 1;
    let n = ((u64::from(BACKUPS) + 1) * MAX + MAX / 2) / len + 1;
    let t0 = Instant::now();
    let pid = refused_burst(&lab, n);
    wait_violations(lab.agent(), pid, n, BURST_WAIT);
    let took = t0.elapsed();
    let (raw, lines) = lab.take_agent().stop_collect_raw();
    assert!(
        lost_events(&lines).is_empty(),
        "nothing may be lost in this test: {:?}",
        lost_events(&lines)
    );

    let expected = rotated(&raw, MAX);
    let kept = BACKUPS as usize + 1;
    assert!(
        expected.len() > kept,
        "the test must write enough to drop the oldest file: {} records of up to {len} bytes make {} files",
        raw.len(),
        expected.len()
    );
    let names: Vec<PathBuf> = (1..=BACKUPS)
        .rev()
        .map(|i| with_suffix(&path, &i.to_string()))
        .chain([path.clone()])
        .collect();
    let over = with_suffix(&path, &(BACKUPS + 1).to_string());
    assert!(
        !over.exists(),
        "--events-file-backups {BACKUPS} keeps {BACKUPS} rotated files; {} exists",
        over.display()
    );
    let mut all_kept = Vec::new();
    for (name, want) in names.iter().zip(&expected[expected.len() - kept..]) {
        let got = file_lines(name);
        let size = std::fs::metadata(name).map_or(0, |m| m.len());
        assert!(
            size <= MAX,
            "{} is {size} bytes, over --events-file-max-mb {MAX_MB}",
            name.display()
        );
        assert_same_lines(
            &format!(
                "{} (stdout's lines, rotated by the documented rule)",
                name.display()
            ),
            &got,
            want,
        );
        all_kept.extend(got);
    }
    // So across the kept files: gapless, no repeat, up to the last record.
    let seqs: Vec<u64> = all_kept
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("checked equal to stdout's");
            num(&v, "seq")
        })
        .collect();
    let first = seqs[0];
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == first + i as u64)
            && *seqs.last().expect("lines") == raw.len() as u64 - 1,
        "seq across {names:?} must run from {first} to the last record without a gap or a repeat"
    );
    eprintln!(
        "events file: {} records ({n} in the burst, reported within {took:?}) of up to {len} bytes \
         made {} files of 1 MiB; the {kept} newest kept",
        raw.len(),
        expected.len()
    );
}

#[test]
fn the_events_file_follows_logrotate_move_then_sighup() {
    let dir = TempDir::new();
    let path = dir.join("events.log");
    let moved = dir.join("events.log-rotated");
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral().events_file(&path, None, None));
    let agent = lab.agent();
    // Waits until the file at `p` holds every line stdout got so far: the
    // file sink has caught up and is idle.
    let caught_up = |p: &Path, from: usize| {
        let deadline = Instant::now() + WAIT;
        loop {
            let want = agent.len() - from;
            let got = file_lines(p).len();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} holds {got} lines, stdout {want}, after {WAIT:?}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    let pid = refused_burst(&lab, 10);
    wait_violations(agent, pid, 10, WAIT);
    caught_up(&path, 0);
    // logrotate: move the file away...
    std::fs::rename(&path, &moved).expect("rename the events file");
    // ...records keep going to the moved file until the agent reopens...
    let pid = refused_burst(&lab, 10);
    wait_violations(agent, pid, 10, WAIT);
    caught_up(&moved, 0);
    // ...on SIGHUP (which also reloads the unchanged policy).
    agent.sighup();
    let (k, _) = agent.wait_for("policy_loaded after SIGHUP", WAIT, |l| {
        l["kind"] == "policy_loaded" && l["actor"]["comm"] == "SIGHUP"
    });
    let pid = refused_burst(&lab, 10);
    wait_violations(agent, pid, 10, WAIT);
    caught_up(&path, k);
    let (raw, lines) = lab.take_agent().stop_collect_raw();
    assert!(
        lost_events(&lines).is_empty(),
        "nothing may be lost: {:?}",
        lost_events(&lines)
    );
    // The sink was idle when SIGHUP came, so the SIGHUP's own record is the
    // first one in the reopened file.
    assert_same_lines(
        "the moved file (everything before the SIGHUP's policy_loaded)",
        &file_lines(&moved),
        &raw[..k],
    );
    assert_same_lines(
        "the new file (from the SIGHUP's policy_loaded on)",
        &file_lines(&path),
        &raw[k..],
    );
    assert_eq!(file_mode(&path), 0o640, "the reopened file is created 0640");
}

/// The RFC 5424 severity the README documents for a kind.
fn severity(kind: &str) -> u8 {
    if kind == "violation" || kind == "violation_rollup" {
        4
    } else {
        5
    }
}

/// `2026-11-23T10:45:47.852301113Z` → `2026-11-23T10:45:47.852301Z`.
fn micros(time: &str) -> String {
    format!("{}Z", &time[..26])
}

/// What the syslog sink puts before the record (its length decides
/// whether the record fits in one message).
fn syslog_header(rec: &Value, pid: u32) -> String {
    let kind = rec["kind"].as_str().unwrap_or_default();
    format!(
        "<{}>1 {} {} envguard {pid} {kind} - ",
        3 * 8 + severity(kind),
        micros(rec["time"].as_str().unwrap_or_default()),
        sys::hostname()
    )
}

/// The stand-in the syslog sink sends for a record too large for one message.
fn oversized(rec: &Value, raw: &str) -> Value {
    json!({
        "kind": "oversized_record",
        "time": rec["time"], "seq": rec["seq"], "boot_id": rec["boot_id"], "host": rec["host"],
        "original_kind": rec["kind"], "bytes": raw.len(), "limit": SYSLOG_MAX,
    })
}

/// Records of every kind an operator sees day to day: refused TCP connects
/// (IPv4 and IPv6) and datagrams, two mode changes, a good reload and a
/// rejected one whose error list is too large for one syslog message.
fn varied_records(lab: &Lab) {
    for fam in [Family::V4, Family::V6] {
        let dst = SocketAddr::new(Site::Prod.addr(fam), 9000);
        let r = lab.probe(Client::Dev, Proto::Tcp, dst, 3000);
        assert!(
            r.is_refused(),
            "dev -> prod {dst} must be refused: {}",
            r.raw
        );
    }
    let pid = refused_burst(lab, 5);
    wait_violations(lab.agent(), pid, 5, WAIT);
    for mode in ["audit", "enforce"] {
        lab.cli(&["mode", mode])
            .assert_ok(&format!("envguard mode {mode}"));
    }
    lab.set_policy(&PolicyExtras {
        dev: "# reloaded\n".into(),
        ..PolicyExtras::default()
    });
    lab.cli(&["reload"]).assert_ok("envguard reload");
    // 150 rules naming unknown envs: an error line each, ~12 KB in all.
    let bad_rules: String = (0..150)
        .map(|i| format!("[[allow]]\nfrom = \"no-such-env-{i}\"\nto = \"dev\"\n\n"))
        .collect();
    lab.write_policy_raw(&lab.policy_text(&PolicyExtras {
        allow: bad_rules,
        ..PolicyExtras::default()
    }));
    lab.cli(&["reload"])
        .assert_failed("envguard reload of a bad policy");
    lab.set_policy(&PolicyExtras::default());
}

/// Checks what rsyslogd wrote for one agent run against its stdout lines.
fn check_received(
    what: &str,
    got: &[envguard_tests::sinks::Received],
    raw: &[String],
    lines: &[Value],
    pid: u32,
) {
    assert_eq!(
        got.len(),
        raw.len(),
        "{what}: rsyslogd must receive every one of the {} records the agent printed; it wrote {}",
        raw.len(),
        got.len()
    );
    let mut stand_ins = 0;
    for (i, ((m, line), rec)) in got.iter().zip(raw).zip(lines).enumerate() {
        let kind = rec["kind"].as_str().unwrap_or_default();
        let fields = [
            ("facility", m.facility.as_str(), "3".to_owned()),
            ("severity", m.severity.as_str(), severity(kind).to_string()),
            ("hostname", m.hostname.as_str(), sys::hostname()),
            ("app-name", m.app_name.as_str(), "envguard".to_owned()),
            ("procid", m.procid.as_str(), pid.to_string()),
            ("msgid", m.msgid.as_str(), kind.to_owned()),
            (
                "structured-data",
                m.structured_data.as_str(),
                "-".to_owned(),
            ),
        ];
        let wrong: Vec<String> = fields
            .iter()
            .filter(|(_, g, w)| g != w)
            .map(|(f, g, w)| format!("{f}: expected {w:?}, got {g:?}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "{what}: message {i} (seq {}): {}\n  message: {m:?}",
            rec["seq"],
            wrong.join("; ")
        );
        if syslog_header(rec, pid).len() + line.len() > SYSLOG_MAX {
            stand_ins += 1;
            let v = validate_line(&m.msg)
                .unwrap_or_else(|e| panic!("{what}: message {i}: the stand-in: {e}"));
            assert_eq!(
                v,
                oversized(rec, line),
                "{what}: message {i}: a {}-byte {kind} record arrives as its oversized_record stand-in",
                line.len()
            );
        } else {
            assert!(
                m.msg == *line,
                "{what}: message {i} must be the stdout line, whole:\n  got:      {}\n  expected: {line}",
                m.msg
            );
        }
    }
    assert_eq!(
        stand_ins, 1,
        "{what}: exactly the rejected policy's record is too large for syslog"
    );
}

#[test]
fn syslog_records_reach_a_real_rsyslog_whole_over_unix_and_udp() {
    let rsyslog = Rsyslog::start();
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    for (target, file) in [
        (rsyslog.unix_target(), UNIX_LOG),
        (rsyslog.udp_target(), UDP_LOG),
    ] {
        let before = rsyslog.received(file).len();
        lab.spawn_agent(&AgentOptions::ephemeral().syslog(&target));
        let pid = lab.agent().pid();
        varied_records(&lab);
        let (raw, lines) = lab.take_agent().stop_collect_raw();
        assert!(
            lost_events(&lines).is_empty(),
            "--syslog {target}: nothing may be lost: {:?}",
            lost_events(&lines)
        );
        let kinds: BTreeSet<&str> = lines.iter().filter_map(|l| l["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            BTreeSet::from([
                "mode_change",
                "policy_loaded",
                "policy_rejected",
                "violation"
            ]),
            "the workload's record kinds"
        );
        let got = rsyslog.wait_received(file, before + raw.len(), Duration::from_secs(20));
        check_received(
            &format!("--syslog {target}"),
            &got[before.min(got.len())..],
            &raw,
            &lines,
            pid,
        );
    }
}

#[test]
fn a_stuck_syslog_receiver_loses_only_its_own_records_and_says_how_many() {
    const ATTEMPTS: u64 = 300;
    const RATE: u32 = 500;
    const QUEUE: usize = 32;
    let dir = TempDir::new();
    let mut receiver = StuckReceiver::bind(&dir.join("stuck.sock"));
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    lab.spawn_agent(
        &AgentOptions::ephemeral()
            .syslog(&receiver.target())
            .sink_queue(QUEUE),
    );
    let agent = lab.agent();
    let agent_pid = agent.pid();

    let prod = |port| SocketAddr::new(Site::Prod.addr(Family::V4), port);
    let lp = lab.connect_loop(Client::Dev, prod(9000), RATE);
    lp.wait_attempts(ATTEMPTS, WAIT);
    let summary = lp.finish();
    let attempts = num(&summary, "attempts");
    assert_eq!(
        num(&summary, "eperm"),
        attempts,
        "every dev -> prod connect is refused: {summary}"
    );
    let pid = num(&summary, "pid");
    wait_violations(agent, pid, attempts, BURST_WAIT);
    let (_, first_loss) = agent.wait_for("a queue:syslog loss report", WAIT, |l| {
        l["kind"] == "lost_events" && l["source"] == "queue:syslog"
    });
    assert!(
        num(&first_loss, "count") > 0,
        "a loss report counts at least one record: {first_loss}"
    );
    // Enforcement does not wait for the stuck sink.
    let refused = lab.probe(Client::Dev, Proto::Tcp, prod(9000), 3000);
    assert!(
        refused.is_refused(),
        "dev -> prod stays refused while the syslog sink is stuck: {}",
        refused.raw
    );
    let allowed = lab.probe(Client::Prod, Proto::Tcp, prod(9000), 3000);
    assert!(
        allowed.ok,
        "prod -> prod keeps working while the syslog sink is stuck: {}",
        allowed.raw
    );

    // Unstick it: what was not lost arrives, and the accounts balance.
    receiver.start_reading();
    let syslog_lost = |lines: &[Value]| -> u64 {
        lines
            .iter()
            .filter(|l| l["kind"] == "lost_events" && l["source"] == "queue:syslog")
            .map(|l| num(l, "count"))
            .sum()
    };
    let balanced =
        |emitted: usize, lost: u64| receiver.received().len() as u64 + lost == emitted as u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines = agent.lines(0..agent.len());
        if balanced(lines.len(), syslog_lost(&lines)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records delivered to syslog ({}) + reported syslog losses ({}) must come to the {} records emitted",
            receiver.received().len(),
            syslog_lost(&lines),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (raw, lines) = lab.take_agent().stop_collect_raw();
    let lost = syslog_lost(&lines);
    // What the agent printed while stopping arrives too.
    let deadline = Instant::now() + WAIT;
    while !balanced(raw.len(), lost) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let delivered = receiver.received();
    assert_eq!(
        delivered.len() as u64 + lost,
        raw.len() as u64,
        "after the agent stopped: records delivered to syslog ({}) + reported syslog losses ({lost}) == records emitted ({})",
        delivered.len(),
        raw.len()
    );
    assert!(
        lost > attempts / 2,
        "a queue of {QUEUE} behind a receiver that does not read loses most of {attempts} records; reported {lost}"
    );
    // stdout lost nothing (the harness checks seq is gapless too).
    let other_losses: Vec<&Value> = lost_events(&lines)
        .into_iter()
        .filter(|l| l["source"] != "queue:syslog")
        .collect();
    assert!(
        other_losses.is_empty(),
        "only the syslog sink may lose records: {other_losses:?}"
    );
    assert_eq!(
        violations_of(&lines, pid) as u64,
        attempts,
        "stdout has a violation record for every refused attempt"
    );
    // Each delivered message is its stdout line, whole, in order.
    let mut last_seq = None;
    for (i, d) in delivered.iter().enumerate() {
        let m = parse_rfc5424(d).unwrap_or_else(|e| panic!("syslog datagram {i}: {e}"));
        let v: Value = serde_json::from_str(&m.msg).unwrap_or_else(|e| {
            panic!(
                "syslog datagram {i}: the message does not parse ({e}): {}",
                m.msg
            )
        });
        let seq = usize::try_from(num(&v, "seq")).expect("fits");
        assert!(
            last_seq.is_none_or(|l| seq > l),
            "syslog datagram {i}: seq {seq} after {last_seq:?}: records arrive in order"
        );
        last_seq = Some(seq);
        let rec = &lines[seq];
        assert!(
            m.msg == raw[seq],
            "syslog datagram {i} must be stdout line {seq}, whole:\n  got:      {}\n  expected: {}",
            m.msg,
            raw[seq]
        );
        let kind = rec["kind"].as_str().unwrap_or_default();
        let header = [
            (
                "pri",
                m.pri.to_string(),
                (3 * 8 + severity(kind)).to_string(),
            ),
            (
                "timestamp",
                m.timestamp.clone(),
                micros(rec["time"].as_str().unwrap_or_default()),
            ),
            ("hostname", m.hostname.clone(), sys::hostname()),
            ("app-name", m.app_name.clone(), "envguard".into()),
            ("procid", m.procid.clone(), agent_pid.to_string()),
            ("msgid", m.msgid.clone(), kind.into()),
            ("structured-data", m.structured_data.clone(), "-".into()),
        ];
        for (field, got, want) in header {
            assert_eq!(got, want, "syslog datagram {i} (seq {seq}): {field}");
        }
    }
    eprintln!(
        "stuck syslog receiver: {} records emitted, {} delivered to syslog, {lost} reported lost from queue:syslog",
        raw.len(),
        delivered.len()
    );
}

/// The value of one metric sample, or 0 if it is absent.
fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let body = http_get(addr, "/metrics").body;
    let all = parse_metrics(&body);
    samples(&all, name, labels)
        .iter()
        .fold(0.0, |sum, s| sum + s.value)
}

/// `--rate-limit 5 --rate-burst 5`, dedup off, enforce mode. What the
/// agent guarantees (`ratelimit.rs`, `events.rs`), and what is checked:
///
/// - only `violation` records are limited: a token bucket of 5, refilled
///   at 5 a second, full at start; so in any window of `t` seconds at most
///   `5 + 5·t` violation records go out — checked over the window from just
///   before a burst of 200 refused datagrams to when the last of its
///   records reached the test;
/// - every violation the bucket holds back is counted: the next violation
///   record that goes out carries `"suppressed": N`, the number held back
///   since the previous one, and `envguard_events_suppressed_total`
///   counts them all; so at any moment
///   `violation records + Σ suppressed + pending == violations`, where
///   `pending` (held back, not yet reported in a record) is the metric minus
///   `Σ suppressed` — checked exactly after the burst (pending > 0), and
///   after one more violation got through once the bucket refilled
///   (pending == 0: that record carries everything held back);
/// - `seq` counts emitted records only, so it has no gap (the harness
///   checks it), and other records pass while the bucket is empty (three
///   reloads' `policy_loaded` right after the burst);
/// - NOT guaranteed: violations still pending when the agent stops appear
///   in no record (the agent does not report them at exit).
#[test]
fn the_rate_limit_bounds_violation_records_and_accounts_for_every_one() {
    const RATE: f64 = 5.0;
    const BURST_TOKENS: u64 = 5;
    const N: u64 = 200;
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(
        &AgentOptions::ephemeral()
            .rate_limit("5", 5)
            .metrics_listen("127.0.0.1:0"),
    );
    let agent = lab.agent();
    let addr = agent.metrics_addr();

    let t0 = Instant::now();
    let pid = refused_burst(&lab, N);
    // The kernel saw every attempt...
    let kernel_denied = || {
        metric(
            addr,
            "envguard_decisions_total",
            &[
                ("src_env", "dev"),
                ("dst_env", "prod"),
                ("verdict", "denied"),
            ],
        )
    };
    // ...and the agent reports every one: a violation record, or counted in
    // the `suppressed` field of the next record that goes out, or in a
    // `violations_suppressed` record (at the next housekeeping tick, within
    // about a second, so nothing stays pending).
    let accounted = |lines: &[Value]| {
        let records = violations_of(lines, pid) as u64;
        let fields: u64 = lines
            .iter()
            .filter(|l| l["kind"] == "violation")
            .map(|l| l["suppressed"].as_u64().unwrap_or(0))
            .sum();
        let summaries: u64 = lines
            .iter()
            .filter(|l| l["kind"] == "violations_suppressed")
            .map(|l| l["count"].as_u64().unwrap_or(0))
            .sum();
        (records, fields, summaries)
    };
    let deadline = Instant::now() + WAIT;
    let (records, fields, summaries) = loop {
        let lines = agent.lines(0..agent.len());
        let (r, f, s) = accounted(&lines);
        if r + f + s == N && kernel_denied() == N as f64 {
            break (r, f, s);
        }
        assert!(
            Instant::now() < deadline,
            "after {WAIT:?}: {r} violation records + {f} in suppressed fields + {s} in violations_suppressed must be {N}; kernel denied {}",
            kernel_denied()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        summaries > 0,
        "a burst of {N} leaves violations held back, reported by violations_suppressed"
    );
    assert_eq!(
        metric(addr, "envguard_events_suppressed_total", &[]) as u64,
        fields + summaries,
        "envguard_events_suppressed_total counts every held-back violation"
    );
    let lines = agent.lines(0..agent.len());
    let burst_records: Vec<(usize, &Value)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l["kind"] == "violation")
        .collect();
    let (last_at, _) = *burst_records
        .last()
        .expect("some violation records went out");
    let window = agent
        .received_at(last_at)
        .expect("received")
        .duration_since(t0)
        .as_secs_f64();
    let bound = BURST_TOKENS + (RATE * window).floor() as u64;
    assert!(
        (BURST_TOKENS..=bound).contains(&records),
        "the bucket lets {BURST_TOKENS} through at once and {RATE}/s after: {records} violation records in {window:.3} s \
         (at most {bound})"
    );
    for (i, (_, l)) in burst_records.iter().enumerate().take(BURST_TOKENS as usize) {
        assert!(
            l.get("suppressed").is_none(),
            "violation record {i} of the burst took a token of the full bucket: nothing held back before it: {l}"
        );
    }
    assert_eq!(
        metric(
            addr,
            "envguard_events_emitted_total",
            &[("kind", "violation")]
        ),
        records as f64,
        "envguard_events_emitted_total{{kind=\"violation\"}}"
    );

    // Other records are not limited, even with the bucket empty.
    let mark = agent.len();
    for _ in 0..3 {
        lab.cli(&["reload"]).assert_ok("envguard reload");
    }
    let reloads = |l: &[Value]| {
        l[mark..]
            .iter()
            .filter(|e| e["kind"] == "policy_loaded")
            .count()
    };
    if let Err(l) = agent.wait_lines(WAIT, |l| reloads(l) >= 3) {
        panic!(
            "every reload's policy_loaded goes out, rate limit or not: {} of 3",
            reloads(&l)
        );
    }
    let lines = lab.take_agent().stop_collect();
    let (r, f, s) = accounted(&lines);
    assert_eq!(
        r + f + s,
        N,
        "after stop: violation records ({r}) + suppressed fields ({f}) + violations_suppressed ({s}) == the {N} violations"
    );
    eprintln!(
        "rate limit 5/s burst 5: {records} of {N} records in {window:.3} s, {fields} reported in suppressed fields, \
         {summaries} in violations_suppressed records"
    );
}
