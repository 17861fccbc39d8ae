//! Section 1: kernel cost per program run.
//!
//! (a) BPF_PROG_TEST_RUN of the agent's real `skb_egress`/`skb_ingress`
//! (found by name among the programs attached to the benchmark's cgroup),
//! with the agent's maps filled by policies of 10 to 100 000 CIDRs (20 000 in
//! a quick run), against
//! an empty cgroup_skb program (`r0 = 1; exit`) as the floor. A worker in the
//! tagged cgroup and the client netns makes the calls: test_run gives each
//! call a fresh dummy socket, created in the caller's cgroup (so the
//! program's cgroup walk finds env `dev`) with a fresh cookie, and takes the
//! device from the context's `ifindex` (the veth; ifindex 0/1 would be
//! loopback, which the programs pass at once).
//!
//! - steady state: one call with a large repeat count. The first run
//!   classifies and caches the flow (cookie, remote, port, proto); every
//!   other run is the cached path. The kernel reports the mean.
//! - classification: many calls with repeat = 1, each a new socket (cookie)
//!   and a new remote address/port, so each run misses the cache and
//!   classifies. With repeat = 1 the kernel's figure includes one clock read;
//!   the empty program measured the same way, interleaved call by call,
//!   carries the same overhead, so the classification cost is reported as
//!   the difference of medians.
//!
//! The remote address of a classification run is either a new random one
//! inside the policy's CIDRs ("cold": the trie walk meets whatever the CPU
//! caches hold) or always the same ("hot"). At the largest policy a full
//! run also profiles `skb_egress` with `perf record -e cpu-clock`.
//!
//! (b) `kernel.bpf_stats_enabled` (on only for this pass, restored by a
//! guard): run_time_ns / run_cnt of every envguard program under real TCP and
//! UDP traffic over both families, with empty cgroup_skb programs attached
//! to the same cgroup as a floor that carries the same accounting overhead.

use std::time::Duration;

use serde_json::{Value, json};

use crate::agentrun::{BenchAgent, Sink};
use crate::bpf;
use crate::env::BenchEnv;
use crate::policygen::{GenPolicy, PROBE_PORT, RR_PORT, Rng};
use crate::worker::Worker;

/// The local (client) address of the crafted packets.
const LOCAL: [u8; 4] = [198, 18, 100, 2];

pub struct Case {
    pub cidrs: usize,
    pub rules: usize,
}

pub fn cases(quick: bool, big: usize) -> Vec<Case> {
    let mut v = vec![Case {
        cidrs: 10,
        rules: 3,
    }];
    for cidrs in [10, 1_000, 10_000, big] {
        v.push(Case {
            cidrs,
            rules: 1_000,
        });
    }
    if quick {
        v.retain(|c| c.cidrs != 10 || c.rules != 1_000);
    }
    v
}

/// Section 1a.
pub fn test_run(env: &BenchEnv) -> Value {
    let (repeat, big_calls, calls) = if env.quick {
        (100_000, 3, 1_000)
    } else {
        (1_000_000, 5, 8_000)
    };
    let ifindex = env.client_ifindex();
    let mut out = Vec::new();
    for (i, case) in cases(env.quick, env.big()).iter().enumerate() {
        crate::check_interrupted();
        let sub = format!("k{i}");
        let root = env.mkdir(&sub);
        let dev = env.mkdir(&format!("{sub}/dev"));
        let policy = GenPolicy::new(case.cidrs, case.rules, 42);
        let file = env.file(
            &format!("policy-k{i}.toml"),
            &policy.toml("enforce", std::slice::from_ref(&dev)),
        );
        let agent = BenchAgent::start(
            &env.agent_bin,
            &file,
            &root,
            Sink::Pipe,
            env.tmp.path(),
            &[],
        );
        let progs = bpf::programs_at(&env.cg.abs(&sub))
            .unwrap_or_else(|e| panic!("cannot list the programs attached to {root}: {e}"));
        let id = |name: &str| {
            progs
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.id)
                .unwrap_or_else(|| panic!("no program {name} attached at {root}"))
        };
        let mut rng = Rng::new(7 + i as u64);
        let addrs: Vec<String> = policy
            .sample_addrs(2 * calls, &mut rng)
            .iter()
            .map(ToString::to_string)
            .collect();
        let addrs_file = env.file(&format!("addrs-k{i}.txt"), &addrs.join("\n"));
        eprintln!(
            "envguard-bench: test_run: {} CIDRs, {} rules (agent ready in {:?})",
            policy.total_cidrs, case.rules, agent.ready_after
        );
        let w = Worker::spawn(
            &env.client(&format!("{sub}/dev")),
            json!({
                "job": "testrun",
                "egress_id": id("skb_egress"),
                "ingress_id": id("skb_ingress"),
                "ifindex": ifindex,
                "addrs_file": addrs_file.display().to_string(),
                "repeat": repeat,
                "big_calls": big_calls,
                "calls": calls,
            }),
        );
        let mut r = w.result(Duration::from_secs(600));
        if !env.quick && case.cidrs >= env.big() {
            r["profile"] = profile(env, &sub, id("skb_egress"), ifindex, &addrs_file);
        }
        let ready_ms = agent.ready_after.as_secs_f64() * 1e3;
        agent.stop();
        r["cidrs"] = json!(policy.total_cidrs);
        r["agent_ready_ms"] = json!(ready_ms);
        r["rules"] = json!(case.rules);
        out.push(r);
    }
    json!({
        "repeat": repeat,
        "big_calls": big_calls,
        "calls": calls,
        "ifindex_note": "context ifindex = the client veth; data = Ethernet + IPv4 + TCP, the kernel strips the Ethernet header (eth_type_trans) so the program sees the packet from its IP header, as on the real hook",
        "cases": out,
    })
}

/// Summary statistics of a sample, in ns.
fn stats(v: &mut [u32]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    json!({
        "median": pct(0.5), "mean": (mean * 10.0).round() / 10.0,
        "p10": pct(0.1), "p90": pct(0.9), "min": v[0], "n": v.len(),
    })
}

/// Ethernet + IPv4 + TCP, 54 bytes.
fn packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The worker side of section 1a (runs in the tagged cgroup and client netns).
pub fn testrun_worker(spec: &Value) {
    let num = |k: &str| spec[k].as_u64().unwrap_or_else(|| panic!("missing {k}"));
    let prog =
        |k: &str| bpf::prog_fd_by_id(num(k) as u32).unwrap_or_else(|e| panic!("program {k}: {e}"));
    let (egress, ingress) = (prog("egress_id"), prog("ingress_id"));
    let empty = bpf::load_empty_skb(bpf::BPF_CGROUP_INET_EGRESS)
        .unwrap_or_else(|e| panic!("loading the empty program: {e}"));
    let ifindex = num("ifindex") as u32;
    let repeat = num("repeat") as u32;
    let addrs: Vec<[u8; 4]> = std::fs::read_to_string(spec["addrs_file"].as_str().expect("file"))
        .expect("addresses")
        .lines()
        .map(|l| l.parse::<std::net::Ipv4Addr>().expect("address").octets())
        .collect();
    let run = |p: &std::os::fd::OwnedFd, data: &[u8], repeat: u32| {
        bpf::test_run_skb(p, data, ifindex, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
    };
    let mut not_passed = [0u64; 3];
    // Steady state: one flow per call, `repeat` packets of it.
    let (mut e_big, mut g_big, mut i_big) = (Vec::new(), Vec::new(), Vec::new());
    for c in 0..num("big_calls") as u16 {
        let out = packet(LOCAL, 40_000 + c, addrs[0], PROBE_PORT, ACK);
        let back = packet(addrs[0], PROBE_PORT, LOCAL, 40_000 + c, ACK);
        e_big.push(run(&empty, &out, repeat).duration_ns);
        let r = run(&egress, &out, repeat);
        not_passed[1] += u64::from(r.retval != 1);
        g_big.push(r.duration_ns);
        let r = run(&ingress, &back, repeat);
        not_passed[2] += u64::from(r.retval != 1);
        i_big.push(r.duration_ns);
    }
    // Validation: with ifindex 1 the packet seems to cross loopback, which the
    // program passes at once; the figures above must be well above this.
    let lo = bpf::test_run_skb(
        &egress,
        &packet(LOCAL, 39_999, addrs[0], PROBE_PORT, ACK),
        1,
        repeat,
    )
    .map_or(0, |r| r.duration_ns);
    // Classification: a new socket (cookie) and a new remote port for every
    // run. "cold": a new random remote address each time, egress and ingress
    // from separate streams (the LPM walk meets whatever the caches hold);
    // "hot": always the same remote address (the walk's nodes stay cached).
    let calls = num("calls") as usize;
    let mut cls: [Vec<u32>; 6] = Default::default();
    for (variant, hot) in [(0, false), (1, true)] {
        for k in 0..calls {
            let port = 1_024 + ((k + variant * calls) % 60_000) as u16;
            let (d_out, d_in) = if hot {
                (addrs[0], addrs[0])
            } else {
                (addrs[k], addrs[calls + k])
            };
            let out = packet(LOCAL, port, d_out, PROBE_PORT, SYN);
            let inbound = packet(d_in, port, LOCAL, PROBE_PORT, SYN);
            let r = run(&empty, &out, 1);
            not_passed[0] += u64::from(r.retval != 1);
            cls[variant * 3].push(r.duration_ns);
            let r = run(&egress, &out, 1);
            not_passed[1] += u64::from(r.retval != 1);
            cls[variant * 3 + 1].push(r.duration_ns);
            let r = run(&ingress, &inbound, 1);
            not_passed[2] += u64::from(r.retval != 1);
            cls[variant * 3 + 2].push(r.duration_ns);
        }
    }
    let [e_one, g_one, i_one, e_hot, g_hot, i_hot] = &mut cls;
    let big = |v: &mut Vec<u32>| {
        let s = stats(v);
        json!({"median": s["median"], "min": s["min"], "runs": v})
    };
    let info = |fd: &std::os::fd::OwnedFd| {
        bpf::prog_info(fd).map_or(Value::Null, |i| {
            json!({"xlated_insns": i.xlated_prog_len / 8, "jited_bytes": i.jited_prog_len,
                   "verified_insns": i.verified_insns})
        })
    };
    let out = json!({
        "empty_steady_ns": big(&mut e_big),
        "egress_steady_ns": big(&mut g_big),
        "ingress_steady_ns": big(&mut i_big),
        "empty_once_ns": stats(e_one),
        "egress_classify_ns": stats(g_one),
        "ingress_classify_ns": stats(i_one),
        "empty_once_hot_ns": stats(e_hot),
        "egress_classify_hot_ns": stats(g_hot),
        "ingress_classify_hot_ns": stats(i_hot),
        "egress_loopback_shortcut_ns": lo,
        "not_passed": {"empty": not_passed[0], "skb_egress": not_passed[1], "skb_ingress": not_passed[2]},
        "programs": {"skb_egress": info(&egress), "skb_ingress": info(&ingress)},
    });
    println!("{out}");
}

/// Where the time goes: `perf record -e cpu-clock` (the VM has no hardware
/// counters) of a worker looping BPF_PROG_TEST_RUN on `skb_egress`, for
/// the steady-state path and for cold classification. Flat profile, top
/// symbols; `bpf:NAME` is a BPF program or subprogram (JITed code).
fn profile(env: &BenchEnv, sub: &str, prog: u32, ifindex: u32, addrs: &std::path::Path) -> Value {
    if !crate::profile::available() {
        return json!(crate::profile::UNAVAILABLE);
    }
    let mut out = serde_json::Map::new();
    for mode in ["steady", "classify"] {
        let w = Worker::spawn(
            &env.client(&format!("{sub}/dev")),
            json!({"job": "testrun_loop", "mode": mode, "prog_id": prog, "ifindex": ifindex,
                   "addrs_file": addrs.display().to_string(), "ms": 3_000}),
        );
        w.wait_line(Duration::from_secs(10), |l| l.contains("\"ready\":true"));
        let data = env.tmp.path().join(format!("perf-{mode}.data"));
        let top = crate::profile::record(w.pid(), 2, &data);
        let _ = w.result(Duration::from_secs(30));
        out.insert(mode.to_owned(), top);
    }
    Value::Object(out)
}

/// The worker side of the profile: loops test runs of one program for
/// `ms`, the steady-state path (one flow, many repeats per call) or cold
/// classification (a new socket and remote per run).
pub fn testrun_loop_worker(spec: &Value) {
    let num = |k: &str| spec[k].as_u64().unwrap_or_else(|| panic!("missing {k}"));
    let prog = bpf::prog_fd_by_id(num("prog_id") as u32).expect("program fd");
    let ifindex = num("ifindex") as u32;
    let addrs: Vec<[u8; 4]> = std::fs::read_to_string(spec["addrs_file"].as_str().expect("file"))
        .expect("addresses")
        .lines()
        .map(|l| l.parse::<std::net::Ipv4Addr>().expect("address").octets())
        .collect();
    let steady = spec["mode"] == "steady";
    println!("{}", json!({"ready": true}));
    let d = Duration::from_millis(num("ms"));
    let t = std::time::Instant::now();
    let mut calls = 0u64;
    while t.elapsed() < d {
        let k = calls as usize % addrs.len();
        if steady {
            let p = packet(LOCAL, 40_000, addrs[0], PROBE_PORT, ACK);
            bpf::test_run_skb(&prog, &p, ifindex, 100_000).expect("test run");
        } else {
            let port = 1_024 + (calls % 60_000) as u16;
            let p = packet(LOCAL, port, addrs[k], PROBE_PORT, SYN);
            bpf::test_run_skb(&prog, &p, ifindex, 1).expect("test run");
        }
        calls += 1;
    }
    println!("{}", json!({"calls": calls}));
}

/// Section 1b.
pub fn bpf_stats(env: &BenchEnv) -> Value {
    let secs = if env.quick { 1 } else { 5 };
    let root = env.mkdir("s");
    let dev = env.mkdir("s/dev");
    let policy = GenPolicy::new(10_000, 1_000, 42);
    let file = env.file(
        "policy-s.toml",
        &policy.toml("enforce", std::slice::from_ref(&dev)),
    );
    let server = env.server();
    let _servers = [
        Worker::server(
            &server,
            json!({"job": "echo_server", "addr": "198.18.0.1", "port": RR_PORT}),
        ),
        Worker::server(
            &server,
            json!({"job": "echo_server", "addr": "2001:db8:0:1::1", "port": RR_PORT}),
        ),
        Worker::server(
            &server,
            json!({"job": "udp_echo_server", "addr": "198.18.0.1", "port": 53}),
        ),
        Worker::server(
            &server,
            json!({"job": "udp_echo_server", "addr": "2001:db8:0:1::1", "port": 53}),
        ),
    ];
    let agent = BenchAgent::start(
        &env.agent_bin,
        &file,
        &root,
        Sink::Pipe,
        env.tmp.path(),
        &[],
    );
    let progs = bpf::programs_at(&env.cg.abs("s")).expect("listing the agent's programs");
    // Every program the agent loaded: size as loaded, JITed, and how many
    // instructions the verifier went through (global functions included).
    let sizes: Vec<Value> = agent
        .pin_root()
        .map(|root| bpf::pinned_programs(root).expect("reading the agent's pinned links"))
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let i = bpf::prog_info(&p.fd).expect("program info");
            json!({
                "program": p.name,
                "xlated_insns": i.xlated_prog_len / 8,
                "jited_bytes": i.jited_prog_len,
                "verified_insns": i.verified_insns,
            })
        })
        .collect();
    // The floor: empty programs on the client's own cgroup, run for the same packets.
    let dev_dir = std::fs::File::open(env.cg.abs("s/dev")).expect("cgroup dir");
    let empty_in = bpf::load_empty_skb(bpf::BPF_CGROUP_INET_INGRESS).expect("empty program");
    let empty_out = bpf::load_empty_skb(bpf::BPF_CGROUP_INET_EGRESS).expect("empty program");
    let _links = [
        bpf::link_cgroup(&empty_in, &dev_dir, bpf::BPF_CGROUP_INET_INGRESS)
            .expect("attaching the empty ingress program"),
        bpf::link_cgroup(&empty_out, &dev_dir, bpf::BPF_CGROUP_INET_EGRESS)
            .expect("attaching the empty egress program"),
    ];
    let traffic = |ms: u64| {
        Worker::spawn(
            &env.client("s/dev"),
            json!({
                "job": "mixed_client", "ms": ms,
                "tcp4": format!("198.18.0.1:{RR_PORT}"), "tcp6": format!("[2001:db8:0:1::1]:{RR_PORT}"),
                "udp4": "198.18.0.1:53", "udp6": "[2001:db8:0:1::1]:53",
                "bind4": "198.18.100.2:0", "bind6": "[2001:db8:100::2]:0",
            }),
        )
        .result(Duration::from_secs(secs + 60))
    };
    // Warm-up (and a check that the traffic passes), statistics off.
    traffic(200);
    let before_sysctl = bpf::stats_sysctl();
    let snapshot = |all: &[(&str, &std::os::fd::OwnedFd)]| -> Vec<(String, u64, u64)> {
        all.iter()
            .map(|(n, fd)| {
                let i = bpf::prog_info(fd).expect("program info");
                ((*n).to_owned(), i.run_time_ns, i.run_cnt)
            })
            .collect()
    };
    let mut all: Vec<(&str, &std::os::fd::OwnedFd)> =
        progs.iter().map(|p| (p.name.as_str(), &p.fd)).collect();
    all.push(("empty (ingress)", &empty_in));
    all.push(("empty (egress)", &empty_out));
    let guard = bpf::enable_stats().expect("BPF_ENABLE_STATS");
    let during_sysctl = bpf::stats_sysctl();
    let s0 = snapshot(&all);
    let t = traffic(secs * 1000);
    let s1 = snapshot(&all);
    // Established flows: one TCP connection per family, request/response
    // for the whole window. After its first packets every packet is judged
    // by the decision kept on the socket: the steady state under real
    // traffic, which a test run (whose packet has no socket) cannot show.
    let established: Vec<Value> = ["198.18.0.1", "2001:db8:0:1::1"]
        .iter()
        .map(|addr| {
            Worker::spawn(
                &env.client("s/dev"),
                json!({"job": "rr_client", "addr": addr, "port": RR_PORT, "ms": secs * 500}),
            )
            .result(Duration::from_secs(secs + 60))
        })
        .collect();
    let s2 = snapshot(&all);
    drop(guard);
    let after_sysctl = bpf::stats_sysctl();
    agent.stop();
    let per_run = |from: &[(String, u64, u64)], to: &[(String, u64, u64)]| -> Vec<Value> {
        from.iter()
            .zip(to)
            .map(|((name, t0, c0), (_, t1, c1))| {
                let runs = c1 - c0;
                let ns = if runs == 0 {
                    Value::Null
                } else {
                    json!(((t1 - t0) as f64 / runs as f64 * 10.0).round() / 10.0)
                };
                json!({"program": name, "runs": runs, "ns_per_run": ns})
            })
            .collect()
    };
    let per_prog = per_run(&s0, &s1);
    let established_prog = per_run(&s1, &s2);
    json!({
        "seconds": secs,
        "traffic": t,
        "policy": {"cidrs": policy.total_cidrs, "rules": policy.rules.len()},
        "bpf_stats_enabled": {"before": before_sysctl, "during": during_sysctl, "after": after_sysctl},
        "programs": per_prog,
        "established": {"traffic": established, "programs": established_prog},
        "program_sizes": sizes,
    })
}
