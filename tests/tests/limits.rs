//! Resource limits never make enforcement wrong or reporting silent.
//!
//! - A full event ring buffer (`--ringbuf-bytes 4096`, room for about 36
//!   records) is counted exactly: every violating `sendto` is one record
//!   attempt, so for a burst of N violating datagrams the violation records
//!   plus the `lost_events` counts add up to exactly N — while the agent is
//!   stopped (SIGSTOP), and while no agent runs at all (SIGKILL, then a new
//!   agent adopts the ring and reports the losses at start).
//! - A full flow verdict cache (`--flow-cache-entries 16`) only means
//!   reclassification: 120 distinct flows (allowed and violating, TCP
//!   connections kept across rounds and UDP datagrams, from three processes)
//!   get the right outcome every round, and exactly one event per violating
//!   attempt.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use envguard_tests::agent::dump_lines;
use envguard_tests::lab::REMOTE_PORTS;
use envguard_tests::process::{FlowsReport, flows, udp_burst};
use envguard_tests::{AgentOptions, Client, Family, FlowSpec, Lab, Mode, Site, violates};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
/// How long the agent may take to report what it read or lost (it reads the
/// loss counters every second).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// In prod's CIDR, but no host has it: the datagrams leave (audit mode) and
/// the server namespace, which does not forward, drops them silently, so
/// nothing comes back that a packet hook could report.
fn nowhere_in_prod() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 10, 200)), 9999)
}

fn pid_of(report: &Value) -> u64 {
    report["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("report without pid: {report}"))
}

/// Violation records of process `pid` (by hook) and the sum of the
/// ring buffer's `lost_events` counts, in `lines`.
fn tally(lines: &[Value], pid: u64) -> (u64, BTreeMap<String, u64>, u64) {
    let mut by_hook = BTreeMap::new();
    let mut lost = 0;
    for l in lines {
        if l["kind"] == "violation" && l["process"]["pid"] == pid {
            *by_hook
                .entry(l["hook"].as_str().unwrap_or("?").to_owned())
                .or_insert(0) += 1;
        }
        if l["kind"] == "lost_events" && l["source"] == "ringbuf" {
            lost += l["count"]
                .as_u64()
                .unwrap_or_else(|| panic!("lost_events without a count: {l}"));
        }
    }
    (by_hook.values().sum(), by_hook, lost)
}

/// Sends `n` violating datagrams from dev in one process; all must leave
/// (audit mode). Returns the sender's pid.
fn burst(lab: &Lab, n: u32) -> u64 {
    let r = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        nowhere_in_prod(),
        n,
    );
    assert!(
        r["ok"] == n && r["other"] == 0,
        "audit mode never blocks: all {n} sendto calls must succeed; got {r}"
    );
    pid_of(&r)
}

/// Waits until records + losses reach `n` on the lines from `from` on, then
/// asserts they are exactly `n`, with losses. Returns (records, lost).
fn assert_exact(lab: &Lab, from: usize, pid: u64, n: u64, what: &str) -> (u64, u64) {
    let agent = lab.agent();
    let lines = agent
        .wait_lines(REPORT_TIMEOUT, |l| {
            let (records, _, lost) = tally(&l[from.min(l.len())..], pid);
            records + lost >= n
        })
        .unwrap_or_else(|l| l);
    let lines = &lines[from.min(lines.len())..];
    let (records, by_hook, lost) = tally(lines, pid);
    assert!(
        records + lost == n && lost > 0,
        "{what}: {n} violating datagrams must give violation records + lost counts == {n}, with some lost \
         (the ring holds about 36 records); got {records} records {by_hook:?} + {lost} lost after {REPORT_TIMEOUT:?}. \
         Lines:\n{}",
        dump_lines(lines)
    );
    assert_eq!(
        by_hook.keys().map(String::as_str).collect::<Vec<_>>(),
        ["sendmsg4"],
        "{what}: the records must all come from sendmsg4"
    );
    (records, lost)
}

#[test]
fn full_ring_buffer_losses_are_counted_exactly() {
    const N: u32 = 500;
    let mut lab = Lab::new(EGPROBE, Mode::Audit);
    let opts = AgentOptions::ephemeral().ringbuf_bytes(4096);
    lab.spawn_agent(&opts);
    // The pipeline works, and the client's neighbour entry for the gateway
    // is resolved before the burst.
    let warm = burst(&lab, 1);
    lab.agent()
        .wait_for("the warm-up datagram", REPORT_TIMEOUT, |e| {
            e["kind"] == "violation" && e["process"]["pid"] == warm
        });

    // The agent stops reading: the ring fills up and the rest is lost.
    let mark = lab.agent().len();
    lab.agent().pause();
    let pid = burst(&lab, N);
    lab.agent().resume();
    let (records, lost) = assert_exact(&lab, mark, pid, N.into(), "agent stopped (SIGSTOP)");
    eprintln!("ring buffer of 4096 bytes, agent stopped: {records} records + {lost} lost = {N}");

    // No agent at all: the kernel keeps counting; the next agent adopts the
    // ring, reads what is in it and reports the losses at start.
    lab.kill_agent();
    const M: u32 = 300;
    let pid = burst(&lab, M);
    lab.spawn_agent(&opts.clone().adopting());
    let (records, lost) = assert_exact(
        &lab,
        0,
        pid,
        M.into(),
        "no agent running (SIGKILL, restart)",
    );
    eprintln!("ring buffer of 4096 bytes, no agent: {records} records + {lost} lost = {M}");
}

#[test]
fn full_flow_cache_keeps_every_verdict() {
    const ROUNDS: u32 = 4;
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve_remote_sites();
    lab.spawn_agent(&AgentOptions::ephemeral().flow_cache_entries(16));

    let mut specs = Vec::new();
    for fam in Family::ALL {
        for site in Site::ALL {
            for (proto, port) in REMOTE_PORTS {
                specs.push((
                    site,
                    FlowSpec {
                        proto,
                        dst: SocketAddr::new(site.addr(fam), port),
                    },
                ));
            }
        }
    }
    let flow_specs: Vec<FlowSpec> = specs.iter().map(|(_, f)| *f).collect();
    let clients = [Client::Dev, Client::Prod, Client::Host];
    let runs: Vec<(Client, FlowsReport)> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .map(|&c| {
                let (lab, flow_specs) = (&lab, &flow_specs);
                s.spawn(move || {
                    (
                        c,
                        flows(lab.egprobe(), &lab.client_place(c), ROUNDS, flow_specs),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("flows thread"))
            .collect()
    });

    let mut wrong = Vec::new();
    let mut violating_attempts = BTreeMap::new();
    for (client, FlowsReport { pid, outcomes }) in &runs {
        let mut n = 0u64;
        for ((site, spec), got) in specs.iter().zip(outcomes) {
            let violation = violates(client.env(), site.env(), spec.proto, spec.dst.port());
            let want = match (violation, spec.proto.name()) {
                (false, _) => "ok",
                (true, "tcp") => "connect:1",
                (true, _) => "send:1",
            };
            if violation {
                n += u64::from(ROUNDS);
            }
            if got.len() != ROUNDS as usize || got.iter().any(|o| o != want) {
                wrong.push(format!(
                    "{client:?} -> {} {} {}: expected {want} every round, got {got:?}",
                    site.env(),
                    spec.proto.name(),
                    spec.dst
                ));
            }
        }
        violating_attempts.insert(u64::from(*pid), (*client, n));
    }
    assert!(
        wrong.is_empty(),
        "with a 16-entry flow cache and {} distinct flows, some got the wrong outcome:\n  {}",
        specs.len() * clients.len(),
        wrong.join("\n  ")
    );

    // Exactly one event per violating attempt, none for allowed ones.
    let counts = |l: &[Value]| -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        for e in l {
            if e["kind"] == "violation"
                && let Some(pid) = e["process"]["pid"].as_u64()
            {
                *m.entry(pid).or_insert(0) += 1;
            }
        }
        m
    };
    let want: BTreeMap<u64, u64> = violating_attempts
        .iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(pid, (_, n))| (*pid, *n))
        .collect();
    let lines = lab
        .agent()
        .wait_lines(REPORT_TIMEOUT, |l| counts(l) == want)
        .unwrap_or_else(|l| {
            panic!(
                "expected violation events per pid {want:?} (clients {violating_attempts:?}), got {:?}; lines:\n{}",
                counts(&l),
                dump_lines(&l)
            )
        });
    let stray: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["kind"] == "lost_events"
                || (l["kind"] == "violation" && l["process"]["pid"].is_null())
        })
        .collect();
    assert!(
        stray.is_empty(),
        "no packet-hook violations (allowed flows reclassified wrongly) and no lost events expected: {stray:?}"
    );
}
