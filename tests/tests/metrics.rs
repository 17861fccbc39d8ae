//! The Prometheus endpoint of a real agent (`--metrics-listen
//! 127.0.0.1:0`, its port found through /proc): after k refused dev→prod
//! TCP connects (both families), j refused dev→prod datagrams and m allowed
//! prod→prod connections, `envguard_decisions_total` says exactly k, j and m
//! for those label sets (and nothing else for dev→prod), and after a switch
//! to audit mode, a audited datagrams are counted as `audited`/`audit`;
//! `envguard_events_emitted_total` equals the records the agent printed,
//! kind by kind; nothing is lost or suppressed; `envguard_build_info` carries
//! `envguard --version`'s version; `envguard_policy_revision` is 1, bumps on
//! `envguard reload` and on SIGHUP, and stays put for a rejected file; the
//! process metrics are plausible (RSS against /proc, start time, fds); the
//! answer is `200` with the text format's content type (404 elsewhere); and
//! `promtool check metrics` accepts every scrape.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envguard_tests::process::udp_burst;
use envguard_tests::sinks::{Sample, http_get, parse_metrics, promtool_check, samples};
use envguard_tests::{
    Agent, AgentOptions, Client, Family, Lab, Mode, PolicyExtras, Proto, Site, sys,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const WAIT: Duration = Duration::from_secs(10);
/// The agent refreshes what it serves once a second.
const METRICS_WAIT: Duration = Duration::from_secs(5);

/// One scrape: the body (checked by promtool) and its samples.
struct Scrape {
    body: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn take(addr: SocketAddr) -> Scrape {
        let r = http_get(addr, "/metrics");
        assert!(
            r.status_line.starts_with("HTTP/1.1 200"),
            "GET /metrics: {} {:?}",
            r.status_line,
            r.body
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "GET /metrics: the text format's content type"
        );
        if let Err(e) = promtool_check(&r.body) {
            panic!("{e}\non:\n{}", r.body);
        }
        let samples = parse_metrics(&r.body);
        Scrape {
            body: r.body,
            samples,
        }
    }

    /// The sum of the samples `name{labels...}` (0 if there is none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        samples(&self.samples, name, labels)
            .iter()
            .fold(0.0, |sum, s| sum + s.value)
    }

    fn one(&self, name: &str) -> &Sample {
        match samples(&self.samples, name, &[]).as_slice() {
            [one] => one,
            other => panic!(
                "{name}: expected exactly one sample, got {other:?}\n{}",
                self.body
            ),
        }
    }
}

/// Scrapes until `want` holds for a scrape (the agent refreshes its numbers
/// every second); returns that scrape, or panics with `what` and the last one.
fn scrape_until(addr: SocketAddr, what: &str, want: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + METRICS_WAIT;
    loop {
        let s = Scrape::take(addr);
        if want(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "after {METRICS_WAIT:?} the metrics still do not show {what}:\n{}",
            s.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The records the agent printed so far, per kind.
fn kinds(agent: &Agent) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in agent.lines(0..agent.len()) {
        *out.entry(l["kind"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1.0;
    }
    out
}

fn emitted(s: &Scrape) -> BTreeMap<String, f64> {
    samples(&s.samples, "envguard_events_emitted_total", &[])
        .iter()
        .map(|x| (x.labels.get("kind").cloned().unwrap_or_default(), x.value))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn decision<'a>(
    src: &'a str,
    dst: &'a str,
    verdict: &'a str,
    mode: &'a str,
    proto: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("src_env", src),
        ("dst_env", dst),
        ("verdict", verdict),
        ("mode", mode),
        ("direction", "egress"),
        ("proto", proto),
    ]
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field:?} in {v}"))
}

/// `envguard --version`'s version: its first line, `envguard-agent 0.1.0` →
/// `0.1.0` (commit, layout and target follow on lines of their own).
fn agent_version() -> String {
    let out = std::process::Command::new(sys::envguard_bin())
        .arg("--version")
        .output()
        .expect("run envguard --version");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn metrics_count_decisions_and_records_exactly_and_pass_promtool() {
    const K: usize = 6;
    const J: u64 = 4;
    const M: usize = 5;
    const A: u64 = 3;
    let before_start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().metrics_listen("127.0.0.1:0"));
    let agent = lab.agent();
    let addr = agent.metrics_addr();
    assert!(
        addr.ip().is_loopback(),
        "--metrics-listen 127.0.0.1:0 listens on loopback: {addr}"
    );

    let first = scrape_until(addr, "policy revision 1", |s| {
        s.value("envguard_policy_revision", &[]) == 1.0
    });
    let build = first.one("envguard_build_info");
    assert_eq!(
        (build.labels.get("version").cloned(), build.value),
        (Some(agent_version()), 1.0),
        "envguard_build_info{{version=<envguard --version>}} 1"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let start = first.one("process_start_time_seconds").value;
    assert!(
        (before_start - 1.0..=now + 1.0).contains(&start),
        "process_start_time_seconds {start} must fall while the test started the agent ({before_start}..{now})"
    );
    let rss = first.one("process_resident_memory_bytes").value;
    let vm_rss = agent.rss_kib().expect("VmRSS") as f64 * 1024.0;
    assert!(
        rss > 0.0 && rss / vm_rss < 2.0 && vm_rss / rss < 2.0,
        "process_resident_memory_bytes {rss} must be about the agent's VmRSS {vm_rss}"
    );
    let fds = first.one("process_open_fds").value;
    let proc_fds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .map(|d| d.count())
        .unwrap_or(0) as f64;
    assert!(
        fds >= 5.0 && (fds - proc_fds).abs() <= 5.0,
        "process_open_fds {fds} must be about /proc/{}/fd's {proc_fds}",
        agent.pid()
    );
    assert!(
        first.one("process_cpu_seconds_total").value >= 0.0,
        "process_cpu_seconds_total"
    );

    // Traffic: k refused TCP connects (both families), j refused datagrams,
    // m allowed connections.
    let prod = |fam, port| SocketAddr::new(Site::Prod.addr(fam), port);
    for i in 0..K {
        let fam = if i % 2 == 0 { Family::V4 } else { Family::V6 };
        let r = lab.probe(Client::Dev, Proto::Tcp, prod(fam, 9000), 3000);
        assert!(r.is_refused(), "dev -> prod must be refused: {}", r.raw);
    }
    let burst = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        prod(Family::V4, 9000),
        u32::try_from(J).expect("small"),
    );
    assert_eq!(num(&burst, "eperm"), J, "refused datagrams: {burst}");
    for _ in 0..M {
        let r = lab.probe(Client::Prod, Proto::Tcp, prod(Family::V4, 9000), 3000);
        assert!(r.ok, "prod -> prod must connect: {}", r.raw);
    }
    let violations = K + J as usize;
    agent
        .wait_lines(WAIT, |l| {
            l.iter().filter(|e| e["kind"] == "violation").count() >= violations
        })
        .unwrap_or_else(|l| panic!("{violations} violation records expected; got {l:?}"));

    let want = [
        (
            decision("dev", "prod", "denied", "enforce", "tcp"),
            K as f64,
        ),
        (
            decision("dev", "prod", "denied", "enforce", "udp"),
            J as f64,
        ),
        (
            decision("prod", "prod", "allowed", "enforce", "tcp"),
            M as f64,
        ),
    ];
    let s = scrape_until(addr, "the traffic's decisions and records", |s| {
        want.iter()
            .all(|(l, n)| s.value("envguard_decisions_total", l) == *n)
            && emitted(s) == kinds(agent)
    });
    let dev_prod = samples(
        &s.samples,
        "envguard_decisions_total",
        &[("src_env", "dev"), ("dst_env", "prod")],
    );
    assert_eq!(
        dev_prod.iter().fold(0.0, |sum, x| sum + x.value),
        violations as f64,
        "dev -> prod decisions are exactly the refused ones: {dev_prod:?}"
    );
    assert_eq!(
        emitted(&s).get("violation").copied(),
        Some(violations as f64),
        "envguard_events_emitted_total{{kind=\"violation\"}} == the violation records printed"
    );
    let lost: f64 = s.value("envguard_events_lost_total", &[]);
    assert_eq!(lost, 0.0, "nothing was lost:\n{}", s.body);
    assert_eq!(
        s.one("envguard_events_suppressed_total").value,
        0.0,
        "no rate limit, nothing suppressed"
    );

    // Audit mode: violating datagrams pass and are counted as audited.
    lab.cli(&["mode", "audit"]).assert_ok("envguard mode audit");
    let burst = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        prod(Family::V4, 9000),
        u32::try_from(A).expect("small"),
    );
    assert_eq!(
        num(&burst, "ok"),
        A,
        "audit mode lets them through: {burst}"
    );
    let audited = decision("dev", "prod", "audited", "audit", "udp");
    let s = scrape_until(addr, "the audited datagrams", |s| {
        s.value("envguard_decisions_total", &audited) == A as f64 && emitted(s) == kinds(agent)
    });
    for (l, n) in &want[..2] {
        assert_eq!(
            s.value("envguard_decisions_total", l),
            *n,
            "a counter keeps its value across a mode switch: {l:?}"
        );
    }
    lab.cli(&["mode", "enforce"])
        .assert_ok("envguard mode enforce");

    // Reloads bump the revision; a rejected file does not.
    lab.set_policy(&PolicyExtras {
        dev: "# reloaded\n".into(),
        ..PolicyExtras::default()
    });
    lab.cli(&["reload"]).assert_ok("envguard reload");
    scrape_until(addr, "policy revision 2 after envguard reload", |s| {
        s.value("envguard_policy_revision", &[]) == 2.0
    });
    lab.write_policy_raw("mode = \"enforce\"\n[envs.dev\n");
    lab.cli(&["reload"])
        .assert_failed("envguard reload of a broken file");
    let s = scrape_until(addr, "the rejected reload's record", |s| {
        s.value(
            "envguard_events_emitted_total",
            &[("kind", "policy_rejected")],
        ) == 1.0
    });
    assert_eq!(
        s.value("envguard_policy_revision", &[]),
        2.0,
        "a rejected file loads nothing: the revision stays"
    );
    lab.set_policy(&PolicyExtras::default());
    agent.sighup();
    scrape_until(
        addr,
        "policy revision 3 after SIGHUP, and envguard_events_emitted_total == the records printed, kind by kind",
        |s| s.value("envguard_policy_revision", &[]) == 3.0 && emitted(s) == kinds(agent),
    );

    let r = http_get(addr, "/nope");
    assert!(
        r.status_line.starts_with("HTTP/1.1 404"),
        "GET /nope: {}",
        r.status_line
    );
    lab.stop_agent();
}

/// A Prometheus counter series must not vanish or move while the process
/// lives: the m allowed prod→prod connections made in enforce mode stay
/// counted under `mode="enforce"` after a switch to audit mode (and the
/// audit-mode series, if any, counts only what happened in audit mode).
#[test]
fn an_allowed_decision_counter_keeps_its_labels_across_a_mode_switch() {
    const M: usize = 3;
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    lab.spawn_agent(&AgentOptions::ephemeral().metrics_listen("127.0.0.1:0"));
    let addr = lab.agent().metrics_addr();
    let dst = SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    for _ in 0..M {
        let r = lab.probe(Client::Prod, Proto::Tcp, dst, 3000);
        assert!(r.ok, "prod -> prod must connect: {}", r.raw);
    }
    let enforce = decision("prod", "prod", "allowed", "enforce", "tcp");
    scrape_until(addr, "the allowed connections", |s| {
        s.value("envguard_decisions_total", &enforce) == M as f64
    });
    lab.cli(&["mode", "audit"]).assert_ok("envguard mode audit");
    // Numbers refreshed after the switch: its record is counted.
    let s = scrape_until(addr, "the mode_change record", |s| {
        s.value("envguard_events_emitted_total", &[("kind", "mode_change")]) == 1.0
    });
    let prod_prod = samples(
        &s.samples,
        "envguard_decisions_total",
        &[("src_env", "prod"), ("dst_env", "prod")],
    );
    assert_eq!(
        s.value("envguard_decisions_total", &enforce),
        M as f64,
        "the {M} allowed decisions taken in enforce mode must stay counted under mode=\"enforce\" \
         after `envguard mode audit` (no decision was taken in audit mode); prod -> prod series now: {prod_prod:?}"
    );
    lab.stop_agent();
}
