//! The agent's life cycle: enforcement lives in the kernel, pinned under the
//! agent's pin root, and does not depend on the agent process.
//!
//! - SIGKILL under load: a dev→prod connect loop at 300/s never gets
//!   through while the agent is killed and started again (which adopts the
//!   pinned links), and a prod→prod loop never fails.
//! - A restart (SIGTERM, then start again) adopts the pinned state: the same
//!   links and programs (ids read from bpffs), and the policy changed in
//!   between in force; a second agent on the same pin root, and `envguard
//!   detach`, refuse while an agent runs.
//! - `envguard detach`, and stopping an agent run with `--detach-on-exit`
//!   (SIGTERM and SIGINT), leave no pin, program, link or map (ids checked
//!   with bpf(2)), and traffic flows freely.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use envguard_tests::process::attempts_between;
use envguard_tests::{
    AgentOptions, Client, ConnectLoop, Family, Lab, Mode, PolicyExtras, Proto, Site, sys,
};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
/// Attempts per second of the connect loops.
const RATE: u32 = 300;
/// The least rate the loops must reach for the test to mean anything.
const MIN_RATE: f64 = 200.0;
const WAIT: Duration = Duration::from_secs(10);

fn at(site: Site, fam: Family, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(fam), port)
}

fn prod(port: u16) -> SocketAddr {
    at(Site::Prod, Family::V4, port)
}

fn any() -> IpAddr {
    Ipv6Addr::UNSPECIFIED.into()
}

fn count(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {field:?} in {v}"))
}

fn rate(v: &Value) -> f64 {
    v["rate"]
        .as_f64()
        .unwrap_or_else(|| panic!("no rate in {v}"))
}

/// Waits until the loop made `more` attempts after its latest progress line.
fn advance(lp: &ConnectLoop, more: u64) {
    let now = lp.latest().map_or(0, |v| count(&v, "attempts"));
    lp.wait_attempts(now + more, WAIT);
}

/// Times of a loop's summary list `field` relative to `zero_ns`, in ms.
fn times_since(v: &Value, field: &str, zero_ns: u64) -> Vec<f64> {
    v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|t| (t as f64 - zero_ns as f64) / 1e6)
                .collect()
        })
        .unwrap_or_default()
}

fn assert_refused(lab: &Lab, client: Client, proto: Proto, dst: SocketAddr, why: &str) {
    let r = lab.probe(client, proto, dst, 1500);
    assert!(
        r.is_refused(),
        "{client:?} -> {} {dst} must be refused with EPERM {why}; probe said {}",
        proto.name(),
        r.raw
    );
}

fn assert_connects(lab: &Lab, client: Client, proto: Proto, dst: SocketAddr, why: &str) {
    let r = lab.probe(client, proto, dst, 3000);
    assert!(
        r.ok,
        "{client:?} -> {} {dst} must connect {why}; probe said {}",
        proto.name(),
        r.raw
    );
}

#[test]
fn kill9_under_load_lets_nothing_through() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any()], 9000);
    lab.spawn_agent(&AgentOptions::pinned());
    let before = lab.footprint();
    assert_refused(&lab, Client::Dev, Proto::Tcp, prod(9000), "(agent running)");
    assert_connects(
        &lab,
        Client::Prod,
        Proto::Tcp,
        prod(9000),
        "(agent running)",
    );

    let dev = lab.connect_loop(Client::Dev, prod(9000), RATE);
    let prd = lab.connect_loop(Client::Prod, prod(9000), RATE);
    dev.wait_attempts(60, WAIT);
    prd.wait_attempts(60, WAIT);

    let kill_ns = sys::mono_ns();
    let killed = Instant::now();
    lab.kill_agent();
    // Some time with no agent at all, measured in attempts, not sleeps.
    advance(&dev, 30);
    advance(&prd, 30);
    let started = Instant::now();
    lab.spawn_agent(&AgentOptions::pinned().adopting());
    let ready = Instant::now();
    let ready_ns = sys::mono_ns();
    advance(&dev, 60);
    advance(&prd, 60);
    let d = dev.finish();
    let p = prd.finish();
    let during_gap = attempts_between(&d, kill_ns, ready_ns);

    let startup_ms = ready.duration_since(started).as_secs_f64() * 1e3;
    let gap_ms = ready.duration_since(killed).as_secs_f64() * 1e3;
    eprintln!(
        "kill -9 under load: dev->prod {} attempts at {:.0}/s (largest gap between attempts {:.1} ms), \
         {} got through, {} refused with EPERM, {} other; {during_gap} attempts fell between \
         the SIGKILL and the new policy_loaded. Restart: {startup_ms:.0} ms from start to policy_loaded \
         ({gap_ms:.0} ms from SIGKILL). prod->prod {}/{} ok at {:.0}/s.",
        count(&d, "attempts"),
        rate(&d),
        d["max_gap_ms"].as_f64().unwrap_or(f64::NAN),
        count(&d, "connected"),
        count(&d, "eperm"),
        count(&d, "other"),
        count(&p, "ok"),
        count(&p, "attempts"),
        rate(&p),
    );
    assert!(
        count(&d, "connected") == 0 && count(&d, "ok") == 0,
        "dev->prod connections got through while the agent was killed and restarted, at {:?} ms after the SIGKILL \
         (the new policy_loaded came {gap_ms:.0} ms after it): {d}",
        times_since(&d, "connected_at_mono_ns", kill_ns)
    );
    assert!(
        count(&d, "eperm") == count(&d, "attempts") && count(&d, "other") == 0,
        "every dev->prod attempt must be refused with EPERM at connect (another error means its packets left): {d}"
    );
    assert!(
        count(&p, "ok") == count(&p, "attempts") && count(&p, "attempts") > 0,
        "prod->prod attempts failed at {:?} ms after the SIGKILL (the new policy_loaded came {gap_ms:.0} ms after it): {p}",
        times_since(&p, "failed_at_mono_ns", kill_ns)
    );
    assert!(
        during_gap > 0,
        "no dev->prod attempt fell between the SIGKILL and the new policy_loaded: the test proved nothing"
    );
    for (name, v) in [("dev->prod", &d), ("prod->prod", &p)] {
        assert!(
            rate(v) >= MIN_RATE,
            "the {name} loop ran at {:.0} attempts/s, below the {MIN_RATE}/s this test needs: {v}",
            rate(v)
        );
    }
    assert_eq!(
        lab.footprint().link_progs(),
        before.link_progs(),
        "a restart after SIGKILL must adopt the pinned links (name -> (link id, program id))"
    );
}

/// A rule the restarted agent must put in force.
const ALLOW_DEV_PROD_9000: &str = r#"
[[allow]]
from = "dev"
to = "prod"
ports = ["9000/tcp"]
"#;

#[test]
fn restart_adopts_pinned_state_and_applies_the_new_policy() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::pinned());
    let before = lab.footprint();
    assert_refused(&lab, Client::Dev, Proto::Tcp, prod(9000), "(first agent)");
    assert_refused(&lab, Client::Dev, Proto::Tcp, prod(8080), "(first agent)");

    // dev -> prod 8080 stays forbidden by both policies: a loop on it must
    // never get through while the agent stops and the next one adopts.
    let lp = lab.connect_loop(Client::Dev, prod(8080), RATE);
    lp.wait_attempts(30, WAIT);
    lab.set_policy(&PolicyExtras {
        allow: ALLOW_DEV_PROD_9000.into(),
        ..Default::default()
    });
    lab.stop_agent();
    assert_eq!(
        lab.footprint().link_progs(),
        before.link_progs(),
        "SIGTERM (without --detach-on-exit) must leave the links pinned"
    );
    assert_refused(
        &lab,
        Client::Dev,
        Proto::Tcp,
        prod(9000),
        "while no agent runs (the old policy stays in force)",
    );
    advance(&lp, 30);
    let started = Instant::now();
    lab.spawn_agent(&AgentOptions::pinned().adopting());
    let startup = started.elapsed();
    advance(&lp, 30);
    let after = lab.footprint();
    assert_eq!(
        after.link_progs(),
        before.link_progs(),
        "a restart must keep the pinned links and their programs (name -> (link id, program id))"
    );
    assert_connects(
        &lab,
        Client::Dev,
        Proto::Tcp,
        prod(9000),
        "after the restart: the new policy allows dev -> prod 9000/tcp",
    );
    assert_refused(
        &lab,
        Client::Dev,
        Proto::Tcp,
        prod(8080),
        "after the restart (the new rule is 9000/tcp only)",
    );
    assert_refused(
        &lab,
        Client::Dev,
        Proto::Udp,
        prod(9000),
        "after the restart (the new rule is TCP only)",
    );
    let s = lp.finish();
    eprintln!(
        "restart with a policy change: {startup:?} from start to policy_loaded; dev->prod 8080 loop: {} attempts at {:.0}/s, {} got through",
        count(&s, "attempts"),
        rate(&s),
        count(&s, "connected")
    );
    assert!(
        count(&s, "connected") == 0 && count(&s, "eperm") == count(&s, "attempts"),
        "dev -> prod 8080 must be refused throughout the restart: {s}"
    );

    // While an agent runs on the pin root, a second one refuses to start
    // and detach refuses to run; neither touches the pinned state.
    let bin = sys::envguard_bin();
    let (policy, cg, pin) = (
        lab.policy_path().display().to_string(),
        lab.cg.rel(""),
        lab.pin_root().path().display().to_string(),
    );
    let second = sys::run_envguard(
        &bin,
        &[
            "run",
            "--policy",
            &policy,
            "--cgroup-root",
            &cg,
            "--pin-root",
            &pin,
        ],
        Duration::from_secs(15),
    );
    assert!(
        second.status.is_some_and(|s| !s.success())
            && format!("{}{}", second.stdout, second.stderr).contains("already running"),
        "a second agent on a pin root whose agent runs must exit non-zero saying \"already running\"; got {second:?}"
    );
    let detach = sys::envguard_detach(&bin, lab.pin_root().path());
    assert!(
        detach.status.is_some_and(|s| !s.success()),
        "envguard detach must refuse while an agent runs on the pin root; got {detach:?}"
    );
    assert_eq!(
        lab.footprint().link_progs(),
        before.link_progs(),
        "a refused second agent or detach must leave the running agent's links alone"
    );
    assert_refused(
        &lab,
        Client::Dev,
        Proto::Tcp,
        prod(8080),
        "after the refused second agent and detach",
    );
    lab.stop_agent();
}

/// dev -> prod over both families and protocols: refused while enforced,
/// connecting once nothing is attached.
fn cross_env_cases() -> Vec<(Proto, SocketAddr)> {
    let mut v = Vec::new();
    for fam in Family::ALL {
        for proto in [Proto::Tcp, Proto::Udp] {
            v.push((proto, at(Site::Prod, fam, 9000)));
        }
    }
    v
}

fn assert_all_refused(lab: &Lab, why: &str) {
    for (proto, dst) in cross_env_cases() {
        assert_refused(lab, Client::Dev, proto, dst, why);
    }
}

fn assert_all_flow(lab: &Lab, why: &str) {
    for (proto, dst) in cross_env_cases() {
        assert_connects(lab, Client::Dev, proto, dst, why);
    }
}

fn assert_no_pins(lab: &Lab, why: &str) {
    let pins = lab.pin_root().pins();
    assert!(pins.is_empty(), "pins left {why}: {pins:?}");
}

#[test]
fn detach_leaves_nothing() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::pinned());
    let fp = lab.footprint();
    assert_all_refused(&lab, "(agent running)");

    lab.stop_agent();
    assert_eq!(
        lab.footprint().link_progs(),
        fp.link_progs(),
        "SIGTERM (without --detach-on-exit) must leave the links pinned"
    );
    assert_all_refused(&lab, "after SIGTERM (enforcement stays)");

    let out = sys::envguard_detach(&sys::envguard_bin(), lab.pin_root().path());
    assert!(out.success(), "envguard detach failed: {out:?}");
    assert_no_pins(&lab, "after envguard detach");
    fp.assert_all_gone(Some(&lab.cg.abs("")), "after envguard detach");
    assert_all_flow(&lab, "after envguard detach");
}

#[test]
fn detach_on_exit_leaves_nothing() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve_remote_sites();
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        lab.spawn_agent(&AgentOptions::ephemeral());
        let fp = lab.footprint();
        assert_all_refused(&lab, "(agent running)");
        lab.take_agent().stop_with(sig);
        let why = format!("after {name} to an agent run with --detach-on-exit");
        assert_no_pins(&lab, &why);
        fp.assert_all_gone(Some(&lab.cg.abs("")), &why);
        assert_all_flow(&lab, &why);
    }
}
