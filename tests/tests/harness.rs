//! Tests of the harness itself, without the agent: the topology routes every
//! site in both families, probes run where they are placed and report
//! errors faithfully, and every guard cleans up — also when a test panics.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use envguard_tests::lab::REMOTE_PORTS;
use envguard_tests::process::{flows, gone, loop_attempts, udp_burst, whoami};
use envguard_tests::{
    AgentOptions, Client, Family, FlowSpec, Lab, Mode, Probe, Proto, Site, client_addr, sys,
};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

/// Names of everything a lab created, to check it is gone afterwards.
#[derive(Debug, Default)]
struct Footprint {
    netns: Vec<String>,
    cgroup_dir: Option<PathBuf>,
    policy: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    pids: Vec<u32>,
}

fn footprint(lab: &Lab, pids: Vec<u32>) -> Footprint {
    Footprint {
        netns: vec![
            lab.topo.client.name().to_owned(),
            lab.topo.server.name().to_owned(),
        ],
        cgroup_dir: Some(lab.cg.abs("")),
        policy: Some(lab.policy_path().to_owned()),
        pin_root: Some(lab.pin_root().path().to_owned()),
        pids,
    }
}

fn assert_cleaned_up(fp: &Footprint) {
    let listed = sys::ip_output(&["netns", "list"]);
    for ns in &fp.netns {
        assert!(
            !listed.split_whitespace().any(|w| w == ns),
            "netns {ns} still exists after the lab was dropped:\n{listed}"
        );
        assert!(
            !PathBuf::from("/run/netns").join(ns).exists(),
            "/run/netns/{ns} still exists"
        );
    }
    let dir = fp.cgroup_dir.as_ref().expect("cgroup dir recorded");
    assert!(
        !dir.exists(),
        "cgroup {} still exists after the lab was dropped",
        dir.display()
    );
    let policy = fp.policy.as_ref().expect("policy recorded");
    assert!(
        !policy.exists(),
        "policy file {} still exists after the lab was dropped",
        policy.display()
    );
    let pin_root = fp.pin_root.as_ref().expect("pin root recorded");
    assert!(
        !pin_root.exists(),
        "pin root {} still exists after the lab was dropped",
        pin_root.display()
    );
    for &pid in &fp.pids {
        assert!(
            gone(pid),
            "server process {pid} still exists after the lab was dropped"
        );
    }
}

#[test]
fn topology_routes_every_site_and_cleans_up() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.mkdir_late();
    lab.serve_remote_sites();
    // A local server in prod, for the inbound direction.
    let any: IpAddr = std::net::Ipv6Addr::UNSPECIFIED.into();
    let local = lab.serve(&lab.client_place(Client::Prod), Proto::Tcp, &[any], 7000);

    for fam in Family::ALL {
        for client in Client::ALL {
            for site in Site::ALL {
                for (proto, port) in [(Proto::Tcp, 9000), (Proto::Udp, 53)] {
                    let case = lab.remote_case(client, site, fam, proto, port);
                    let r = lab.run(&case.probe);
                    assert!(
                        r.ok,
                        "{} (no agent): must connect; probe said {}",
                        case.desc, r.raw
                    );
                }
            }
        }
        for site in Site::ALL {
            let case = lab.inbound_case(site, fam, Client::Prod, 7000);
            let r = lab.run(&case.probe);
            assert!(
                r.ok,
                "{} (no agent): must connect; probe said {}",
                case.desc, r.raw
            );
            let bound = r.local.expect("bound probe reports its address");
            assert_eq!(
                bound.ip(),
                site.addr(fam),
                "{}: probe must use its --bind address",
                case.desc
            );
            assert_ne!(bound.port(), 0, "{}: bound port", case.desc);
        }
        // The staging site (an env only some policies declare) over TCP.
        let r = lab.probe(
            Client::Dev,
            Proto::Tcp,
            SocketAddr::new(Site::Staging.addr(fam), 9000),
            3000,
        );
        assert!(r.ok, "staging {} (no agent): {}", fam.name(), r.raw);
    }
    let pids = lab.server_pids();
    assert!(
        pids.contains(&local) && pids.len() == 6,
        "5 remote servers and 1 local: {pids:?}"
    );
    let fp = footprint(&lab, pids);
    drop(lab);
    assert_cleaned_up(&fp);
}

#[test]
fn probes_run_in_their_cgroup_and_netns() {
    let lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.mkdir_late();
    let client_ino = std::fs::metadata(format!("/run/netns/{}", lab.topo.client.name()))
        .unwrap()
        .ino();
    let server_ino = std::fs::metadata(format!("/run/netns/{}", lab.topo.server.name()))
        .unwrap()
        .ino();
    for client in Client::ALL {
        let (_, cgroup, ns) = whoami(lab.egprobe(), &lab.client_place(client));
        assert_eq!(
            cgroup,
            lab.cg.rel(client.sub()),
            "{client:?} probe's cgroup"
        );
        assert_eq!(ns, client_ino, "{client:?} probe's netns");
    }
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .expect("own cgroup v2 path");
    let (_, cgroup, ns) = whoami(lab.egprobe(), &lab.remote_place());
    assert_eq!(
        cgroup, own_cgroup,
        "remote probes stay in the test runner's cgroup"
    );
    assert_eq!(ns, server_ino, "remote probe's netns");
}

#[test]
fn probe_reports_errors_faithfully() {
    let lab = Lab::new(EGPROBE, Mode::Enforce);
    // Nothing listens there: refused at once.
    let refused = Probe {
        place: lab.client_place(Client::Dev),
        proto: Proto::Tcp,
        dst: SocketAddr::new(Site::Prod.addr(Family::V4), 9999),
        bind: None,
        timeout_ms: 1500,
    };
    let r = lab.run(&refused);
    assert!(
        !r.ok && r.errno == Some(libc::ECONNREFUSED) && r.stage.as_deref() == Some("connect"),
        "{}",
        r.raw
    );
    // The server netns has no route to 198.19.0.0/16 (only its connected
    // subnets): a UDP send fails locally.
    let unreachable = Probe {
        place: lab.remote_place(),
        dst: "198.19.0.1:9".parse().unwrap(),
        proto: Proto::Udp,
        ..refused.clone()
    };
    let r = lab.run(&unreachable);
    assert!(
        !r.ok && r.errno == Some(libc::ENETUNREACH) && r.stage.as_deref() == Some("send"),
        "{}",
        r.raw
    );
    // A UDP peer that never answers: recv times out, reported as ETIMEDOUT.
    let silent = Probe {
        dst: SocketAddr::new(Site::Prod.addr(Family::V6), 9999),
        proto: Proto::Udp,
        timeout_ms: 300,
        ..refused.clone()
    };
    let r = lab.run(&silent);
    assert!(
        !r.ok && r.errno == Some(libc::ETIMEDOUT) && r.stage.as_deref() == Some("recv"),
        "{}",
        r.raw
    );
    // The client's own veth address is world; the lab's inbound port 7000 has no server: refused.
    let inbound = Probe {
        place: lab.remote_place(),
        proto: Proto::Tcp,
        dst: SocketAddr::new(client_addr(Family::V6), 7000),
        bind: Some(Site::Dev.addr(Family::V6)),
        timeout_ms: 1500,
    };
    let r = lab.run(&inbound);
    assert!(!r.ok && r.errno == Some(libc::ECONNREFUSED), "{}", r.raw);
}

#[test]
fn load_probes_report_faithfully() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.serve_remote_sites();
    let prod = |port| SocketAddr::new(Site::Prod.addr(Family::V4), port);
    // Without an agent every attempt connects, at the rate asked for.
    let lp = lab.connect_loop(Client::Dev, prod(9000), 300);
    lp.wait_attempts(100, Duration::from_secs(10));
    let s = lp.finish();
    assert!(
        s["attempts"].as_u64().is_some_and(|a| a >= 100)
            && s["ok"] == s["attempts"]
            && s["connected"] == s["attempts"]
            && s["rate"].as_f64().is_some_and(|r| r >= 200.0),
        "{s}"
    );
    // Per attempt: start <= end <= next start, and the outcome.
    let attempts = loop_attempts(&s);
    assert_eq!(Some(attempts.len() as u64), s["attempts"].as_u64());
    for (a, b) in attempts.iter().zip(attempts.iter().skip(1)) {
        assert!(
            a.at_ns <= a.done_ns && a.done_ns <= b.at_ns,
            "{a:?} then {b:?}"
        );
    }
    assert!(attempts.iter().all(|a| a.outcome == 'o'), "{attempts:?}");
    // Nothing listens on 9999: refused by the peer, counted as other, not EPERM.
    let lp = lab.connect_loop(Client::Dev, prod(9999), 300);
    lp.wait_attempts(20, Duration::from_secs(10));
    let s = lp.finish();
    assert!(
        loop_attempts(&s).iter().all(|a| a.outcome == 'x'),
        "refused by the peer: outcome x for every attempt: {s}"
    );
    assert!(
        s["other"] == s["attempts"]
            && s["eperm"] == 0
            && s["connected"] == 0
            && s["errors"].as_object().is_some_and(|e| e
                .keys()
                .all(|k| k.starts_with("connect: Connection refused"))),
        "{s}"
    );
    let r = udp_burst(
        lab.egprobe(),
        &lab.client_place(Client::Dev),
        prod(9000),
        100,
    );
    assert!(r["ok"] == 100 && r["eperm"] == 0 && r["other"] == 0, "{r}");
    // flows: every site and port connects and echoes, over two rounds; a
    // refused TCP connect is reported with its errno.
    let mut specs: Vec<FlowSpec> = Vec::new();
    for fam in Family::ALL {
        for site in Site::ALL {
            for (proto, port) in REMOTE_PORTS {
                specs.push(FlowSpec {
                    proto,
                    dst: SocketAddr::new(site.addr(fam), port),
                });
            }
        }
    }
    specs.push(FlowSpec {
        proto: Proto::Tcp,
        dst: prod(9999),
    });
    let report = flows(lab.egprobe(), &lab.client_place(Client::Dev), 2, &specs);
    let refused = format!("connect:{}", libc::ECONNREFUSED);
    for (spec, got) in specs.iter().zip(&report.outcomes) {
        let want = if spec.dst.port() == 9999 {
            refused.as_str()
        } else {
            "ok"
        };
        assert!(
            got.len() == 2 && got.iter().all(|o| o == want),
            "{spec:?}: expected {want} twice, got {got:?}"
        );
    }
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    let recorded = Mutex::new(Footprint::default());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new(EGPROBE, Mode::Enforce);
        lab.mkdir_late();
        let place = lab.client_place(Client::DevLate);
        let pid = lab.serve(&place, Proto::Udp, &[Family::V4.loopback()], 7300);
        *recorded.lock().unwrap() = footprint(&lab, vec![pid]);
        panic!("deliberate panic with a live server in dev/late");
    }));
    assert!(result.is_err(), "the closure must have panicked");
    assert_cleaned_up(&recorded.lock().unwrap());
}

#[test]
fn guards_detach_a_pinned_agent_when_a_test_panics() {
    let recorded = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new(EGPROBE, Mode::Enforce);
        // Without --detach-on-exit: only the pin root's guard can clean up.
        lab.spawn_agent(&AgentOptions::pinned());
        let pinned = lab.footprint();
        assert!(!pinned.pins.is_empty(), "the agent pinned nothing");
        *recorded.lock().unwrap() = Some((footprint(&lab, Vec::new()), pinned));
        panic!("deliberate panic with a pinned agent running");
    }));
    assert!(result.is_err(), "the closure must have panicked");
    let (fp, pinned) = recorded
        .into_inner()
        .unwrap()
        .expect("the lab was recorded");
    assert_cleaned_up(&fp);
    pinned.assert_all_gone(None, "after a lab with a pinned agent was dropped");
}

#[test]
fn a_killed_agent_leaves_no_control_socket() {
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral());
    let socket = lab.agent().control_socket().to_owned();
    assert!(
        socket.exists(),
        "{} exists while the agent runs",
        socket.display()
    );
    // SIGKILL: the agent cannot remove its socket; the guard does.
    lab.kill_agent();
    assert!(
        !socket.exists(),
        "{} must be removed once the agent was killed",
        socket.display()
    );
}

#[test]
fn cgroup_tree_kills_leftover_processes() {
    let lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.mkdir_late();
    // A server deliberately left without a guard: the cgroup tree's drop
    // must kill it (it is in the tree) before removing the cgroups.
    let mut cmd = std::process::Command::new(EGPROBE);
    cmd.arg("--cgroup")
        .arg(lab.cg.abs("dev/late"))
        .args(["serve", "tcp", "127.0.0.1", "7400"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn egprobe");
    let pid = child.id();
    // Readiness is irrelevant here: only its membership matters, which
    // holds as soon as it wrote cgroup.procs; wait for that.
    let procs = lab.cg.abs("dev/late").join("cgroup.procs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .split_whitespace()
        .any(|p| p == pid.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "egprobe {pid} never joined {}",
            procs.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let dir = lab.cg.abs("");
    drop(lab);
    assert!(!dir.exists(), "cgroup {} still exists", dir.display());
    let status = child.wait().expect("wait for the killed server");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
}
