//! The watchdog: per env, `on_agent_loss = "keep" | "open" | "closed"` and
//! `agent_loss_timeout`. The agent writes a heartbeat every second; once it
//! is older than an env's timeout the kernel applies that env's fail mode to
//! new flows involving the env, the stricter side of a pair winning
//! (`closed` > `keep` > `open`: a pair opens only when both sides fail open,
//! see also `adversarial_watchdog.rs`). A restarted agent reports the gap
//! (`agent_gap`, right after `policy_loaded`).
//!
//! Every test SIGKILLs an agent whose policy gives `dev` a 2 s timeout and
//! polls the outcome with a deadline (a fail mode may start between
//! timeout - 1 s and timeout after the kill, depending on when the last
//! heartbeat was written), then starts an agent again on the same pin root.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envguard_tests::agent::dump_lines;
use envguard_tests::{
    Agent, AgentOptions, Client, Family, Lab, Mode, PolicyExtras, ProbeResult, Proto, Site, sys,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
/// The timeout the tests configure, as the policy says it and as a duration.
const TIMEOUT: &str = "2s";
const TIMEOUT_D: Duration = Duration::from_secs(2);
/// The agent's heartbeat period.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a fail mode may take to start after the kill.
const DEADLINE: Duration = Duration::from_secs(10);

fn at(site: Site, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(Family::V4), port)
}

fn lab(dev: &str, prod: &str) -> Lab {
    let extras = PolicyExtras {
        dev: dev.into(),
        prod: prod.into(),
        ..Default::default()
    };
    let mut lab = Lab::with_policy(EGPROBE, Mode::Enforce, &extras);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::pinned());
    lab
}

fn probe(lab: &Lab, client: Client, proto: Proto, dst: SocketAddr) -> ProbeResult {
    lab.probe(client, proto, dst, 1000)
}

/// Expectations on a probe's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Connects,
    Refused,
}

impl Want {
    fn holds(self, r: &ProbeResult) -> bool {
        match self {
            Want::Connects => r.ok,
            Want::Refused => r.is_refused(),
        }
    }
}

fn expect(
    lab: &Lab,
    client: Client,
    proto: Proto,
    dst: SocketAddr,
    want: Want,
    why: &str,
) -> ProbeResult {
    let r = probe(lab, client, proto, dst);
    assert!(
        want.holds(&r),
        "{client:?} -> {} {dst}: expected {want:?} {why}; probe said {}",
        proto.name(),
        r.raw
    );
    r
}

/// Probes until the outcome is `want` or [`DEADLINE`] after `killed`
/// passed; returns when it came (since `killed`) and the matching probe.
/// Panics with every outcome seen otherwise.
fn poll_until(
    lab: &Lab,
    killed: Instant,
    client: Client,
    proto: Proto,
    dst: SocketAddr,
    want: Want,
) -> (Duration, ProbeResult) {
    let mut seen = Vec::new();
    loop {
        let r = probe(lab, client, proto, dst);
        let t = killed.elapsed();
        if want.holds(&r) {
            return (t, r);
        }
        seen.push(format!("  {:>6.0} ms: {}", t.as_secs_f64() * 1e3, r.raw));
        assert!(
            t < DEADLINE,
            "{client:?} -> {} {dst} never became {want:?} within {DEADLINE:?} of the SIGKILL; outcomes:\n{}",
            proto.name(),
            seen.join("\n")
        );
    }
}

/// The earliest a fail mode may start after the kill: the last heartbeat
/// may be up to one period old, plus some slack for clocks and probes.
fn earliest() -> Duration {
    TIMEOUT_D - HEARTBEAT - Duration::from_millis(200)
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list of env names, got {v}"))
        .iter()
        .map(|e| {
            e.as_str()
                .unwrap_or_else(|| panic!("expected env names, got {v}"))
                .to_owned()
        })
        .collect()
}

/// Restarts the agent on the lab's pin root and checks its `agent_gap`
/// line: right after `policy_loaded`; `gap_ms` at least the time the agent
/// was down before the new one started, at most until its policy_loaded
/// plus a heartbeat period; the env lists exactly `open` and `closed`.
fn restart_and_check_gap(lab: &mut Lab, killed: Instant, open: &[&str], closed: &[&str]) {
    let down = killed.elapsed();
    lab.spawn_agent(&AgentOptions::pinned().adopting());
    let up = killed.elapsed();
    let agent: &Agent = lab.agent();
    let lines = agent
        .wait_lines(Duration::from_secs(5), |l| l.len() >= 2)
        .unwrap_or_else(|l| panic!("no line after policy_loaded; lines:\n{}", dump_lines(&l)));
    let gap = &lines[1];
    let mut errs = Vec::new();
    if gap["kind"] != "agent_gap" || gap["seq"] != 1 || gap["host"] != sys::hostname().as_str() {
        errs.push("expected kind agent_gap, seq 1 and this host".to_owned());
    }
    if let Err(e) = envguard_tests::event::check_time(&gap["time"]) {
        errs.push(format!("time: {e}"));
    }
    let lo = down.saturating_sub(Duration::from_millis(50));
    let hi = up + HEARTBEAT + Duration::from_millis(500);
    match gap["gap_ms"].as_u64().map(Duration::from_millis) {
        Some(g) if g >= lo && g <= hi => {}
        other => errs.push(format!(
            "gap_ms: expected between {lo:?} (down before the restart) and {hi:?}, got {other:?}"
        )),
    }
    for (field, want) in [("envs_failed_open", open), ("envs_failed_closed", closed)] {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        if names(&gap[field]) != want {
            errs.push(format!("{field}: expected {want:?}, got {}", gap[field]));
        }
    }
    assert!(
        errs.is_empty(),
        "wrong agent_gap after {down:?} without an agent:\n  {}\nlines:\n{}",
        errs.join("\n  "),
        dump_lines(&lines)
    );
    eprintln!(
        "agent_gap after {:.0} ms down ({:.0} ms until the new policy_loaded): {gap}",
        down.as_secs_f64() * 1e3,
        up.as_secs_f64() * 1e3
    );
}

#[test]
fn open_lets_dev_through_after_the_timeout() {
    // A pair opens only when both sides fail open: prod does too.
    let mut lab = lab(
        &PolicyExtras::agent_loss("open", TIMEOUT),
        &PolicyExtras::agent_loss("open", TIMEOUT),
    );
    let dev_prod = at(Site::Prod, 9000);
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        dev_prod,
        Want::Refused,
        "(agent running)",
    );

    let killed = Instant::now();
    lab.kill_agent();
    let (opened, _) = poll_until(
        &lab,
        killed,
        Client::Dev,
        Proto::Tcp,
        dev_prod,
        Want::Connects,
    );
    eprintln!(
        "on_agent_loss=open, timeout {TIMEOUT}: dev -> prod connected {opened:?} after the SIGKILL"
    );
    assert!(
        opened >= earliest(),
        "dev -> prod connected {opened:?} after the SIGKILL, before the {TIMEOUT} timeout could have passed"
    );
    let why = "(dev and prod fail open)";
    expect(&lab, Client::Dev, Proto::Udp, dev_prod, Want::Connects, why);
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        at(Site::Dev, 9000),
        Want::Connects,
        why,
    );
    let why = "(shared keeps its policy, and keep beats open)";
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::Shared, 9000),
        Want::Refused,
        why,
    );
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        at(Site::Shared, 9000),
        Want::Refused,
        why,
    );
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        at(Site::Prod, 9000),
        Want::Connects,
        why,
    );

    restart_and_check_gap(&mut lab, killed, &["dev", "prod"], &[]);
    let why = "after the restart (a fresh heartbeat)";
    expect(&lab, Client::Dev, Proto::Tcp, dev_prod, Want::Refused, why);
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        at(Site::Dev, 9000),
        Want::Refused,
        why,
    );
}

#[test]
fn closed_refuses_everything_involving_dev_after_the_timeout() {
    // prod fails open at the same time: where the two meet, closed wins.
    let mut lab = lab(
        &PolicyExtras::agent_loss("closed", TIMEOUT),
        &PolicyExtras::agent_loss("open", TIMEOUT),
    );
    let (dev_dev, prod_shared) = (at(Site::Dev, 9000), at(Site::Shared, 9000));
    let why = "(agent running)";
    expect(&lab, Client::Dev, Proto::Tcp, dev_dev, Want::Connects, why);
    expect(
        &lab,
        Client::Dev,
        Proto::Udp,
        at(Site::Shared, 53),
        Want::Connects,
        why,
    );
    expect(&lab, Client::Host, Proto::Tcp, dev_dev, Want::Connects, why);
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        prod_shared,
        Want::Refused,
        why,
    );

    let killed = Instant::now();
    lab.kill_agent();
    let (closed, refused) = poll_until(
        &lab,
        killed,
        Client::Dev,
        Proto::Tcp,
        dev_dev,
        Want::Refused,
    );
    eprintln!(
        "on_agent_loss=closed/open, timeout {TIMEOUT}: dev -> dev refused {closed:?} after the SIGKILL"
    );
    assert!(
        closed >= earliest(),
        "dev -> dev was refused {closed:?} after the SIGKILL, before the {TIMEOUT} timeout could have passed"
    );
    let why = "(dev fails closed)";
    expect(&lab, Client::Dev, Proto::Udp, dev_dev, Want::Refused, why);
    expect(
        &lab,
        Client::Dev,
        Proto::Udp,
        at(Site::Shared, 53),
        Want::Refused,
        why,
    );
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::Shared, 53),
        Want::Refused,
        why,
    );
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::World, 9000),
        Want::Refused,
        why,
    );
    expect(&lab, Client::Host, Proto::Tcp, dev_dev, Want::Refused, why);
    let why = "(dev fails closed, prod open: closed wins)";
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::Prod, 9000),
        Want::Refused,
        why,
    );
    expect(&lab, Client::Prod, Proto::Tcp, dev_dev, Want::Refused, why);
    let why = "(prod fails open, shared keeps: keep wins)";
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        prod_shared,
        Want::Refused,
        why,
    );
    let why = "(flows not involving dev)";
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        at(Site::Prod, 9000),
        Want::Connects,
        why,
    );
    expect(
        &lab,
        Client::Prod,
        Proto::Udp,
        at(Site::Shared, 53),
        Want::Connects,
        why,
    );
    expect(
        &lab,
        Client::Host,
        Proto::Tcp,
        at(Site::Prod, 9000),
        Want::Connects,
        why,
    );

    restart_and_check_gap(&mut lab, killed, &["prod"], &["dev"]);
    // The refusals made while no agent ran were recorded in the pinned ring
    // buffer; the new agent reports them, saying why.
    let (_, ev) = lab.agent().wait_for(
        "the dev -> dev refusal made while the agent was gone",
        Duration::from_secs(10),
        |e| e["kind"] == "violation" && e["process"]["pid"] == refused.pid,
    );
    assert!(
        ev["verdict"] == "denied"
            && ev["rule"]
                .as_str()
                .is_some_and(|r| r.starts_with("agent_loss:"))
            && ev["destination"]["env"] == "dev"
            && ev["source"]["env"] == "dev",
        "the event of a dev -> dev connect refused because dev failed closed must be denied by an agent_loss: rule: {ev}"
    );
    let why = "after the restart (a fresh heartbeat)";
    expect(&lab, Client::Dev, Proto::Tcp, dev_dev, Want::Connects, why);
    expect(
        &lab,
        Client::Prod,
        Proto::Tcp,
        prod_shared,
        Want::Refused,
        why,
    );
}

#[test]
fn keep_changes_nothing_well_past_the_timeout() {
    let mut lab = lab(&PolicyExtras::agent_loss("keep", TIMEOUT), "");
    let (dev_prod, dev_dev) = (at(Site::Prod, 9000), at(Site::Dev, 9000));
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        dev_prod,
        Want::Refused,
        "(agent running)",
    );

    let killed = Instant::now();
    lab.kill_agent();
    // A bounded observation window: twice the timeout.
    let window = 2 * TIMEOUT_D;
    let mut rounds = 0;
    while killed.elapsed() < window {
        let why = format!(
            "{:?} after the SIGKILL (dev keeps its policy)",
            killed.elapsed()
        );
        expect(&lab, Client::Dev, Proto::Tcp, dev_prod, Want::Refused, &why);
        expect(&lab, Client::Dev, Proto::Tcp, dev_dev, Want::Connects, &why);
        expect(&lab, Client::Prod, Proto::Tcp, dev_dev, Want::Refused, &why);
        rounds += 1;
    }
    eprintln!(
        "on_agent_loss=keep, timeout {TIMEOUT}: {rounds} rounds of probes over {window:?} unchanged"
    );

    restart_and_check_gap(&mut lab, killed, &[], &[]);
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        dev_prod,
        Want::Refused,
        "after the restart",
    );
}
