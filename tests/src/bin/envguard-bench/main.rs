//! `envguard-bench`: the benchmark behind `cargo xtask bench` (issue 6).
//!
//! ```text
//! envguard-bench [--quick] --agent PATH/TO/envguard --out REPO_ROOT
//! ```
//!
//! Runs as root, on the real kernel, with everything it uses built by the
//! integration-test harness and removed on drop: its own cgroup tree, two
//! network namespaces joined by a veth pair, workers, agents (each with its
//! own pin root when the agent pins), nftables tables inside the client
//! namespace only. Measures (1) kernel cost per program run with
//! BPF_PROG_TEST_RUN and with bpf_stats, (2) end-to-end rates against no
//! program and nftables, (3) policy load time, (4) event throughput and
//! agent memory; prints a table and writes `BENCHMARKS.md` and
//! `bench/results.json` under `--out` (with `--quick`: under
//! `--out/target/bench-quick/`, leaving the committed files alone).
//! Nothing here asserts a time.

mod agentrun;
mod bpf;
mod e2e;
mod env;
mod events;
mod kernel;
mod loadtime;
mod policygen;
mod profile;
mod report;
mod sysinfo;
mod tc;
mod worker;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Unwinds (so every guard cleans up) once SIGINT or SIGTERM arrived.
pub fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted");
    }
}

fn usage() -> ! {
    eprintln!("usage: envguard-bench [--quick] --agent PATH/TO/envguard --out REPO_ROOT");
    std::process::exit(2);
}

struct Args {
    quick: bool,
    agent: PathBuf,
    out: PathBuf,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Args {
    let (mut quick, mut agent, mut out) = (false, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--agent" => agent = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            "--out" => out = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            _ => usage(),
        }
    }
    Args {
        quick,
        agent: agent.unwrap_or_else(|| usage()),
        out: out.unwrap_or_else(|| usage()),
    }
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let first = argv.next();
    if first.as_deref() == Some("__worker") {
        worker::main(&argv.next().unwrap_or_else(|| usage()));
    }
    // A development aid: `__gen-policy CIDRS RULES FILE` writes the policy
    // the benchmark generates (env dev at /bench/dev), e.g. to profile
    // `envguard check` on it by hand.
    // A development aid: `__render RESULTS.json [--write DIR]` prints the
    // tables and notes of an earlier run's results again (targets re-judged)
    // and, with --write, rewrites DIR/BENCHMARKS.md from them: the text can
    // change without running everything again.
    if first.as_deref() == Some("__render") {
        let path = argv.next().unwrap_or_else(|| usage());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut r: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        r["targets"] = json!(report::targets(&r));
        let (tables, notes) = (report::tables(&r), report::notes(&r));
        println!("{tables}\n{notes}");
        if argv.next().as_deref() == Some("--write") {
            let dir = PathBuf::from(argv.next().unwrap_or_else(|| usage()));
            std::fs::write(dir.join("BENCHMARKS.md"), markdown(&r, &tables, &notes))
                .unwrap_or_else(|e| panic!("writing BENCHMARKS.md: {e}"));
        }
        return;
    }
    if first.as_deref() == Some("__gen-policy") {
        let a: Vec<String> = argv.collect();
        let [cidrs, rules, file] = a.as_slice() else {
            usage()
        };
        let n = |s: &str| s.parse::<usize>().unwrap_or_else(|_| usage());
        let p = policygen::GenPolicy::new(n(cidrs), n(rules), 42);
        std::fs::write(file, p.toml("audit", &["/bench/dev".to_owned()]))
            .unwrap_or_else(|e| panic!("cannot write {file}: {e}"));
        return;
    }
    let args = parse_args(first.into_iter().chain(argv));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "envguard-bench needs root: it loads eBPF programs, creates cgroups and network namespaces. Run `sudo cargo xtask bench`."
        );
        std::process::exit(1);
    }
    if !args.agent.is_file() {
        eprintln!(
            "envguard-bench: no agent binary at {} (build it with `cargo xtask build`)",
            args.agent.display()
        );
        std::process::exit(1);
    }
    if let Err(e) = ensure_tools() {
        eprintln!("envguard-bench: {e}");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    if bpf::stats_sysctl() != "0" {
        eprintln!(
            "envguard-bench: note: kernel.bpf_stats_enabled is already {} (every program run pays for the accounting)",
            bpf::stats_sysctl()
        );
    }
    let load_start = sysinfo::loadavg();
    if sysinfo::load1() > 0.5 {
        eprintln!(
            "envguard-bench: note: the machine is not idle (load {load_start}); figures will be noisier"
        );
    }
    let mut results = json!({
        "format": 1,
        "quick": args.quick,
        "machine": sysinfo::machine(),
        "bpf_stats_enabled_at_start": bpf::stats_sysctl(),
        "agent": agent_facts(&args.agent),
        "source": git_facts(&args.out),
        "sections": {},
    });
    let mut failed = Vec::new();
    {
        let env =
            match std::panic::catch_unwind(|| env::BenchEnv::new(args.agent.clone(), args.quick)) {
                Ok(e) => e,
                Err(p) => {
                    eprintln!("envguard-bench: setup failed: {}", panic_message(&p));
                    std::process::exit(1);
                }
            };
        type Section = fn(&env::BenchEnv) -> Value;
        let sections: [(&str, Section); 6] = [
            ("test_run", kernel::test_run),
            ("bpf_stats", kernel::bpf_stats),
            ("policy", loadtime::run),
            ("events", events::run),
            ("e2e", e2e::run),
            ("tc", tc::run),
        ];
        // A development aid: ENVGUARD_BENCH_ONLY=e2e,events runs only those.
        let only = std::env::var("ENVGUARD_BENCH_ONLY").ok();
        for (name, run) in sections {
            if only
                .as_deref()
                .is_some_and(|o| !o.split(',').any(|x| x == name))
            {
                continue;
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                results["sections"][name] = json!({"error": "interrupted"});
                failed.push(name);
                continue;
            }
            eprintln!("envguard-bench: == {name} ==");
            let t = Instant::now();
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| run(&env)));
            let v = match r {
                Ok(mut v) => {
                    v["elapsed_s"] = json!(t.elapsed().as_secs_f64());
                    v
                }
                Err(p) => {
                    let msg = panic_message(&p);
                    eprintln!("envguard-bench: section {name} failed: {msg}");
                    failed.push(name);
                    json!({"error": msg})
                }
            };
            results["sections"][name] = v;
        }
    }
    results["load"] = json!({"start": load_start, "end": sysinfo::loadavg()});
    results["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    results["leftovers"] = json!(leftovers());
    results["targets"] = json!(report::targets(&results));
    let dir = if args.quick {
        args.out.join("target/bench-quick")
    } else {
        args.out.clone()
    };
    // The run this one replaces, so the report sets the new figures next
    // to the old ones.
    if let Some(old) = std::fs::read_to_string(dir.join("bench/results.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        results["previous"] = json!({
            "commit": old["source"]["commit"],
            "targets": old["targets"],
        });
    }
    let tables = report::tables(&results);
    let notes = report::notes(&results);
    println!("\n{tables}\n{notes}");
    println!(
        "End-to-end figures are noisy on this VM (shared, 2 vCPUs): lean on the per-run kernel cost."
    );
    if let Err(e) = write_outputs(&dir, &results, &tables, &notes) {
        eprintln!("envguard-bench: cannot write the results: {e}");
        std::process::exit(1);
    }
    if !results["leftovers"].as_array().is_none_or(Vec::is_empty) {
        eprintln!(
            "envguard-bench: left behind (should be empty): {}",
            results["leftovers"]
        );
        failed.push("cleanup");
    }
    if !failed.is_empty() {
        eprintln!("envguard-bench: failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".into())
}

fn tool_ok(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// nftables and iperf3 from Debian, installed only when missing.
fn ensure_tools() -> Result<(), String> {
    if tool_ok("nft") && tool_ok("iperf3") {
        return Ok(());
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "nftables",
                "iperf3",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("envguard-bench: installing nftables and iperf3 (apt-get)");
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        if !install() {
            return Err("cannot install nftables and iperf3 with apt-get".into());
        }
    }
    if tool_ok("nft") && tool_ok("iperf3") {
        Ok(())
    } else {
        Err("nft or iperf3 still missing after apt-get install".into())
    }
}

fn agent_facts(bin: &Path) -> Value {
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let size = std::fs::metadata(bin).map_or(0, |m| m.len());
    json!({"path": bin.display().to_string(), "version": version, "binary_bytes": size})
}

fn git_facts(root: &Path) -> Value {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // What is measured is the agent: changes elsewhere (this benchmark's
    // own files, docs) do not make its figures any less the commit's.
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "envguard-agent",
        "envguard-ebpf",
        "envguard-common",
        "Cargo.lock",
    ])
    .map(|s| !s.is_empty());
    json!({"commit": git(&["rev-parse", "--short", "HEAD"]), "agent_sources_uncommitted_changes": dirty})
}

/// What the benchmark might have left: network namespaces and cgroups of
/// this process, pins of its agents.
fn leftovers() -> Vec<String> {
    let pid = std::process::id();
    let mut out = Vec::new();
    if let Ok(o) = Command::new("ip").args(["netns", "list"]).output() {
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name.contains(&format!("-{pid}-")) {
                out.push(format!("netns {name}"));
            }
        }
    }
    let mount = envguard_tests::sys::cgroup2_mount();
    for (dir, prefix) in [
        (mount.to_path_buf(), format!("envguard-t-{pid}-")),
        (
            PathBuf::from("/sys/fs/bpf"),
            format!("envguard-bench-agent-{pid}-"),
        ),
    ] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

fn write_outputs(dir: &Path, results: &Value, tables: &str, notes: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("bench"))?;
    let json_path = dir.join("bench/results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(results).unwrap_or_default() + "\n",
    )?;
    let md_path = dir.join("BENCHMARKS.md");
    std::fs::write(&md_path, markdown(results, tables, notes))?;
    eprintln!(
        "envguard-bench: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

fn markdown(r: &Value, tables: &str, notes: &str) -> String {
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(
            "## Notes on the missed targets\n\nFrom this run's figures and profiles; the suggested changes are to the agent and its kernel programs, which this benchmark only measures.\n\n{}\n\n",
            notes.trim_end()
        )
    };
    let m = &r["machine"];
    let src = &r["source"];
    let commit = src["commit"].as_str().unwrap_or("unknown");
    let dirty = if src["agent_sources_uncommitted_changes"] == json!(true) {
        " (with uncommitted changes to the agent's sources)"
    } else {
        ""
    };
    let quick = if r["quick"] == json!(true) {
        "\n> **Quick run** (`--quick`: 2 rounds, small counts): a smoke test, not figures to quote.\n"
    } else {
        ""
    };
    format!(
        r#"# envguard benchmarks

Generated by `cargo xtask bench` (the `envguard-bench` binary of `tests/`); the
raw figures are in `bench/results.json`. `cargo xtask bench --quick` is the
smoke run CI does: it writes its files to `target/bench-quick/` and leaves
these alone.
{quick}
## Machine

| | |
|---|---|
| CPU | {cpu} × {cpus} |
| kernel | {kernel} |
| memory | {mem} MiB |
| date | {date} |
| load average (1, 5, 15 min) | {load0} at start, {load1} at the end |
| mitigations (calls and returns) | {mitigations} |
| envguard | {version}, commit {commit}{dirty} |
| run time | {elapsed:.0} s |

A shared 2-vCPU VM: another engineer compiles Rust on it at times. The load
average above says how quiet it was.

## Results

{tables}
{notes}## Method

**1a. Per-run cost, BPF_PROG_TEST_RUN.** The real agent runs (enforce mode)
attached at a cgroup of the benchmark's own tree, with generated policies
of 10 to 100 000 CIDRs (disjoint, inside 198.18.0.0/15: /24–/32 at small
sizes, all /32 at 100 000, spread over 20 envs) and 1 000 allow rules (plus a
10-CIDR, 3-rule baseline). Its `skb_egress` and `skb_ingress` are found by
name (BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD),
kept only if BPF_PROG_QUERY shows them attached at the benchmark's cgroup.
A worker process in the tagged cgroup (env `dev`) and the client netns
calls BPF_PROG_TEST_RUN with a 54-byte Ethernet + IPv4 + TCP packet and an
`__sk_buff` context whose `ifindex` is the client veth. For cgroup_skb the
kernel builds the skb from the data with `eth_type_trans()`, which pulls the
Ethernet header: the program sees the packet from its IP header, as on the
real hook (only tc programs get the L2 header pushed back). Without the
ifindex the skb's device is loopback, which both programs pass at once. Each
call gets a fresh dummy socket, created in the caller's cgroup (so the
program's cgroup walk resolves env `dev`) with a fresh socket cookie.
- *Steady state*: one call, large repeat count, the same ACK packet: the
  first run classifies the flow and caches the decision per (socket cookie,
  remote address, remote port, protocol); every further run takes the cached
  path. The kernel reports the mean per run; the table gives the median of
  several calls.
- *Classification*: many calls with repeat = 1, each with a new socket
  (cookie) and a new remote port, so every run misses the cache and
  classifies (cgroup walk, CIDR longest-prefix match, rule lookup, cache
  insert; for ingress SYNs also the inbound-tuple insert). The remote
  address is either a new random one inside the policy's CIDRs every run
  (egress and ingress from separate streams: the trie walk meets whatever
  the CPU caches hold, as for real new connections to many destinations),
  or always the same one ("hot": the walk's nodes stay cached, which
  isolates the algorithmic cost of a bigger trie). A single run's figure
  includes one clock read, so the empty program is run the same way,
  interleaved call by call, and the classification cost is the difference
  of medians. The LRU maps are sized so that no entry is evicted during
  these calls.
- *Profile* (full run, largest policy): `perf record -e cpu-clock` of a
  worker looping test runs of `skb_egress`, steady state and cold
  classification; flat profile by symbol.
- *Floor*: an empty cgroup_skb program (`r0 = 1; exit`) loaded with a raw
  BPF_PROG_LOAD, run exactly like the program under test.
- Every test flow is allowed by the policy (no event is emitted); the table
  counts runs that did not return "pass".

**1b. Per-run cost under traffic, bpf_stats.** `kernel.bpf_stats_enabled`
is set to 1 only for this pass and its previous value written back by a
guard (also on panic or Ctrl-C; the values before, during and after are
shown). TCP over both families with an explicit bind
(post_bind4/6, connect4/6, the packet hooks) and unconnected
UDP datagrams (sendmsg4/6) run from env `dev` through the veth; run_time_ns
/ run_cnt deltas per program. Empty programs attached (with links) to the
client's cgroup see the same packets: their figure is the accounting floor
(bpf_stats costs about 90 ns per run here).

**2. End to end.** Client in a cgroup of the benchmark's tree in one netns,
servers in another netns (outside every attach point) behind a veth pair.
Workloads: connection rate (connect, the iterative server accepts, writes
one byte and closes; the client reads it and closes with RST so that no
TIME_WAIT piles up), request/response rate (one byte each way on one
TCP_NODELAY connection), one-stream throughput (iperf3). Arms, each with
its own client cgroup: A no program; B envguard audit; C envguard enforce
(allowed traffic), both with the same 10 000-CIDR, 1 000-rule policy and
both agents running throughout; D nftables with an equivalent, stateful
policy in the client netns (conntrack `established,related` first; a new
flow's remote address selects its env's chain through one interval verdict
map of the same CIDRs, matched with `socket cgroupv2` on the client's
cgroup; the chain holds that env pair's allow rules and drops the rest);
E nftables with 1 000 linear stateless rules on output (known-bad
reference). The nft tables exist only during their arm. Rounds run
A B C D E; the first round is dropped; ratios are paired per round against
A. CPU per operation is the busy time of all CPUs from /proc/stat. A
connection dev → prod (allowed by no rule) is tried once per arm to show
each arm is in force (`EPERM` for envguard enforce, `timeout` for the nft
drop, `connected` where nothing enforces).

**3. Policy.** Wall time from spawning `envguard run` to its
`policy_loaded` line (programs loaded, maps filled, programs attached) for a
10-CIDR and a 100 000-CIDR policy; `envguard check` of the same files
(parse and validate only); the kernel's share of map filling measured alone
by writing the same IPv4 entries into a bare LPM trie with one
BPF_MAP_UPDATE_ELEM each, and with BPF_MAP_UPDATE_BATCH where the kernel
takes it for LPM tries (what batching would save the agent).
When the agent has `envguard mode` and `envguard reload` (it grew them while
this benchmark was written; without them the figures read "not available
yet"), a 100 000-CIDR agent runs in audit mode while a watcher in env `dev`
calls connect() towards prod over and over and timestamps every change of
answer (audit lets it through, enforce refuses it with EPERM): the toggle
time runs from starting `envguard mode enforce|audit` to the first call the
kernel answers the new way. The reload swaps the file for another
100 000-CIDR policy (every CIDR different) and times `envguard reload`
until it returns.

**4. Events.** Agent in audit mode, stdout redirected to a file (with
`--dedup-interval 0` when the agent folds repeats in the kernel, so that
every violating call is one record). A sender
in env `dev` calls connect() on one UDP socket towards prod as fast as it
can: each call is judged by connect4 and yields one violation record, and
no packet leaves. Every call is accounted for (a `violation` line or a
`lost_events` count). Records per second = records written / time from the
sender's start to the last record written; agent CPU from
/proc/<pid>/stat; RSS (VmRSS) from /proc/<pid>/status after `policy_loaded`.

## Caveats

- End-to-end figures are noisy on this VM (seen: 2.3k–44k transactions/s
  within minutes): the two vCPUs are shared with the hypervisor and, at
  times, with compilations. The medians of paired ratios are the most
  robust of those figures; conclusions rest on the per-run kernel cost.
- BPF_PROG_TEST_RUN runs the program directly, without the cgroup hook's
  own dispatch (effective-program array, skb pull): the real hook costs a
  little more per packet for every program, the empty one included.
- The VM has no hardware performance counters (`perf stat` reports
  instructions and cycles as not supported); program size is reported in
  BPF instructions and JITed bytes instead.
- Nothing here asserts a time: the benchmark is not a test.
"#,
        cpu = m["cpu_model"].as_str().unwrap_or("?"),
        cpus = m["cpus"],
        kernel = m["kernel"].as_str().unwrap_or("?"),
        mem = m["mem_total_mib"],
        date = m["date"].as_str().unwrap_or("?"),
        load0 = r["load"]["start"].as_str().unwrap_or("?"),
        load1 = r["load"]["end"].as_str().unwrap_or("?"),
        mitigations = match &m["mitigations"] {
            Value::Object(v) => v
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; "),
            _ => "not recorded".to_owned(),
        },
        version = r["agent"]["version"].as_str().unwrap_or("?"),
        elapsed = r["elapsed_s"].as_f64().unwrap_or(0.0),
    )
}
