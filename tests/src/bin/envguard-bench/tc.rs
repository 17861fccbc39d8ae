//! Section tc: the tc hooks on a listed interface.
//!
//! A router namespace with the agent inside it (as in the `tc_forward`
//! tests): a "VM" behind `tapdev0` (listed in dev's `interfaces`), a second
//! one behind the unlisted `plain0`, a sink behind `shared0` (shared by CIDR,
//! `* -> shared` allowed).
//!
//! (a) BPF_PROG_TEST_RUN, from a thread in the router's namespace, of the
//! agent's real `tc_ingress` (found on `tapdev0`'s tcx chain) on a packet of
//! an established, allowed VM -> shared flow (the first run judges it and
//! records the flow; the others find it in `TC_FLOWS`), against an empty tc
//! program (`r0 = -1; exit`). Also the first packet of new flows (repeat 1,
//! a new source port each call), against the empty program measured the
//! same way.
//!
//! (b) Forwarded TCP throughput, one stream for a fixed time from each VM to
//! the sink, rounds interleaved: through `tapdev0` (tc_ingress on the data,
//! tc_egress on the ACKs) against through `plain0` (no program).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use envguard_tests::router::{Host, Router};
use serde_json::{Value, json};

use crate::agentrun::{BenchAgent, Sink};
use crate::bpf;
use crate::env::BenchEnv;

const SINK_PORT: u16 = 9100;

/// Runs `f` on a thread that joined network namespace `ns` (setns applies to
/// the calling thread only).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("thread in netns {ns} panicked"))
}

/// Ethernet + IPv4 + TCP (flags ACK), 54 bytes.
fn packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn policy() -> &'static str {
    r#"mode = "enforce"

[envs.dev]
interfaces = ["tapdev*"]

[envs.shared]
cidrs = ["198.18.3.0/24", "2001:db8:3::/64"]

[[allow]]
from = "*"
to = "shared"
"#
}

/// One TCP stream from `from` to the sink for `d`: bytes per second.
fn stream(from: &Host, to: SocketAddr, d: Duration) -> f64 {
    let ns = from.ns.name().to_owned();
    in_netns(&ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("stream connect {to}: {e}"));
        let buf = vec![0x5au8; 64 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < d {
            sent += s
                .write(&buf)
                .unwrap_or_else(|e| panic!("stream write: {e}")) as u64;
        }
        sent as f64 / start.elapsed().as_secs_f64()
    })
}

pub fn run(env: &BenchEnv) -> Value {
    let (repeat, calls, rounds, secs) = if env.quick {
        (100_000u32, 300usize, 2usize, 1u64)
    } else {
        (1_000_000, 3_000, 6, 3)
    };
    let router = Router::with_agent(&env.agent_bin);
    let vm = router.host(1, "tapdev0");
    let plain = router.host(2, "plain0");
    let shared = router.host(3, "shared0");
    let root = env.mkdir("tc");
    let file = env.file("policy-tc.toml", policy());
    let agent = BenchAgent::start(
        router.agent_binary(),
        &file,
        &root,
        Sink::Pipe,
        env.tmp.path(),
        &[],
    );
    let ready_ms = agent.ready_after.as_secs_f64() * 1e3;

    // (a) per packet.
    let r = in_netns(router.ns.name(), move || testrun(repeat, calls));

    // (b) forwarded throughput: a sink in shared's namespace, rounds interleaved.
    let sink_addr = SocketAddr::new(shared.addr(envguard_tests::Family::V4), SINK_PORT);
    let listener = in_netns(shared.ns.name(), move || {
        TcpListener::bind(sink_addr).unwrap_or_else(|e| panic!("sink bind {sink_addr}: {e}"))
    });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    let d = Duration::from_secs(secs);
    let (mut with_tc, mut without) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        crate::check_interrupted();
        with_tc.push(stream(&vm, sink_addr, d) * 8.0 / 1e9);
        without.push(stream(&plain, sink_addr, d) * 8.0 / 1e9);
    }
    agent.stop();
    drop((vm, plain, shared));
    let (mut a, mut b) = (with_tc.clone(), without.clone());
    json!({
        "agent_ready_ms": ready_ms,
        "repeat": repeat,
        "calls": calls,
        "testrun": r,
        "throughput": {
            "seconds_per_round": secs,
            "rounds": rounds,
            "tc_gbit_s": with_tc,
            "none_gbit_s": without,
            "tc_median_gbit_s": median(&mut a),
            "none_median_gbit_s": median(&mut b),
        },
    })
}

/// Runs in the router's namespace.
fn testrun(repeat: u32, calls: usize) -> Value {
    let ifindex = {
        let c = std::ffi::CString::new("tapdev0").unwrap();
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    assert_ne!(ifindex, 0, "no tapdev0 in the router's namespace");
    let find = |attach: u32, name: &str| {
        bpf::query_tcx(ifindex, attach)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY tapdev0: {e}"))
            .into_iter()
            .map(|id| bpf::prog_fd_by_id(id).unwrap_or_else(|e| panic!("program {id}: {e}")))
            .find(|fd| bpf::prog_info(fd).is_ok_and(|i| i.name() == name))
            .unwrap_or_else(|| panic!("no {name} on tapdev0's tcx chain"))
    };
    let ingress = find(46, "tc_ingress");
    let egress = find(47, "tc_egress");
    let empty =
        bpf::load_empty_tc().unwrap_or_else(|e| panic!("loading the empty tc program: {e}"));
    let (vm, sink) = ([198, 18, 1, 2], [198, 18, 3, 2]);
    let run = |p: &std::os::fd::OwnedFd, data: &[u8], repeat: u32| {
        bpf::test_run_skb(p, data, ifindex, repeat)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"))
    };
    let mut not_passed = 0u64;
    // Steady state: an established flow (its first run records it).
    let (mut e_big, mut t_big) = (Vec::new(), Vec::new());
    for c in 0..5u16 {
        let p = packet(vm, 40_000 + c, sink, 8080);
        e_big.push(f64::from(run(&empty, &p, repeat).duration_ns));
        let r = run(&ingress, &p, repeat);
        not_passed += u64::from(r.retval != u32::MAX);
        t_big.push(f64::from(r.duration_ns));
    }
    // First packets: a new source port per call, judged (route lookups,
    // reverse-path check, decision, two flow entries).
    let (mut e_one, mut t_one) = (Vec::new(), Vec::new());
    for k in 0..calls {
        let p = packet(vm, 1_024 + (k % 38_000) as u16, sink, 8080);
        e_one.push(f64::from(run(&empty, &p, 1).duration_ns));
        let r = run(&ingress, &p, 1);
        not_passed += u64::from(r.retval != u32::MAX);
        t_one.push(f64::from(r.duration_ns));
    }
    let info = |fd: &std::os::fd::OwnedFd| {
        bpf::prog_info(fd).map_or(Value::Null, |i| {
            json!({"xlated_insns": i.xlated_prog_len / 8, "jited_bytes": i.jited_prog_len,
                   "verified_insns": i.verified_insns})
        })
    };
    json!({
        "empty_steady_ns": median(&mut e_big),
        "tc_ingress_steady_ns": median(&mut t_big),
        "empty_once_ns": median(&mut e_one),
        "tc_ingress_first_packet_ns": median(&mut t_one),
        "not_passed": not_passed,
        "programs": {"tc_ingress": info(&ingress), "tc_egress": info(&egress)},
    })
}

/// The table rows of this section.
pub fn table(r: &Value) -> String {
    let Some(t) = r["sections"].get("tc").filter(|t| t.get("error").is_none()) else {
        return String::new();
    };
    let g = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let tr = &t["testrun"];
    let th = &t["throughput"];
    let p = &tr["programs"];
    format!(
        "### tc hooks on a listed interface (BPF_PROG_TEST_RUN, ns; forwarded TCP, Gbit/s)\n\n\
         | | empty tc program | tc_ingress | difference |\n|---|--:|--:|--:|\n\
         | established flow (mean of {} runs, median of 5 calls) | {:.0} | {:.0} | +{:.0} |\n\
         | first packet of a flow (median of {} single runs) | {:.0} | {:.0} | +{:.0} |\n\n\
         Forwarded TCP, one stream, {} s per round, {} rounds interleaved (median): through the listed interface {:.2} Gbit/s, through an unlisted one (no program) {:.2} Gbit/s.\n\n\
         Verifier: tc_ingress {} instructions processed ({} xlated), tc_egress {} ({} xlated).\n\n",
        t["repeat"],
        g(&tr["empty_steady_ns"]),
        g(&tr["tc_ingress_steady_ns"]),
        g(&tr["tc_ingress_steady_ns"]) - g(&tr["empty_steady_ns"]),
        t["calls"],
        g(&tr["empty_once_ns"]),
        g(&tr["tc_ingress_first_packet_ns"]),
        g(&tr["tc_ingress_first_packet_ns"]) - g(&tr["empty_once_ns"]),
        th["seconds_per_round"],
        th["rounds"],
        g(&th["tc_median_gbit_s"]),
        g(&th["none_median_gbit_s"]),
        p["tc_ingress"]["verified_insns"],
        p["tc_ingress"]["xlated_insns"],
        p["tc_egress"]["verified_insns"],
        p["tc_egress"]["xlated_insns"],
    )
}
