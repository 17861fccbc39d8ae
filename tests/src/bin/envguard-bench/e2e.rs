//! Section 2: end to end. The client runs in a cgroup of the benchmark's
//! tree inside the client netns; the servers run in the server netns,
//! outside every attach point, at 198.18.0.1 (env `shared`; `dev → shared`
//! is allowed on the servers' ports). Five arms, each with its own client
//! cgroup so that the agents can stay up for the whole run:
//!
//! - A `none`: `none/dev`, nothing attached.
//! - B `envguard-audit`: `audit/dev`, an agent in audit mode at `audit`.
//! - C `envguard-enforce`: `enforce/dev`, an agent in enforce mode at `enforce`.
//! - D `nft-sets`: `nft/dev`, the equivalent nftables ruleset loaded in the
//!   client netns for the arm only.
//! - E `nft-linear`: `nft/dev`, 1 000 linear nftables rules, for the arm only.
//!
//! Both agents and the nft equivalent use the same 10 000-CIDR, 1 000-rule
//! policy. Every round runs A B C D E, each arm running the three workloads
//! back to back; the first round is a warm-up and is dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::agentrun::{BenchAgent, Sink};
use crate::env::BenchEnv;
use crate::policygen::{CRR_PORT, GenPolicy, IPERF_PORT, RR_PORT};
use crate::sysinfo::CpuStat;
use crate::worker::{Place, Worker, run_to_end};

pub const ARMS: [&str; 5] = [
    "none",
    "envguard-audit",
    "envguard-enforce",
    "nft-sets",
    "nft-linear",
];
pub const WORKLOADS: [&str; 3] = ["connections", "request-response", "throughput"];
const TABLE: &str = "egbench";
const SERVER: &str = "198.18.0.1";

/// `socket cgroupv2` takes a path below /sys/fs/cgroup (nft 1.0 resolves
/// it there, whatever the cgroup2 mount is): on a hybrid host the v2
/// hierarchy is /sys/fs/cgroup/unified, so the path must start with
/// `unified/`. The level stays the depth in the v2 hierarchy.
fn nft_cgroup_path(rel: &str) -> String {
    let mount = envguard_tests::sys::cgroup2_mount();
    let below = mount.strip_prefix("/sys/fs/cgroup").unwrap_or_else(|_| {
        panic!(
            "nft resolves `socket cgroupv2` paths below /sys/fs/cgroup, but cgroup2 is mounted at {}",
            mount.display()
        )
    });
    let prefix = below.display().to_string();
    if prefix.is_empty() {
        rel.trim_start_matches('/').to_owned()
    } else {
        format!("{prefix}{rel}")
    }
}

/// One workload run: operations per second and CPU seconds per operation.
struct Sample {
    rate: f64,
    cpu_per_op: f64,
    steal_frac: f64,
}

/// `nft` in the client netns, through a worker that joins the netns only
/// (`ip netns exec` would remount /sys and hide the cgroup2 mount from
/// `socket cgroupv2`).
fn nft(env: &BenchEnv, args: &[&str]) -> Result<(), String> {
    let mut argv = vec!["nft".to_owned()];
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    if std::env::var_os("EGB_DEBUG").is_some() {
        argv.insert(0, "strace".into());
        argv.insert(1, "-f".into());
        argv.insert(2, "-e".into());
        argv.insert(3, "trace=file".into());
    }
    let (ok, _, err) = run_to_end(&env.client_ns(), json!({"job": "exec", "argv": argv}));
    if ok { Ok(()) } else { Err(err) }
}

/// An nftables table loaded in the client netns; deleted on drop.
struct NftTable<'a> {
    env: &'a BenchEnv,
}

impl<'a> NftTable<'a> {
    fn load(env: &'a BenchEnv, file: &std::path::Path) -> NftTable<'a> {
        let path = file.display().to_string();
        if let Err(e) = nft(env, &["-f", &path]) {
            panic!("nft -f {path} in the client netns failed: {e}");
        }
        NftTable { env }
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        if let Err(e) = nft(self.env, &["delete", "table", "inet", TABLE]) {
            eprintln!("envguard-bench: cleanup: nft delete table: {e}");
        }
    }
}

fn measure(f: impl FnOnce() -> (f64, f64)) -> Sample {
    let c0 = CpuStat::now();
    let (ops, secs) = f();
    let (busy, steal, total) = CpuStat::now().since(&c0);
    Sample {
        rate: ops / secs,
        cpu_per_op: busy / ops.max(1.0),
        steal_frac: if total > 0.0 { steal / total } else { 0.0 },
    }
}

fn client_run(place: &Place, job: &str, port: u16, ms: u64) -> (f64, f64) {
    let r = Worker::spawn(
        place,
        json!({"job": job, "addr": SERVER, "port": port, "ms": ms}),
    )
    .result(Duration::from_millis(ms) + Duration::from_secs(60));
    (
        r["ops"].as_f64().expect("ops"),
        r["secs"].as_f64().expect("secs"),
    )
}

/// One iperf3 run; bytes received and seconds. Retries when the server is
/// still busy with the previous test.
fn iperf(place: &Place, secs: u64) -> (f64, f64) {
    let mut last = String::new();
    for _ in 0..5 {
        let argv = [
            "iperf3",
            "-c",
            SERVER,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ]
        .map(str::to_owned);
        let (_, out, err) = run_to_end(place, json!({"job": "exec", "argv": argv}));
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let end = &v["end"]["sum_received"];
        if let (Some(bytes), Some(s)) = (end["bytes"].as_f64(), end["seconds"].as_f64()) {
            return (bytes, s);
        }
        last = format!("{} {}", v["error"], err.trim());
        crate::check_interrupted();
    }
    panic!("iperf3 failed five times: {last}");
}

/// What a connection the policy does not allow (dev → prod, 198.18.10.1)
/// does in each arm: proof that each arm is in force.
fn probe(place: &Place) -> String {
    let r = Worker::spawn(
        place,
        json!({"job": "probe_connect", "addr": "198.18.10.1", "port": CRR_PORT, "ms": 1000}),
    )
    .result(Duration::from_secs(30));
    r["result"].as_str().unwrap_or("?").to_owned()
}

pub fn run(env: &BenchEnv) -> Value {
    let (mut rounds, ms, iperf_secs) = if env.quick {
        (2, 500, 1)
    } else {
        (11, 2_000, 3)
    };
    // A development aid: ENVGUARD_BENCH_ROUNDS=N overrides the round count.
    if let Some(n) = std::env::var("ENVGUARD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        rounds = n;
    }
    let policy = GenPolicy::new(10_000, 1_000, 42);
    for arm in ["none", "audit", "enforce", "nft"] {
        env.mkdir(&format!("{arm}/dev"));
    }
    let audit_file = env.file(
        "policy-audit.toml",
        &policy.toml("audit", &[env.cg.rel("audit/dev")]),
    );
    let enforce_file = env.file(
        "policy-enforce.toml",
        &policy.toml("enforce", &[env.cg.rel("enforce/dev")]),
    );
    let nft_dev = nft_cgroup_path(&env.cg.rel("nft/dev"));
    let level = env.cg.rel("nft/dev").matches('/').count();
    let sets_file = env.file(
        "nft-sets.nft",
        &policy.nft_equivalent(TABLE, &nft_dev, level),
    );
    let linear_file = env.file(
        "nft-linear.nft",
        &policy.nft_linear(TABLE, &nft_dev, level, 1_000),
    );
    let server = env.server();
    let any = "0.0.0.0";
    let _servers = [
        Worker::server(
            &server,
            json!({"job": "crr_server", "addr": any, "port": CRR_PORT}),
        ),
        Worker::server(
            &server,
            json!({"job": "echo_server", "addr": any, "port": RR_PORT}),
        ),
    ];
    let iperf_server = Worker::spawn(
        &server,
        json!({"job": "exec", "argv": ["iperf3", "-s", "-B", SERVER, "-p", IPERF_PORT.to_string(), "--forceflush"]}),
    );
    iperf_server.wait_line(Duration::from_secs(10), |l| l.contains("Server listening"));
    let tmp = env.tmp.path();
    let audit = BenchAgent::start(
        &env.agent_bin,
        &audit_file,
        &env.cg.rel("audit"),
        Sink::Pipe,
        tmp,
        &[],
    );
    let enforce = BenchAgent::start(
        &env.agent_bin,
        &enforce_file,
        &env.cg.rel("enforce"),
        Sink::Pipe,
        tmp,
        &[],
    );
    let place = |arm: &str| {
        env.client(match arm {
            "none" => "none/dev",
            "envguard-audit" => "audit/dev",
            "envguard-enforce" => "enforce/dev",
            _ => "nft/dev",
        })
    };
    let ruleset = |arm: &str| match arm {
        "nft-sets" => Some(NftTable::load(env, &sets_file)),
        "nft-linear" => Some(NftTable::load(env, &linear_file)),
        _ => None,
    };
    // Proof that each arm is what it claims to be.
    let mut probes = serde_json::Map::new();
    for arm in ARMS {
        let _table = ruleset(arm);
        probes.insert(arm.to_owned(), json!(probe(&place(arm))));
    }
    eprintln!("envguard-bench: e2e: a dev -> prod connection per arm: {probes:?}");

    // samples[workload][arm] = one Sample per round
    let mut samples: BTreeMap<&str, BTreeMap<&str, Vec<Sample>>> = BTreeMap::new();
    let mut loads = Vec::new();
    for round in 0..rounds {
        loads.push(crate::sysinfo::load1());
        eprintln!(
            "envguard-bench: e2e round {}/{rounds} (load {})",
            round + 1,
            crate::sysinfo::loadavg()
        );
        for arm in ARMS {
            crate::check_interrupted();
            let p = place(arm);
            let _table = ruleset(arm);
            let s = [
                measure(|| client_run(&p, "crr_client", CRR_PORT, ms)),
                measure(|| client_run(&p, "rr_client", RR_PORT, ms)),
                measure(|| iperf(&p, iperf_secs)),
            ];
            for (w, s) in WORKLOADS.iter().zip(s) {
                samples
                    .entry(w)
                    .or_default()
                    .entry(arm)
                    .or_default()
                    .push(s);
            }
        }
    }
    drop(iperf_server);
    // The noise-free view: kernel time spent in envguard's programs per
    // operation of the enforce arm, from bpf_stats (on for this run only).
    let mut bpf_per_op = serde_json::Map::new();
    for (w, job, port) in [
        ("connections", "crr_client", CRR_PORT),
        ("request-response", "rr_client", RR_PORT),
    ] {
        let progs = crate::bpf::programs_at(&env.cg.abs("enforce"))
            .unwrap_or_else(|e| panic!("listing the enforce agent's programs: {e}"));
        // Per program: (name, run time, runs).
        let snap = || -> Vec<(String, u64, u64)> {
            progs
                .iter()
                .map(|p| {
                    let i = crate::bpf::prog_info(&p.fd).expect("program info");
                    (p.name.clone(), i.run_time_ns, i.run_cnt)
                })
                .collect()
        };
        let guard = crate::bpf::enable_stats().expect("kernel.bpf_stats_enabled");
        let before = snap();
        let (ops, _) = client_run(&place("envguard-enforce"), job, port, ms.min(1_000));
        let after = snap();
        drop(guard);
        let ops = ops.max(1.0);
        let mut per_program = serde_json::Map::new();
        let (mut t, mut c) = (0u64, 0u64);
        for ((name, t0, c0), (_, t1, c1)) in before.iter().zip(&after) {
            t += t1 - t0;
            c += c1 - c0;
            if c1 > c0 {
                per_program.insert(
                    name.clone(),
                    json!({"ns_per_op": (t1 - t0) as f64 / ops, "runs_per_op": (c1 - c0) as f64 / ops}),
                );
            }
        }
        bpf_per_op.insert(
            w.to_owned(),
            json!({
                "ns_per_op": t as f64 / ops,
                "runs_per_op": c as f64 / ops,
                "programs": per_program,
            }),
        );
    }
    // A call-graph profile of one program while the enforce arm's client
    // runs `job` for 3 s (2 s sampled).
    let profile_of = |job: &str, port: u16, prog: &str, extra: &[&str]| {
        if env.quick {
            return json!("not profiled in a quick run");
        }
        let w = Worker::spawn(
            &place("envguard-enforce"),
            json!({"job": job, "addr": SERVER, "port": port, "ms": 3_000}),
        );
        let data = env.tmp.path().join(format!("perf-{prog}.data"));
        let p = crate::profile::callees(w.pid(), 2, &data, prog, extra);
        let _ = w.result(Duration::from_secs(60));
        p
    };
    // Where connect4's time goes in the connection workload (its client
    // connects without bind(): connect4 creates the socket's storage), and
    // what freeing that storage costs when the socket goes.
    let connect_profile = profile_of(
        "crr_client",
        CRR_PORT,
        "connect4",
        &["bpf_sk_storage_free", "bpf_sk_storage_get"],
    );
    // Where an established flow's packet time goes: `skb_egress` under the
    // request/response workload (one connection, its decision on its socket),
    // run in the client's context as it sends.
    let established_profile = profile_of("rr_client", RR_PORT, "skb_egress", &[]);
    let agent_lines = |a: &BenchAgent| {
        let (n, first) = a.events();
        json!({"count": n, "first": first})
    };
    let agent_events =
        json!({"envguard-audit": agent_lines(&audit), "envguard-enforce": agent_lines(&enforce)});

    let all_steal: Vec<f64> = samples
        .values()
        .flat_map(|a| a.values())
        .flat_map(|v| v[1..].iter().map(|s| s.steal_frac))
        .collect();
    let mut workloads = serde_json::Map::new();
    for w in WORKLOADS {
        let per_arm = &samples[w];
        let base: Vec<f64> = per_arm["none"][1..].iter().map(|s| s.rate).collect();
        let mut arms = serde_json::Map::new();
        for arm in ARMS {
            let kept = &per_arm[arm][1..];
            let rates: Vec<f64> = kept.iter().map(|s| s.rate).collect();
            let ratios: Vec<f64> = rates.iter().zip(&base).map(|(r, b)| r / b).collect();
            let cpu: Vec<f64> = kept.iter().map(|s| s.cpu_per_op).collect();
            let steal: Vec<f64> = kept.iter().map(|s| s.steal_frac).collect();
            arms.insert(
                arm.to_owned(),
                json!({
                    "rate_median": median(&rates),
                    "rate_min": min(&rates),
                    "rate_max": max(&rates),
                    "ratio_median": median(&ratios),
                    "ratio_min": min(&ratios),
                    "ratio_max": max(&ratios),
                    "cpu_s_per_op_median": median(&cpu),
                    "steal_frac_median": median(&steal),
                    "rates": rates,
                    "ratios": ratios,
                    "warmup_rate": per_arm[arm][0].rate,
                }),
            );
        }
        workloads.insert(w.to_owned(), Value::Object(arms));
    }
    json!({
        "rounds": rounds,
        "rounds_kept": rounds - 1,
        "seconds_per_run": {"connections": ms as f64 / 1000.0, "request-response": ms as f64 / 1000.0, "throughput": iperf_secs},
        "units": {"connections": "connections/s", "request-response": "round trips/s", "throughput": "bytes/s"},
        "policy": {"cidrs": policy.total_cidrs, "rules": policy.rules.len()},
        "nft_sets_ruleset_lines": std::fs::read_to_string(&sets_file).map_or(0, |s| s.lines().count()),
        "disallowed_connect_per_arm": probes,
        "agent_records_during_run": agent_events,
        "enforce_bpf_time_per_op": bpf_per_op,
        "connect4_profile": connect_profile,
        "skb_egress_rr_profile": established_profile,
        "load1_per_round": loads,
        "cpu_steal_frac_median": median(&all_steal),
        "cpu_steal_frac_max": max(&all_steal),
        "workloads": workloads,
    })
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
