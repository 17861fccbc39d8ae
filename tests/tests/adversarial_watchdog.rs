//! The watchdog against a hostile env (issue 9, item 8): one env's
//! `on_agent_loss = "open"` must not open flows to an env that did not ask
//! for it. For a pair of envs the stricter side wins (`closed` > `keep` >
//! `open`): a pair opens only when both sides fail open, or one side fails
//! open and the other is `host`/`world` with a `[defaults]` entry that
//! allows it; `host` and `world` never trigger anything on their own.
//!
//! Each test SIGKILLs the agent (dev: `open`, 2 s timeout), waits with a
//! deadline until dev's timeout has surely passed (a witness flow opens),
//! probes, then restarts the agent on the pin root and checks what it
//! reports about the time it was gone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envguard_tests::agent::dump_lines;
use envguard_tests::{
    AgentOptions, Client, Family, Lab, Mode, PolicyExtras, ProbeResult, Proto, Site,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const TIMEOUT: &str = "2s";
/// How long a fail mode may take to start after the kill.
const DEADLINE: Duration = Duration::from_secs(10);

fn at(site: Site, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(Family::V4), port)
}

fn deny(from: &str, to: &str, ports: &str) -> String {
    format!("[[deny]]\nfrom = \"{from}\"\nto = \"{to}\"\nports = [\"{ports}\"]\n")
}

fn lab(prod: &str, tables: String) -> Lab {
    let extras = PolicyExtras {
        dev: PolicyExtras::agent_loss("open", TIMEOUT),
        prod: prod.into(),
        tables,
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

fn expect(
    lab: &Lab,
    client: Client,
    proto: Proto,
    dst: SocketAddr,
    connects: bool,
    why: &str,
) -> ProbeResult {
    let r = probe(lab, client, proto, dst);
    let ok = if connects { r.ok } else { r.is_refused() };
    assert!(
        ok,
        "{client:?} -> {} {dst}: expected {} {why}; probe said {}",
        proto.name(),
        if connects { "to connect" } else { "EPERM" },
        r.raw
    );
    r
}

/// Probes until `client -> dst` connects, or panics [`DEADLINE`] after
/// `killed` with every outcome seen.
fn poll_connects(lab: &Lab, killed: Instant, client: Client, dst: SocketAddr) -> Duration {
    let mut seen = Vec::new();
    loop {
        let r = probe(lab, client, Proto::Tcp, dst);
        let t = killed.elapsed();
        if r.ok {
            return t;
        }
        seen.push(format!("  {:>6.0} ms: {}", t.as_secs_f64() * 1e3, r.raw));
        assert!(
            t < DEADLINE,
            "{client:?} -> tcp {dst} never connected within {DEADLINE:?} of the SIGKILL; outcomes:\n{}",
            seen.join("\n")
        );
    }
}

/// Restarts the agent on the lab's pin root; returns its `agent_gap` line.
fn restart(lab: &mut Lab) -> Value {
    lab.spawn_agent(&AgentOptions::pinned().adopting());
    let lines = lab
        .agent()
        .wait_lines(Duration::from_secs(5), |l| l.len() >= 2)
        .unwrap_or_else(|l| panic!("no line after policy_loaded; lines:\n{}", dump_lines(&l)));
    assert_eq!(
        lines[1]["kind"],
        "agent_gap",
        "lines:\n{}",
        dump_lines(&lines)
    );
    lines[1].clone()
}

/// The violation record of the refused probe `r`, as the restarted agent
/// reports it: denied, envs `src -> dst`, rule `rule`.
fn assert_reported(lab: &Lab, r: &ProbeResult, src: &str, dst: &str, rule: &str) {
    let what = format!(
        "the {src} -> {dst} refusal made while no agent ran (pid {})",
        r.pid
    );
    let (_, ev) = lab.agent().wait_for(&what, Duration::from_secs(10), |e| {
        e["kind"] == "violation" && e["process"]["pid"] == r.pid
    });
    assert!(
        ev["verdict"] == "denied"
            && ev["source"]["env"] == src
            && ev["destination"]["env"] == dst
            && ev["rule"] == rule,
        "{what}: expected verdict denied, {src} -> {dst}, rule {rule:?}: {ev}"
    );
}

/// dev `open`, prod `keep`; `[defaults]` deny host and world. A `[[deny]]`
/// of dev -> dev 9000/tcp is the witness that dev's timeout passed (a
/// same-env flow takes its env's own mode, so it opens).
#[test]
fn open_dev_does_not_open_a_keep_env_or_denying_defaults() {
    let tables = format!(
        "[defaults]\nhost = \"deny\"\nworld = \"deny\"\n\n{}",
        deny("dev", "dev", "9000/tcp")
    );
    let mut lab = lab("", tables);
    let (dev_dev, dev_prod, dev_world) = (
        at(Site::Dev, 9000),
        at(Site::Prod, 9000),
        at(Site::World, 9000),
    );
    let why = "(agent running)";
    expect(&lab, Client::Dev, Proto::Tcp, dev_dev, false, why);
    expect(&lab, Client::Dev, Proto::Tcp, dev_prod, false, why);
    expect(&lab, Client::Dev, Proto::Tcp, dev_world, false, why);
    expect(&lab, Client::Host, Proto::Tcp, dev_dev, false, why);

    let killed = Instant::now();
    lab.kill_agent();
    let opened = poll_connects(&lab, killed, Client::Dev, dev_dev);
    eprintln!("dev open, timeout {TIMEOUT}: dev -> dev:9000 opened {opened:?} after the SIGKILL");

    let why = "(dev fails open, prod keeps: keep wins)";
    let tcp = expect(&lab, Client::Dev, Proto::Tcp, dev_prod, false, why);
    expect(&lab, Client::Dev, Proto::Udp, dev_prod, false, why);
    expect(&lab, Client::Prod, Proto::Tcp, dev_dev, false, why);
    let why = "(dev fails open, shared keeps: keep wins)";
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::Shared, 9000),
        false,
        why,
    );
    let why = "(dev fails open, [defaults] world = \"deny\")";
    let world = expect(&lab, Client::Dev, Proto::Tcp, dev_world, false, why);
    let why = "(dev fails open, [defaults] host = \"deny\")";
    let host = expect(&lab, Client::Host, Proto::Tcp, dev_dev, false, why);
    let why = "(flows not involving dev are untouched)";
    expect(&lab, Client::Prod, Proto::Tcp, dev_prod, true, why);
    expect(&lab, Client::Prod, Proto::Tcp, dev_world, false, why);

    let gap = restart(&mut lab);
    assert!(
        gap["envs_failed_open"] == serde_json::json!(["dev"])
            && gap["envs_failed_closed"] == serde_json::json!([]),
        "agent_gap must say dev failed open: {gap}"
    );
    // Refused by the policy, not by a fail mode.
    assert_reported(
        &lab,
        &tcp,
        "dev",
        "prod",
        "default:cross-env (no allow rule for dev -> prod)",
    );
    assert_reported(&lab, &world, "dev", "world", "default:world=deny");
    assert_reported(&lab, &host, "host", "dev", "default:host=deny");
    let why = "after the restart";
    expect(&lab, Client::Dev, Proto::Tcp, dev_dev, false, why);
    expect(&lab, Client::Dev, Proto::Tcp, dev_prod, false, why);
}

/// dev and prod `open`; `[defaults]` allow host and world, with `[[deny]]`
/// rules that the agent enforces while it runs: dev -> world 9000/tcp,
/// host -> dev 9000/tcp, host -> world 9000/tcp.
#[test]
fn open_on_both_sides_opens_the_pair_and_allowing_defaults() {
    let tables = [
        deny("dev", "world", "9000/tcp"),
        deny("host", "dev", "9000/tcp"),
        deny("host", "world", "9000/tcp"),
    ]
    .join("\n");
    let mut lab = lab(&PolicyExtras::agent_loss("open", TIMEOUT), tables);
    let (dev_dev, dev_prod, world) = (
        at(Site::Dev, 9000),
        at(Site::Prod, 9000),
        at(Site::World, 9000),
    );
    let why = "(agent running)";
    expect(&lab, Client::Dev, Proto::Tcp, dev_prod, false, why);
    expect(&lab, Client::Prod, Proto::Tcp, dev_dev, false, why);
    expect(&lab, Client::Dev, Proto::Tcp, world, false, why);
    expect(&lab, Client::Host, Proto::Tcp, dev_dev, false, why);
    expect(&lab, Client::Host, Proto::Tcp, world, false, why);

    let killed = Instant::now();
    lab.kill_agent();
    let opened = poll_connects(&lab, killed, Client::Dev, dev_prod);
    eprintln!(
        "dev and prod open, timeout {TIMEOUT}: dev -> prod opened {opened:?} after the SIGKILL"
    );
    assert!(
        opened >= Duration::from_millis(800),
        "dev -> prod connected {opened:?} after the SIGKILL, before the {TIMEOUT} timeouts could have passed"
    );

    let why = "(dev and prod fail open)";
    expect(&lab, Client::Dev, Proto::Udp, dev_prod, true, why);
    expect(&lab, Client::Prod, Proto::Tcp, dev_dev, true, why);
    let why = "(dev fails open, [defaults] allow world)";
    expect(&lab, Client::Dev, Proto::Tcp, world, true, why);
    let why = "(dev fails open, [defaults] allow host)";
    expect(&lab, Client::Host, Proto::Tcp, dev_dev, true, why);
    let why = "(host and world never fail open on their own)";
    expect(&lab, Client::Host, Proto::Tcp, world, false, why);
    let why = "(dev fails open, shared keeps: keep wins)";
    expect(
        &lab,
        Client::Dev,
        Proto::Tcp,
        at(Site::Shared, 9000),
        false,
        why,
    );

    let gap = restart(&mut lab);
    assert!(
        gap["envs_failed_open"] == serde_json::json!(["dev", "prod"])
            || gap["envs_failed_open"] == serde_json::json!(["prod", "dev"]),
        "agent_gap must say dev and prod failed open: {gap}"
    );
    let why = "after the restart";
    expect(&lab, Client::Dev, Proto::Tcp, dev_prod, false, why);
    expect(&lab, Client::Dev, Proto::Tcp, world, false, why);
}
