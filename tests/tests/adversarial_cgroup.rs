//! Issue 9, item 5: a listed cgroup removed and recreated while the agent
//! runs. The recreated `dev` has a new id; a workload that starts in it at
//! once (before the agent's once-a-second poll could see it) must be `dev`
//! from its first packet, and stay `dev` later on the same sockets (no
//! verdict cached as `host` may survive). Each round: `rmdir dev`, `mkdir
//! dev`, then at once one process in it sends to the prod site (TCP and UDP,
//! IPv4 and IPv6), and again from the same sockets 2.5 s later. Enforce: all
//! refused with EPERM; audit: all delivered; both: every attempt reported as
//! a violation from `dev` (`env_from: "cgroup"`, the new cgroup's id), and
//! the agent's poll finds that the kernel had recorded the id at mkdir. A
//! listed path too long for the kernel's watch is left to the poll, and then
//! no verdict cached before the poll may outlive it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envguard_tests::event::{Endpoint, Expected};
use envguard_tests::lab::EVENT_TIMEOUT;
use envguard_tests::process::flows_with_gap;
use envguard_tests::{AgentOptions, Family, FlowSpec, Lab, Mode, Proto, Site};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
/// Recreations per test: races show up as a round that goes wrong.
const RECREATIONS: usize = 5;
/// Between the first and the second attempt on each socket: longer than the
/// agent's poll, so a verdict cached as `host` would be used after it.
const GAP: Duration = Duration::from_millis(2500);
const PORT: u16 = 9000;
const EPERM: i32 = 1;

/// Removes `dev` (waiting out the last round's exiting processes) and makes
/// it again; returns the new cgroup's id.
fn recreate_dev(lab: &Lab) -> u64 {
    let dir = lab.cg.abs("dev");
    let old = lab.cg.id("dev");
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir(&dir) {
        assert!(
            Instant::now() < deadline,
            "cannot remove cgroup {}: {e}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.cg.mkdir("dev");
    let new = lab.cg.id("dev");
    assert_ne!(old, new, "a recreated cgroup has a new id");
    new
}

fn specs() -> Vec<FlowSpec> {
    let mut specs = Vec::new();
    for fam in [Family::V4, Family::V6] {
        for proto in [Proto::Tcp, Proto::Udp] {
            specs.push(FlowSpec {
                proto,
                dst: SocketAddr::new(Site::Prod.addr(fam), PORT),
            });
        }
    }
    specs
}

fn hook(spec: &FlowSpec) -> &'static str {
    match (spec.proto, spec.dst.is_ipv4()) {
        (Proto::Tcp, true) => "connect4",
        (Proto::Tcp, false) => "connect6",
        (Proto::Udp, true) => "sendmsg4",
        (Proto::Udp, false) => "sendmsg6",
    }
}

/// Violation events a spec's two attempts must produce: one per attempt,
/// except an audited TCP connection, whose second attempt is data on the
/// connection the first one opened (judged once, at connect).
fn events_per_spec(mode: Mode, spec: &FlowSpec) -> usize {
    if mode == Mode::Audit && spec.proto == Proto::Tcp {
        1
    } else {
        2
    }
}

fn recreated_dev(mode: Mode) {
    let mut lab = Lab::new(EGPROBE, mode);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::ephemeral());
    let specs = specs();
    let dev = lab.cg.rel("dev");
    for round in 0..RECREATIONS {
        let id = recreate_dev(&lab);
        // No wait: the probe joins the new cgroup and sends at once.
        let report = flows_with_gap(
            lab.egprobe(),
            &lab.client_place(envguard_tests::Client::Dev),
            2,
            GAP,
            &specs,
        );
        let desc = |spec: &FlowSpec| {
            format!(
                "recreation {round}: dev ({dev}, id {id}) -> prod {} {}",
                spec.proto.name(),
                spec.dst
            )
        };
        for (spec, outcomes) in specs.iter().zip(&report.outcomes) {
            let want: Vec<String> = match (mode, spec.proto) {
                (Mode::Audit, _) => vec!["ok".into(); 2],
                (Mode::Enforce, Proto::Tcp) => vec![format!("connect:{EPERM}"); 2],
                (Mode::Enforce, Proto::Udp) => vec![format!("send:{EPERM}"); 2],
            };
            assert_eq!(
                outcomes,
                &want,
                "{}: outcomes at t=0 and t=2.5 s",
                desc(spec)
            );
        }

        let pid = report.pid;
        let total: usize = specs.iter().map(|s| events_per_spec(mode, s)).sum();
        let mine = |lines: &[Value]| -> Vec<Value> {
            lines
                .iter()
                .filter(|l| l["kind"] == "violation" && l["process"]["pid"] == pid)
                .cloned()
                .collect()
        };
        let lines = lab
            .agent()
            .wait_lines(EVENT_TIMEOUT, |l| mine(l).len() >= total)
            .unwrap_or_else(|l| l);
        let events = mine(&lines);
        assert_eq!(
            events.len(),
            total,
            "recreation {round}: violation events of probe {pid}: {events:#?}"
        );
        for spec in &specs {
            let dst_ip = spec.dst.ip().to_string();
            let of_spec: Vec<&Value> = events
                .iter()
                .filter(|e| e["proto"] == spec.proto.name() && e["destination"]["ip"] == *dst_ip)
                .collect();
            assert_eq!(
                of_spec.len(),
                events_per_spec(mode, spec),
                "{}: events {of_spec:#?}",
                desc(spec)
            );
            let expected = Expected {
                mode,
                direction: "egress",
                hook: hook(spec),
                proto: spec.proto.name(),
                source: Endpoint {
                    ip: None,
                    port: None,
                    env: "dev",
                    env_from: "cgroup",
                },
                destination: Endpoint {
                    ip: Some(spec.dst.ip()),
                    port: Some(PORT),
                    env: Site::Prod.env(),
                    env_from: Site::Prod.env_from(),
                },
                pid: Some(pid),
                comm: Some("egprobe"),
                // SAFETY: geteuid has no preconditions.
                uid: Some(unsafe { libc::geteuid() }),
                cgroup_id: id,
                cgroup: dev.clone(),
            };
            for e in of_spec {
                expected.assert_matches(e, &desc(spec));
            }
        }

        // The agent's poll (every second; the round took 2.5 s) saw the new
        // cgroup and found its id already recorded by the kernel.
        let recorded = format!("cgroup {dev} appeared (id {id}); the kernel recorded it at mkdir");
        let stderr = lab.agent().stderr();
        assert!(
            stderr.contains(&recorded),
            "recreation {round}: the agent did not log {recorded:?}; its stderr:\n{stderr}"
        );
    }
    lab.stop_agent();
}

/// A listed cgroup whose path is too long for the kernel's watch (its key
/// holds 254 bytes) is left to the poll: a socket made in it at once may be
/// `host` for up to a second, but its verdicts must not outlive the poll. At
/// t=2.5 s the UDP socket's datagram is refused and the TCP connection's
/// data is dropped, both reported from `dev`.
#[test]
fn listed_cgroup_too_long_for_the_watch_keeps_no_host_verdict() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let long = format!("dev-{}", "x".repeat(250));
    let root = lab.cg.rel("");
    let text = lab.policy_text(&Default::default()).replace(
        &format!("cgroups = [\"{root}/dev\"]"),
        &format!("cgroups = [\"{root}/dev\", \"{root}/{long}\"]"),
    );
    assert!(text.contains(&long), "policy rewritten: {text}");
    lab.write_policy_raw(&text);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::ephemeral());
    assert!(
        lab.cg.rel(&long).len() > 254,
        "the path must not fit the watch's key"
    );
    lab.cg.mkdir(&long);
    let id = lab.cg.id(&long);
    let place = envguard_tests::Place {
        netns: Some(lab.topo.client.name().to_owned()),
        cgroup: Some(lab.cg.abs(&long)),
    };
    let specs: Vec<FlowSpec> = [Proto::Tcp, Proto::Udp]
        .into_iter()
        .map(|proto| FlowSpec {
            proto,
            dst: SocketAddr::new(Site::Prod.addr(Family::V4), PORT),
        })
        .collect();
    let report = flows_with_gap(lab.egprobe(), &place, 2, GAP, &specs);
    // t=0 is the poll's to win or lose; t=2.5 s is not.
    assert_ne!(
        report.outcomes[0][1], "ok",
        "the TCP connection from the long-path cgroup still carries data to prod at t=2.5 s: {:?}",
        report.outcomes
    );
    assert_eq!(
        report.outcomes[1][1],
        format!("send:{EPERM}"),
        "the UDP socket of the long-path cgroup still sends to prod at t=2.5 s: {:?}",
        report.outcomes
    );
    for spec in &specs {
        let of_spec = |l: &Value| {
            l["kind"] == "violation"
                && l["process"]["cgroup_id"] == id
                && l["proto"] == spec.proto.name()
                && l["source"]["env"] == "dev"
                && l["source"]["env_from"] == "cgroup"
                && l["destination"]["env"] == "prod"
        };
        lab.agent().wait_for(
            &format!(
                "a violation from the long-path cgroup over {}",
                spec.proto.name()
            ),
            EVENT_TIMEOUT,
            of_spec,
        );
    }
    let stderr = lab.agent().stderr();
    assert!(
        stderr.contains("too long for the kernel's cgroup_mkdir watch"),
        "the agent must say the long path is left to the poll; its stderr:\n{stderr}"
    );
    lab.stop_agent();
}

#[test]
fn recreated_listed_cgroup_is_covered_from_its_first_packet_enforce() {
    recreated_dev(Mode::Enforce);
}

#[test]
fn recreated_listed_cgroup_is_covered_from_its_first_packet_audit() {
    recreated_dev(Mode::Audit);
}
