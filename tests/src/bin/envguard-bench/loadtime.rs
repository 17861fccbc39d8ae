//! Section 3: policy load, reload, mode toggle.
//!
//! - Load: wall time from spawning `envguard run` to its `policy_loaded`
//!   line (everything in force) for a 10-CIDR and a 100 000-CIDR policy
//!   (20 000 in a quick run);
//!   `envguard check` of both (parsing and validation alone); the kernel
//!   side of map filling on its own (the same IPv4 entries written into a
//!   bare LPM trie of the agent's key/value sizes, one BPF_MAP_UPDATE_ELEM
//!   each, and with BPF_MAP_UPDATE_BATCH); agent RSS after `policy_loaded`.
//! - Mode toggle, when the agent has `envguard mode`: a watcher in env
//!   `dev` calls connect() towards prod over and over (audit lets it
//!   through, enforce refuses it with EPERM) and timestamps every change;
//!   the toggle time is from starting `envguard mode …` to the first call
//!   the kernel answers the new way. The big policy is loaded.
//! - Reload, when the agent has `envguard reload`: the policy file is
//!   replaced by another policy as big (every CIDR different) and
//!   `envguard reload` timed until it returns (it returns once the new
//!   policy is in force).
//!
//! Without those commands the figures are "not available yet".

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agentrun::{BenchAgent, Sink, has_command};
use crate::bpf;
use crate::env::BenchEnv;
use crate::policygen::{GenPolicy, SITES, VIOLATION_PORT};
use crate::sysinfo::proc_status_kib;
use crate::worker::{Worker, monotonic_ns};

/// Repetitions stop early once this much time went into one measurement.
const BUDGET: Duration = Duration::from_secs(20);

fn repeat(reps: usize, mut f: impl FnMut()) {
    let t = Instant::now();
    for _ in 0..reps {
        f();
        if t.elapsed() > BUDGET {
            break;
        }
    }
}

pub fn run(env: &BenchEnv) -> Value {
    let reps = if env.quick { 1 } else { 5 };
    let mut policies = Vec::new();
    for (i, (cidrs, rules)) in [(10, 3), (env.big(), 1_000)].into_iter().enumerate() {
        crate::check_interrupted();
        let sub = format!("p{i}");
        let root = env.mkdir(&sub);
        let dev = env.mkdir(&format!("{sub}/dev"));
        let policy = GenPolicy::new(cidrs, rules, 42);
        let file = env.file(
            &format!("policy-p{i}.toml"),
            &policy.toml("enforce", std::slice::from_ref(&dev)),
        );
        let mut check_ms = Vec::new();
        repeat(reps, || {
            let t = Instant::now();
            let out = Command::new(&env.agent_bin)
                .arg("check")
                .arg("--policy")
                .arg(&file)
                .output()
                .expect("running envguard check");
            check_ms.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(
                out.status.success(),
                "envguard check refused the generated policy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
        let mut load_ms = Vec::new();
        let mut rss = Vec::new();
        repeat(reps, || {
            let agent = BenchAgent::start(
                &env.agent_bin,
                &file,
                &root,
                Sink::Pipe,
                env.tmp.path(),
                &[],
            );
            load_ms.push(agent.ready_after.as_secs_f64() * 1e3);
            rss.push(json!({
                "vm_rss_kib": proc_status_kib(agent.pid(), "VmRSS"),
                "vm_hwm_kib": proc_status_kib(agent.pid(), "VmHWM"),
            }));
            agent.stop();
        });
        eprintln!(
            "envguard-bench: policy of {} CIDRs: check {check_ms:.0?} ms, loaded in {load_ms:.0?} ms",
            policy.total_cidrs
        );
        // A load far over its target gets a profile of where `check` (the
        // same parsing and validation) spends the time (full run only).
        let check_profile = if !env.quick && crate::e2e::median(&check_ms) > 1_000.0 {
            crate::profile::record_command(
                &env.agent_bin,
                &["check".as_ref(), "--policy".as_ref(), file.as_os_str()],
                &env.tmp.path().join("perf-check.data"),
            )
        } else {
            Value::Null
        };
        policies.push(json!({
            "check_profile": check_profile,
            "cidrs": policy.total_cidrs,
            "rules": policy.rules.len(),
            "policy_bytes": std::fs::metadata(&file).map_or(0, |m| m.len()),
            "check_ms": check_ms,
            "check_ms_median": crate::e2e::median(&check_ms),
            "start_to_policy_loaded_ms": load_ms,
            "start_to_policy_loaded_ms_median": crate::e2e::median(&load_ms),
            "rss_after_load": rss,
        }));
    }
    let (toggle, reload) = runtime_changes(env);
    json!({
        "policies": policies,
        "lpm_fill": lpm_fill(env.big(), reps),
        "mode_toggle": toggle,
        "reload": reload,
    })
}

/// `envguard mode` and `envguard reload` against a running agent with the
/// big policy, when the agent has them.
fn runtime_changes(env: &BenchEnv) -> (Value, Value) {
    let bin = &env.agent_bin;
    let can_toggle = has_command(bin, "mode");
    let can_reload = has_command(bin, "reload");
    if !can_toggle && !can_reload {
        let na = json!("not available yet: the agent has no such command");
        return (na.clone(), na);
    }
    let root = env.mkdir("rt");
    let dev = env.mkdir("rt/dev");
    let file = env.file(
        "policy-rt.toml",
        &GenPolicy::new(env.big(), 1_000, 42).toml("audit", std::slice::from_ref(&dev)),
    );
    let agent = BenchAgent::start(bin, &file, &root, Sink::Pipe, env.tmp.path(), &[]);
    let Some(pin_root) = agent.pin_root().map(ToOwned::to_owned) else {
        let na = json!("not measured: the agent has the command but no --pin-root to find it by");
        return (na.clone(), na);
    };
    let control = |args: &[&str]| -> (f64, Result<(), String>) {
        let t = Instant::now();
        let out = Command::new(bin)
            .args(args)
            .arg("--pin-root")
            .arg(&pin_root)
            .output();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let res = match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "envguard {} failed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run envguard {}: {e}", args.join(" "))),
        };
        (ms, res)
    };

    let toggle = if can_toggle {
        let watch = Worker::spawn(
            &env.client("rt/dev"),
            json!({"job": "mode_watch", "addr": "198.18.10.1", "port": VIOLATION_PORT}),
        );
        let state = |l: &str| -> Option<(String, u64)> {
            let v: Value = serde_json::from_str(l).ok()?;
            Some((v["state"].as_str()?.to_owned(), v["t_ns"].as_u64()?))
        };
        watch.wait_line(Duration::from_secs(10), |l| l.contains("\"ready\":true"));
        // The policy says audit: the watcher's calls go through.
        watch.wait_line(Duration::from_secs(10), |l| {
            state(l).is_some_and(|s| s.0 == "ok")
        });
        let (mut to_kernel, mut command) = (Vec::new(), Vec::new());
        let mut error = None;
        let n = if env.quick { 2 } else { 10 };
        for i in 0..n {
            crate::check_interrupted();
            let (mode, expect) = if i % 2 == 0 {
                ("enforce", "EPERM")
            } else {
                ("audit", "ok")
            };
            let t0 = monotonic_ns();
            let (ms, res) = control(&["mode", mode]);
            if let Err(e) = res {
                error = Some(e);
                break;
            }
            let line = watch.wait_line(Duration::from_secs(10), |l| {
                state(l).is_some_and(|s| s.0 == expect)
            });
            let t = state(&line).map_or(t0, |s| s.1);
            to_kernel.push(t.saturating_sub(t0) as f64 / 1e6);
            command.push(ms);
        }
        match error {
            Some(e) => json!(format!("not measured: {e}")),
            None => json!({
                "toggles": n,
                "cidrs": env.big(),
                "to_kernel_ms": to_kernel,
                "to_kernel_ms_median": crate::e2e::median(&to_kernel),
                "to_kernel_ms_max": to_kernel.iter().copied().fold(0.0, f64::max),
                "command_ms": command,
                "command_ms_median": crate::e2e::median(&command),
            }),
        }
    } else {
        json!("not available yet: the agent has no `mode` command")
    };

    let reload = if can_reload {
        let mut ms = Vec::new();
        let mut error = None;
        let n = if env.quick { 1 } else { 3 };
        let t = Instant::now();
        for i in 0..n {
            crate::check_interrupted();
            // Alternate between two policies with different CIDRs.
            let seed = if i % 2 == 0 { 43 } else { 42 };
            std::fs::write(
                &file,
                GenPolicy::new(env.big(), 1_000, seed).toml("audit", std::slice::from_ref(&dev)),
            )
            .expect("rewriting the policy");
            let (m, res) = control(&["reload"]);
            if let Err(e) = res {
                error = Some(e);
                break;
            }
            ms.push(m);
            if t.elapsed() > BUDGET {
                break;
            }
        }
        match error {
            Some(e) => json!(format!("not measured: {e}")),
            None => json!({
                "cidrs": env.big(),
                "reload_ms": ms,
                "reload_ms_median": crate::e2e::median(&ms),
            }),
        }
    } else {
        json!("not available yet: the agent has no `reload` command")
    };
    agent.stop();
    (toggle, reload)
}

/// The kernel's share of loading `n` CIDRs: single updates into a bare
/// LPM trie, and batched ones.
fn lpm_fill(n: usize, reps: usize) -> Value {
    let policy = GenPolicy::new(n, 3, 42);
    let mut entries: Vec<(u32, [u8; 4], u32)> = SITES
        .iter()
        .map(|(_, c, _)| {
            let (a, l) = c.split_once('/').expect("CIDR");
            (
                l.parse().expect("prefix"),
                a.parse::<std::net::Ipv4Addr>().expect("address").octets(),
                2,
            )
        })
        .collect();
    entries.extend(
        policy
            .cidrs
            .iter()
            .enumerate()
            .map(|(i, (l, a, _))| (u32::from(*l), a.octets(), 5 + (i % 20) as u32)),
    );
    let mut ms = Vec::new();
    for _ in 0..reps {
        let map = bpf::create_lpm_v4(262_144).expect("creating an LPM trie");
        let t = Instant::now();
        for &(l, a, v) in &entries {
            bpf::lpm_v4_update(&map, l, a, v).expect("BPF_MAP_UPDATE_ELEM");
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The same entries with BPF_MAP_UPDATE_BATCH, 10 000 per call, where the
    // kernel supports it for LPM tries (older kernels refuse with ENOTSUPP).
    let mut batch_ms = Vec::new();
    let mut batch = "supported".to_owned();
    for _ in 0..reps {
        let map = bpf::create_lpm_v4(262_144).expect("creating an LPM trie");
        let t = Instant::now();
        let res = entries
            .chunks(10_000)
            .try_for_each(|c| bpf::lpm_v4_update_batch(&map, c));
        match res {
            Ok(()) => batch_ms.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                batch = match e.raw_os_error() {
                    Some(524) => "refused: ENOTSUPP (524)".to_owned(),
                    _ => format!("refused: {e}"),
                };
                break;
            }
        }
    }
    json!({
        "entries": entries.len(),
        "single_updates_ms": ms,
        "single_updates_ms_median": crate::e2e::median(&ms),
        "batch_update_on_lpm_trie": batch,
        "batch_updates_ms": batch_ms,
        "batch_updates_ms_median": if batch_ms.is_empty() { Value::Null } else { json!(crate::e2e::median(&batch_ms)) },
    })
}
