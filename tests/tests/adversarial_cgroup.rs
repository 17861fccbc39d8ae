//! Issue 9, item 5: a listed cgroup removed and recreated while the agent
//! runs. The recreated `dev` has a new id; a workload that starts in it at
//! once (before the agent's once-a-second poll could see it) must be `dev`
//! from its first packet, and stay `dev` later on the same sockets (no
//! verdict cached as `host` may survive). Each round: `rmdir dev`, `mkdir
//! dev`, then at once one process in it sends to the prod site (TCP and UDP,
//! IPv4 and IPv6), and again from the same sockets 2.5 s later. Enforce: all
//! refused with EPERM; audit: all delivered; both: every attempt reported as
//! a violation from `dev` (`env_from: "cgroup"`, the new cgroup's id), and
//! the agent's poll finds that the kernel had recorded the id at mkdir.

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

#[test]
fn recreated_listed_cgroup_is_covered_from_its_first_packet_enforce() {
    recreated_dev(Mode::Enforce);
}

#[test]
fn recreated_listed_cgroup_is_covered_from_its_first_packet_audit() {
    recreated_dev(Mode::Audit);
}
