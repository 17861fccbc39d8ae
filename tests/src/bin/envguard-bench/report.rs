//! The results as tables (printed, and in BENCHMARKS.md) and the targets
//! of issue 6 judged against them.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::e2e::{ARMS, WORKLOADS};

/// The events row of the targets table (issue: ≥ 200 k/s at ≤ 50 % of a core).
const EVENTS_TARGET: &str = "≥ 200 000 violation records/s to a file sink at ≤ 50 % of one core";

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn ns(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.1}"))
}

/// 12345.6 → "12.3 k", 1.2e9 → "1.20 G".
fn si(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let (v, u) = if x >= 1e9 {
        (x / 1e9, " G")
    } else if x >= 1e6 {
        (x / 1e6, " M")
    } else if x >= 1e3 {
        (x / 1e3, " k")
    } else {
        (x, " ")
    };
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{s}{u}").trim_end().to_owned()
}

fn section<'a>(r: &'a Value, name: &str) -> Option<&'a Value> {
    let s = &r["sections"][name];
    (s.is_object() && s.get("error").is_none()).then_some(s)
}

fn error_line(r: &Value, name: &str) -> Option<String> {
    r["sections"][name]["error"].as_str().map(|e| {
        format!(
            "**Not measured: the section failed:** `{}`\n",
            e.lines().next().unwrap_or(e)
        )
    })
}

/// Steady-state cost over the floor (ns), per case: (egress, ingress).
fn steady_over_floor(r: &Value) -> Vec<(f64, f64)> {
    let Some(s) = section(r, "test_run") else {
        return Vec::new();
    };
    s["cases"]
        .as_array()
        .map(|cases| {
            cases
                .iter()
                .filter_map(|c| {
                    let floor = f(&c["empty_steady_ns"]["median"])?;
                    Some((
                        f(&c["egress_steady_ns"]["median"])? - floor,
                        f(&c["ingress_steady_ns"]["median"])? - floor,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The per-connection program time row.
const PER_CONNECTION_TARGET: &str =
    "Program time per new TCP connection ≤ 1.5 µs (all hooks, accounting removed)";

/// envguard's program time per connection of the enforce arm, without the
/// accounting (the empty program's cost under bpf_stats, per run): (ns, runs).
fn connection_program_ns(r: &Value) -> Option<(f64, f64)> {
    let b = &section(r, "e2e")?["enforce_bpf_time_per_op"]["connections"];
    let ns = f(&b["ns_per_op"])?;
    let runs = f(&b["runs_per_op"])?;
    let empty = section(r, "bpf_stats")?["programs"]
        .as_array()?
        .iter()
        .find(|p| p["program"] == "empty (egress)")
        .and_then(|p| f(&p["ns_per_run"]))?;
    Some((ns - runs * empty, runs))
}

/// The established-flow row: the steady state, under real traffic.
const ESTABLISHED_TARGET: &str = "Established TCP flow, per packet ≤ empty program + 30 ns";

/// An established flow's packet cost over the empty program's, both under
/// the same real traffic with bpf_stats: (egress, ingress).
fn established_over_floor(r: &Value) -> Option<(f64, f64)> {
    let progs = section(r, "bpf_stats")?["established"]["programs"].as_array()?;
    let ns_of = |name: &str| {
        progs
            .iter()
            .find(|p| p["program"] == name)
            .and_then(|p| f(&p["ns_per_run"]))
    };
    Some((
        ns_of("skb_egress")? - ns_of("empty (egress)")?,
        ns_of("skb_ingress")? - ns_of("empty (ingress)")?,
    ))
}

/// Classification cost over the one-run floor at `cidrs` CIDRs (1 000 rules).
fn classify_over_floor(r: &Value, cidrs: u64, variant: &str) -> Option<(f64, f64)> {
    let s = section(r, "test_run")?;
    let c = s["cases"].as_array()?.iter().find(|c| {
        c["rules"].as_u64() == Some(1_000)
            && c["cidrs"]
                .as_u64()
                .is_some_and(|n| n.abs_diff(cidrs) <= cidrs / 100 + 6)
    })?;
    let floor = f(&c[format!("empty_once{variant}_ns")]["median"])?;
    Some((
        f(&c[format!("egress_classify{variant}_ns")]["median"])? - floor,
        f(&c[format!("ingress_classify{variant}_ns")]["median"])? - floor,
    ))
}

/// The targets with the measured figure and MET / MISSED.
pub fn targets(r: &Value) -> Vec<Value> {
    let mut t = Vec::new();
    let mut push = |target: &str, measured: String, status: &str| {
        t.push(json!({"target": target, "measured": measured, "status": status}));
    };
    let met = |ok: bool| if ok { "MET" } else { "MISSED" };
    let quick = r["quick"] == json!(true);
    let nm = || -> String {
        if quick {
            "not measured in a quick run (smaller policies, fewer rounds)".into()
        } else {
            "not measured (see the section's error)".into()
        }
    };

    match established_over_floor(r) {
        Some((e, i)) => push(
            ESTABLISHED_TARGET,
            format!(
                "skb_egress +{e:.1} ns, skb_ingress +{i:.1} ns (bpf_stats, real TCP traffic, over the empty programs on the same packets)"
            ),
            met(e <= 30.0 && i <= 30.0),
        ),
        None => push(ESTABLISHED_TARGET, nm(), "NOT MEASURED"),
    }
    let steady = steady_over_floor(r);
    if steady.is_empty() {
        push(
            "Steady-state path of a cached flow without its socket (test run) ≤ empty program + 30 ns",
            nm(),
            "NOT MEASURED",
        );
    } else {
        let we = steady.iter().map(|s| s.0).fold(f64::MIN, f64::max);
        let wi = steady.iter().map(|s| s.1).fold(f64::MIN, f64::max);
        push(
            "Steady-state path of a cached flow without its socket (test run) ≤ empty program + 30 ns",
            format!(
                "skb_egress +{we:.1} ns, skb_ingress +{wi:.1} ns (worst over all policy sizes; BPF_PROG_TEST_RUN)"
            ),
            met(we <= 30.0 && wi <= 30.0),
        );
    }
    match (
        classify_over_floor(r, 1_000, ""),
        classify_over_floor(r, 100_000, ""),
    ) {
        (Some(a), Some(b)) => {
            let (re, ri) = (b.0 / a.0, b.1 / a.1);
            let hot = match (
                classify_over_floor(r, 1_000, "_hot"),
                classify_over_floor(r, 100_000, "_hot"),
            ) {
                (Some(x), Some(y)) => format!(
                    "; same remote every run (trie path cached): {:.2}× and {:.2}×",
                    y.0 / x.0,
                    y.1 / x.1
                ),
                _ => String::new(),
            };
            push(
                "Classification path at 100 000 CIDRs ≤ 1.5 × its cost at 1 000",
                format!(
                    "random remotes: skb_egress {:.0} → {:.0} ns = {re:.2}×, skb_ingress {:.0} → {:.0} ns = {ri:.2}× (cost above the empty program, medians){hot}",
                    a.0, b.0, a.1, b.1
                ),
                met(re <= 1.5 && ri <= 1.5),
            );
        }
        _ => push(
            "Classification path at 100 000 CIDRs ≤ 1.5 × its cost at 1 000",
            nm(),
            "NOT MEASURED",
        ),
    }
    if let Some(e) = section(r, "e2e") {
        let c = &e["workloads"]["connections"];
        let enf = f(&c["envguard-enforce"]["ratio_median"]).unwrap_or(f64::NAN);
        let nft = f(&c["nft-sets"]["ratio_median"]).unwrap_or(f64::NAN);
        push(
            "Connection rate, envguard enforcing ≥ 0.97 × no program, and not below the nftables-set arm",
            format!(
                "{enf:.3} × no program (rounds {:.2}–{:.2}); nftables sets {nft:.3} ×",
                f(&c["envguard-enforce"]["ratio_min"]).unwrap_or(f64::NAN),
                f(&c["envguard-enforce"]["ratio_max"]).unwrap_or(f64::NAN)
            ),
            met(enf >= 0.97 && enf >= nft),
        );
        let rr = f(&e["workloads"]["request-response"]["envguard-enforce"]["ratio_median"])
            .unwrap_or(f64::NAN);
        let tp = f(&e["workloads"]["throughput"]["envguard-enforce"]["ratio_median"])
            .unwrap_or(f64::NAN);
        push(
            "Request/response ≥ 0.99 × and throughput ≥ 0.98 × no program, envguard enforcing",
            format!("request/response {rr:.3} ×, throughput {tp:.3} × (medians of the rounds)"),
            met(rr >= 0.99 && tp >= 0.98),
        );
        match connection_program_ns(r) {
            Some((net, runs)) => push(
                PER_CONNECTION_TARGET,
                format!(
                    "{net:.0} ns in {runs:.0} program runs per connection (bpf_stats, enforce arm, the accounting's own cost taken off)"
                ),
                met(net <= 1500.0),
            ),
            None => push(PER_CONNECTION_TARGET, nm(), "NOT MEASURED"),
        }
    } else {
        push(
            "Connection rate, envguard enforcing ≥ 0.97 × no program, and not below the nftables-set arm",
            nm(),
            "NOT MEASURED",
        );
    }
    let big = section(r, "policy").and_then(|p| {
        p["policies"]
            .as_array()?
            .iter()
            .find(|x| x["cidrs"].as_u64().unwrap_or(0) >= 100_000)
            .cloned()
    });
    match big
        .as_ref()
        .and_then(|b| f(&b["start_to_policy_loaded_ms_median"]))
    {
        Some(ms) => push(
            "100 000-CIDR policy loaded in < 1 s",
            format!("{ms:.0} ms from starting `envguard run` to `policy_loaded` (median)"),
            met(ms < 1000.0),
        ),
        None => push("100 000-CIDR policy loaded in < 1 s", nm(), "NOT MEASURED"),
    }
    let toggle = section(r, "policy").map(|p| p["mode_toggle"].clone());
    match toggle.as_ref().map(|t| (t, f(&t["to_kernel_ms_median"]))) {
        Some((t, Some(ms))) => push(
            "Mode toggle in the kernel < 10 ms after the command starts",
            format!(
                "{ms:.1} ms median, {:.1} ms worst of {} toggles (from starting `envguard mode` to the first connect() the kernel answers the new way; {}-CIDR policy)",
                f(&t["to_kernel_ms_max"]).unwrap_or(f64::NAN),
                t["toggles"],
                thousands(&t["cidrs"])
            ),
            met(ms < 10.0),
        ),
        Some((t, None)) => push(
            "Mode toggle in the kernel < 10 ms after the command starts",
            t.as_str().unwrap_or("not measured").to_owned(),
            "NOT MEASURED",
        ),
        None => push(
            "Mode toggle in the kernel < 10 ms after the command starts",
            nm(),
            "NOT MEASURED",
        ),
    }
    match section(r, "events") {
        Some(ev) => {
            let rate = f(&ev["written_per_s"]).unwrap_or(0.0);
            let util = f(&ev["agent_cpu_utilisation"]).unwrap_or(0.0);
            let lost = ev["lost"].as_u64().unwrap_or(0);
            let bound = if lost > 0 || util > 0.85 {
                "agent-bound"
            } else {
                "sender-bound: the agent kept up"
            };
            // The sender has one vCPU and may offer fewer than 200 000
            // calls/s: then the agent's CPU per record says what 200 000/s
            // would cost it, and the row says which of the two it rests on.
            let ms_per_1000 = f(&ev["agent_cpu_ms_per_1000"]).unwrap_or(f64::INFINITY);
            let at_target = ms_per_1000 * 200.0 / 1000.0;
            let (verdict, basis) = if rate >= 200_000.0 && lost == 0 && util > 0.5 {
                // More than the target offered: the agent's CPU at 200 000/s
                // is its CPU per record times 200 000, not what a faster
                // sender made it spend.
                (
                    if at_target <= 0.5 {
                        "MET (by CPU per record)"
                    } else {
                        "MISSED"
                    },
                    "from CPU per record, at a higher rate",
                )
            } else if rate >= 200_000.0 {
                (met(util <= 0.5 && lost == 0), "measured")
            } else if lost == 0 {
                (
                    if at_target <= 0.5 {
                        "MET (by CPU per record)"
                    } else {
                        "MISSED"
                    },
                    "from CPU per record",
                )
            } else {
                ("MISSED", "agent-bound")
            };
            push(
                EVENTS_TARGET,
                format!(
                    "{} records/s ({bound}; agent CPU {:.0} %, {lost} lost); {ms_per_1000:.2} ms of agent CPU per 1 000 records: 200 000/s would take {:.0} % of a core ({basis})",
                    si(rate),
                    util * 100.0,
                    at_target * 100.0
                ),
                verdict,
            );
            let rss = ev["rss_idle_kib"].as_u64().unwrap_or(u64::MAX);
            push(
                "Agent RSS < 32 MiB idle",
                format!(
                    "{:.1} MiB (VmRSS after policy_loaded, small policy){}",
                    rss as f64 / 1024.0,
                    big_rss(r).map_or(String::new(), |(n, m)| format!(
                        "; {m:.1} MiB with {} CIDRs loaded",
                        thousands(&json!(n as u64))
                    ))
                ),
                met(rss < 32 * 1024),
            );
        }
        None => {
            push(EVENTS_TARGET, nm(), "NOT MEASURED");
            push("Agent RSS < 32 MiB idle", nm(), "NOT MEASURED");
        }
    }
    t
}

/// A profile's rows as "symbol 12.3 %, …" (or the note it has instead).
fn profile_list(rows: &Value) -> String {
    rows.as_array().map_or_else(
        || rows.as_str().unwrap_or("?").to_owned(),
        |rows| {
            rows.iter()
                .map(|r| {
                    format!(
                        "{} {:.1} %",
                        r["symbol"].as_str().unwrap_or("?"),
                        f(&r["pct"]).unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
    )
}

fn case_label(c: &Value) -> String {
    format!(
        "{} CIDRs, {} rules",
        thousands(&c["cidrs"]),
        thousands(&c["rules"])
    )
}

/// 100000 → "100 000".
fn thousands(v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return v.to_string();
    };
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(ch);
    }
    out
}

/// The tables, as Markdown (also what the terminal shows).
pub fn tables(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### 1a. Kernel cost per run: BPF_PROG_TEST_RUN (ns, lower is better)\n"
    );
    if let Some(t) = section(r, "test_run") {
        let _ = writeln!(
            s,
            "Steady state: mean of {} runs of one cached flow (median of {} calls). Classification: median of {} single runs, each with a new socket and remote port; the remote address is a new random one inside the policy's CIDRs each run, or (\"hot\") always the same. `(+x)`: above the empty program measured the same way.\n",
            t["repeat"], t["big_calls"], t["calls"]
        );
        s.push_str("| policy | empty program | skb_egress steady | skb_ingress steady | empty, 1 run | skb_egress classify | skb_ingress classify | skb_egress classify, hot | skb_ingress classify, hot |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        for c in t["cases"].as_array().into_iter().flatten() {
            let floor = f(&c["empty_steady_ns"]["median"]);
            let once = f(&c["empty_once_ns"]["median"]);
            let hot = f(&c["empty_once_hot_ns"]["median"]);
            let cell = |v: Option<f64>, base: Option<f64>| match (v, base) {
                (Some(v), Some(b)) => format!("{v:.0} (+{:.0})", v - b),
                (v, _) => ns(v),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                case_label(c),
                ns(floor),
                cell(f(&c["egress_steady_ns"]["median"]), floor),
                cell(f(&c["ingress_steady_ns"]["median"]), floor),
                ns(once),
                cell(f(&c["egress_classify_ns"]["median"]), once),
                cell(f(&c["ingress_classify_ns"]["median"]), once),
                cell(f(&c["egress_classify_hot_ns"]["median"]), hot),
                cell(f(&c["ingress_classify_hot_ns"]["median"]), hot),
            );
        }
        if let Some(c) = t["cases"].as_array().and_then(|c| c.last()) {
            let p = &c["programs"];
            let _ = writeln!(
                s,
                "\nProgram size: skb_egress {} BPF instructions ({} bytes JITed), skb_ingress {} ({} bytes).",
                p["skb_egress"]["xlated_insns"],
                p["skb_egress"]["jited_bytes"],
                p["skb_ingress"]["xlated_insns"],
                p["skb_ingress"]["jited_bytes"]
            );
        }
        if let Some(p) = t["cases"]
            .as_array()
            .and_then(|c| c.iter().find_map(|c| c.get("profile")))
        {
            match p.as_object() {
                Some(modes) => {
                    s.push_str("\nProfile of `skb_egress` at the largest policy (`perf record -e cpu-clock` of a worker looping BPF_PROG_TEST_RUN; `bpf:` = JITed BPF code, the rest kernel functions; % of the worker's samples):\n\n| path | top symbols |\n|---|---|\n");
                    for (mode, rows) in modes {
                        let _ = writeln!(s, "| {mode} | {} |", profile_list(rows));
                    }
                }
                None => {
                    let _ = writeln!(s, "\nProfile: {}", p.as_str().unwrap_or("?"));
                }
            }
        }
        let bad: u64 = t["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                c["not_passed"]
                    .as_object()
                    .map_or(0, |o| o.values().filter_map(Value::as_u64).sum::<u64>())
            })
            .sum();
        let lo: Vec<String> = t["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["egress_loopback_shortcut_ns"].as_u64())
            .map(|n| n.to_string())
            .collect();
        let _ = writeln!(
            s,
            "\nEvery test packet is of an allowed flow; runs that did not pass: {bad}. The same steady-state packet with ifindex 1 (loopback: the program parses the headers, then passes it without any map lookup) costs {} ns: the context's ifindex takes effect, and header parsing alone is most of the steady-state cost.\n",
            lo.join(" / ")
        );
    } else {
        s.push_str(&error_line(r, "test_run").unwrap_or_default());
    }

    let _ = writeln!(
        s,
        "### 1b. Kernel cost per run under real traffic: bpf_stats (ns)\n"
    );
    if let Some(b) = section(r, "bpf_stats") {
        let tr = &b["traffic"];
        let _ = writeln!(
            s,
            "{} s of traffic from env `dev` through the veth ({} TCP/IPv4 and {} TCP/IPv6 connections with an explicit bind, {} UDP/IPv4 and {} UDP/IPv6 datagrams), policy of {} CIDRs. The run time includes the accounting itself; the empty programs, attached to the client's cgroup, show that floor. `kernel.bpf_stats_enabled`: {} before, {} during, {} after.\n",
            b["seconds"],
            tr["tcp4_connections"],
            tr["tcp6_connections"],
            tr["udp4_datagrams"],
            tr["udp6_datagrams"],
            b["policy"]["cidrs"],
            b["bpf_stats_enabled"]["before"],
            b["bpf_stats_enabled"]["during"],
            b["bpf_stats_enabled"]["after"],
        );
        s.push_str("| program | runs | ns per run |\n|---|--:|--:|\n");
        for p in b["programs"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                p["program"].as_str().unwrap_or("?"),
                p["runs"],
                ns(f(&p["ns_per_run"]))
            );
        }
        s.push('\n');
        if let Some(sizes) = b["program_sizes"].as_array().filter(|a| !a.is_empty()) {
            s.push_str("Every program the agent loads (from its pinned links): instructions as loaded (after the verifier's rewrites), JITed bytes, and instructions the verifier processed to accept it (`verified_insns`; global functions are verified once, on their own).\n\n| program | BPF instructions | JITed bytes | verifier-processed instructions |\n|---|--:|--:|--:|\n");
            for p in sizes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    p["program"].as_str().unwrap_or("?"),
                    p["xlated_insns"],
                    p["jited_bytes"],
                    p["verified_insns"]
                );
            }
            s.push('\n');
        }
        let est = &b["established"];
        if est["programs"].is_array() {
            let ops: Vec<String> = est["traffic"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["ops"].to_string())
                .collect();
            let _ = writeln!(
                s,
                "Established flows, bpf_stats still on: one TCP connection per family (IPv4, then IPv6) doing request/response, {} round trips: every packet after the handshake finds its decision on its socket.\n",
                ops.join(" + ")
            );
            s.push_str("| program | runs | ns per run |\n|---|--:|--:|\n");
            for p in est["programs"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    p["program"].as_str().unwrap_or("?"),
                    p["runs"],
                    ns(f(&p["ns_per_run"]))
                );
            }
            s.push('\n');
        }
    } else {
        s.push_str(&error_line(r, "bpf_stats").unwrap_or_default());
    }

    let _ = writeln!(
        s,
        "### 2. End to end (noisy on this VM: lean on section 1)\n"
    );
    if let Some(e) = section(r, "e2e") {
        let _ = writeln!(
            s,
            "{} rounds of A–E interleaved, first dropped ({} kept); ratio = this arm / `none` in the same round, median [min–max]; CPU = all CPUs' busy time (/proc/stat) per operation; CPU time stolen by the hypervisor during the runs: median {:.1} %, max {:.1} %. A connection dev → prod (not allowed) per arm: {}.\n",
            e["rounds"],
            e["rounds_kept"],
            f(&e["cpu_steal_frac_median"]).unwrap_or(f64::NAN) * 100.0,
            f(&e["cpu_steal_frac_max"]).unwrap_or(f64::NAN) * 100.0,
            ARMS.iter()
                .map(|a| format!(
                    "{a} `{}`",
                    e["disallowed_connect_per_arm"][a].as_str().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let loads: Vec<f64> = e["load1_per_round"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        if !loads.is_empty() {
            let _ = writeln!(
                s,
                "1-minute load average at the start of each round: {} (the benchmark's own client and server account for about 2).\n",
                loads
                    .iter()
                    .map(|l| format!("{l:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // Kernel time in envguard's programs per operation, net of the
        // accounting (the empty program's cost under bpf_stats, section 1b).
        let floor = section(r, "bpf_stats").and_then(|b| {
            b["programs"]
                .as_array()?
                .iter()
                .filter(|p| {
                    p["program"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("empty"))
                })
                .filter_map(|p| f(&p["ns_per_run"]))
                .reduce(f64::min)
        });
        for w in ["connections", "request-response"] {
            let b = &e["enforce_bpf_time_per_op"][w];
            let (Some(t), Some(n)) = (f(&b["ns_per_op"]), f(&b["runs_per_op"])) else {
                continue;
            };
            let net = floor.map(|fl| t - n * fl);
            let cpu = f(&e["workloads"][w]["none"]["cpu_s_per_op_median"]).map(|c| c * 1e9);
            let _ = writeln!(
                s,
                "Noise-free view of **{w}**, enforce arm, bpf_stats on for one extra run: {n:.1} program runs and {:.0} ns in envguard's programs per operation{}{}.\n",
                t,
                net.map_or(String::new(), |x| format!(
                    " ({x:.0} ns without the accounting's own cost)"
                )),
                match (net, cpu) {
                    (Some(x), Some(c)) if c > 0.0 => format!(
                        "; against {:.1} µs of CPU per operation with no program, that predicts a rate of {:.3} × no program",
                        c / 1e3,
                        c / (c + x)
                    ),
                    _ => String::new(),
                }
            );
            if let Some(progs) = b["programs"].as_object() {
                let mut rows: Vec<(&String, f64, f64)> = progs
                    .iter()
                    .filter_map(|(name, v)| {
                        Some((name, f(&v["ns_per_op"])?, f(&v["runs_per_op"])?))
                    })
                    .collect();
                rows.sort_by(|a, b| b.1.total_cmp(&a.1));
                let list: Vec<String> = rows
                    .iter()
                    .map(|(name, ns, runs)| format!("{name} {ns:.0} ns in {runs:.1} runs"))
                    .collect();
                let _ = writeln!(
                    s,
                    "Per program and operation (accounting included): {}.\n",
                    list.join(", ")
                );
            }
        }
        for (key, prog, workload) in [
            ("connect4_profile", "connect4", "the connection workload"),
            (
                "skb_egress_rr_profile",
                "skb_egress",
                "the request/response workload (an established flow)",
            ),
        ] {
            if let Some(text) = callee_profile_text(&e[key], prog, workload) {
                let _ = writeln!(s, "{text}\n");
            }
        }
        for w in WORKLOADS {
            let unit = e["units"][w].as_str().unwrap_or("");
            let (cpu_unit, scale) = if w == "throughput" {
                ("CPU ms per GB", 1e12)
            } else {
                ("CPU µs per op", 1e6)
            };
            let _ = writeln!(
                s,
                "**{w}** ({unit})\n\n| arm | median | ratio to none | {cpu_unit} |\n|---|--:|--:|--:|"
            );
            for arm in ARMS {
                let a = &e["workloads"][w][arm];
                let _ = writeln!(
                    s,
                    "| {arm} | {} | {:.3} [{:.2}–{:.2}] | {:.1} |",
                    si(f(&a["rate_median"]).unwrap_or(f64::NAN)),
                    f(&a["ratio_median"]).unwrap_or(f64::NAN),
                    f(&a["ratio_min"]).unwrap_or(f64::NAN),
                    f(&a["ratio_max"]).unwrap_or(f64::NAN),
                    f(&a["cpu_s_per_op_median"]).unwrap_or(f64::NAN) * scale,
                );
            }
            s.push('\n');
        }
    } else {
        s.push_str(&error_line(r, "e2e").unwrap_or_default());
    }

    let _ = writeln!(s, "### 3. Policy load\n");
    if let Some(p) = section(r, "policy") {
        s.push_str("| policy | `envguard check` | `envguard run` → `policy_loaded` | agent RSS after load |\n|---|--:|--:|--:|\n");
        for x in p["policies"].as_array().into_iter().flatten() {
            let rss = x["rss_after_load"][0]["vm_rss_kib"]
                .as_f64()
                .unwrap_or(f64::NAN)
                / 1024.0;
            let _ = writeln!(
                s,
                "| {} ({} kB TOML) | {:.0} ms | {:.0} ms | {rss:.1} MiB |",
                case_label(x),
                x["policy_bytes"].as_u64().unwrap_or(0) / 1000,
                f(&x["check_ms_median"]).unwrap_or(f64::NAN),
                f(&x["start_to_policy_loaded_ms_median"]).unwrap_or(f64::NAN),
            );
        }
        for x in p["policies"].as_array().into_iter().flatten() {
            if x["check_profile"].is_array() {
                let _ = writeln!(
                    s,
                    "\nProfile of `envguard check` on the {} policy (`perf record -e cpu-clock`, % of samples): {}.",
                    case_label(x),
                    profile_list(&x["check_profile"])
                );
            }
        }
        let l = &p["lpm_fill"];
        let _ = writeln!(
            s,
            "\nKernel share of filling the maps: {} IPv4 entries into a bare LPM trie (the agent's key/value sizes), one BPF_MAP_UPDATE_ELEM each: {:.0} ms; with BPF_MAP_UPDATE_BATCH (10 000 per call): {}.\n\nPolicy reload: {}. Mode toggle: {}.\n",
            l["entries"],
            f(&l["single_updates_ms_median"]).unwrap_or(f64::NAN),
            match f(&l["batch_updates_ms_median"]) {
                Some(ms) => format!("{ms:.0} ms"),
                None => l["batch_update_on_lpm_trie"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
            },
            match f(&p["reload"]["reload_ms_median"]) {
                Some(ms) => format!(
                    "`envguard reload` to another {}-CIDR policy (every CIDR different) returns after {ms:.0} ms (median of {})",
                    thousands(&p["reload"]["cidrs"]),
                    p["reload"]["reload_ms"].as_array().map_or(0, Vec::len)
                ),
                None => p["reload"].as_str().unwrap_or("?").to_owned(),
            },
            match f(&p["mode_toggle"]["to_kernel_ms_median"]) {
                Some(ms) => format!(
                    "in force in the kernel {ms:.1} ms after `envguard mode` starts (median of {}, worst {:.1} ms; the command itself returns after {:.1} ms)",
                    p["mode_toggle"]["toggles"],
                    f(&p["mode_toggle"]["to_kernel_ms_max"]).unwrap_or(f64::NAN),
                    f(&p["mode_toggle"]["command_ms_median"]).unwrap_or(f64::NAN)
                ),
                None => p["mode_toggle"].as_str().unwrap_or("?").to_owned(),
            },
        );
    } else {
        s.push_str(&error_line(r, "policy").unwrap_or_default());
    }

    let _ = writeln!(s, "### 4. Events\n");
    if let Some(ev) = section(r, "events") {
        s.push_str("| offered (connect() calls/s) | records written/s | lost | agent CPU per 1 000 records | bytes per record | agent RSS idle | agent RSS after |\n|--:|--:|--:|--:|--:|--:|--:|\n");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} ms | {:.0} | {:.1} MiB | {:.1} MiB |\n",
            si(f(&ev["offered_per_s"]).unwrap_or(f64::NAN)),
            si(f(&ev["written_per_s"]).unwrap_or(f64::NAN)),
            ev["lost"],
            f(&ev["agent_cpu_ms_per_1000"]).unwrap_or(f64::NAN),
            f(&ev["bytes_per_record"]).unwrap_or(f64::NAN),
            ev["rss_idle_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            ev["rss_after_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        );
        let _ = writeln!(
            s,
            "Sink: a file on {} (the benchmark's temp directory). Agent CPU over the window: {:.0} % of one core (the sender needs the other vCPU). Agent options: `{}`.\n",
            ev["sink_filesystem"].as_str().unwrap_or("?"),
            f(&ev["agent_cpu_utilisation"]).unwrap_or(f64::NAN) * 100.0,
            ev["agent_args"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
        if ev["agent_profile"].is_array() {
            let _ = writeln!(
                s,
                "Profile of the agent under the same flood (`perf record -e cpu-clock -p`, % of its samples): {}.\n",
                profile_list(&ev["agent_profile"])
            );
        }
    } else {
        s.push_str(&error_line(r, "events").unwrap_or_default());
    }

    s.push_str(&crate::tc::table(r));
    let prev = &r["previous"];
    if prev.is_object() {
        let _ = writeln!(
            s,
            "### Targets\n\n| target | measured | | previous run ({}) |\n|---|---|---|---|",
            prev["commit"].as_str().unwrap_or("unknown commit")
        );
    } else {
        let _ = writeln!(s, "### Targets\n\n| target | measured | |\n|---|---|---|");
    }
    for t in r["targets"].as_array().into_iter().flatten() {
        let name = t["target"].as_str().unwrap_or("");
        let _ = write!(
            s,
            "| {name} | {} | **{}** |",
            t["measured"].as_str().unwrap_or(""),
            t["status"].as_str().unwrap_or("")
        );
        if prev.is_object() {
            let old = previous_target(prev, name).map_or_else(
                || "not measured then".to_owned(),
                |o| {
                    format!(
                        "{} **{}**",
                        o["measured"].as_str().unwrap_or(""),
                        o["status"].as_str().unwrap_or("")
                    )
                },
            );
            let _ = write!(s, " {old} |");
        }
        s.push('\n');
    }
    s
}

/// The previous run's row for a target, also under the name it had before
/// it was reworded.
fn previous_target<'a>(prev: &'a Value, name: &str) -> Option<&'a Value> {
    let former = match name {
        n if n.starts_with("Steady-state path of a cached flow") => {
            "Steady-state path ≤ empty program + 30 ns"
        }
        EVENTS_TARGET => "≥ 200 000 violation records/s to a file on one core",
        n => n,
    };
    prev["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == name || t["target"] == former)
}

/// RSS after loading the biggest policy of section 3: (CIDRs, MiB).
fn big_rss(r: &Value) -> Option<(f64, f64)> {
    let p = section(r, "policy")?;
    let big = p["policies"].as_array()?.last()?;
    Some((
        f(&big["cidrs"])?,
        f(&big["rss_after_load"][0]["vm_rss_kib"])? / 1024.0,
    ))
}

/// Sum of the profile's percentages over the symbols `pred` accepts.
fn prof_pct(rows: &Value, pred: impl Fn(&str) -> bool) -> f64 {
    rows.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["symbol"].as_str().is_some_and(&pred))
        .filter_map(|r| f(&r["pct"]))
        .sum::<f64>()
        // An empty sum is -0.0, which would print as "-0".
        + 0.0
}

fn status_of(r: &Value, prefix: &str) -> Option<String> {
    r["targets"]
        .as_array()?
        .iter()
        .find(|t| t["target"].as_str().is_some_and(|s| s.starts_with(prefix)))
        .and_then(|t| t["status"].as_str().map(str::to_owned))
}

/// What the figures say about each missed target: where the time goes and
/// what would change it (agent side). Built from this run's figures; a
/// note appears only for a target this run missed.
pub fn notes(r: &Value) -> String {
    let mut s = String::new();
    let missed = |prefix: &str| status_of(r, prefix).as_deref() == Some("MISSED");
    let cases = section(r, "test_run")
        .and_then(|t| t["cases"].as_array().cloned())
        .unwrap_or_default();

    if missed("Steady-state") && !cases.is_empty() {
        let big = cases.last().expect("non-empty");
        let floor = f(&big["empty_steady_ns"]["median"]).unwrap_or(f64::NAN);
        let steady = f(&big["egress_steady_ns"]["median"]).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "**Steady state without a decision on the socket.** This row is the path of a packet whose socket keeps no decision: UDP datagrams, and every packet of a test run (which has no socket). An established TCP flow finds its decision on its socket and costs +{:.0}/+{:.0} ns under real traffic (the row above it). On this path a cached packet costs `skb_egress` {:.0} ns over the empty program: three header reads (`bpf_skb_load_bytes`), a 32-byte verdict-cache key built from zeroed byte arrays, and its hash lookup.",
            established_over_floor(r).map_or(f64::NAN, |e| e.0),
            established_over_floor(r).map_or(f64::NAN, |e| e.1),
            steady - floor,
        );
        let p = &big["profile"]["steady"];
        if p.is_array() {
            let _ = writeln!(
                s,
                "The profile of that path: the program's own JITed code {:.0} %, `bpf_skb_load_bytes` and the copy it does {:.0} %, a `memset` BPF subprogram the compiler emitted {:.0} %, the hash lookup of the 32-byte cache key {:.0} %, the test-run loop {:.0} %.",
                prof_pct(p, |x| x == "bpf:skb_egress"),
                prof_pct(p, |x| x == "bpf_skb_load_bytes" || x.contains("memcpy")),
                prof_pct(p, |x| x == "bpf:memset"),
                prof_pct(p, |x| x.starts_with("htab_")
                    || x.starts_with("lookup_nulls")
                    || x == "memcmp"),
                prof_pct(p, |x| x.starts_with("bpf_test")),
            );
        }
        let mut fixes = Vec::new();
        if prof_pct(p, |x| x == "bpf_skb_load_bytes") >= 5.0 {
            fixes.push("read the headers by direct packet access (cgroup_skb programs may read `data`..`data_end`) instead of copying them out");
        }
        if prof_pct(p, |x| x == "bpf:memset") >= 3.0 {
            fixes.push("build the packet and key structures from 4- and 8-byte words rather than zeroed `[u8; 16]` arrays (zeroing them is the `memset` subprogram)");
        }
        fixes.push("keep a connected UDP socket's decision on the socket as a TCP socket's is kept (one storage lookup, no header read); an unconnected UDP socket talks to many peers, so its datagrams keep needing the per-peer key");
        let _ = writeln!(
            s,
            "What would change it, in the kernel programs: {}.\n",
            fixes.join("; ")
        );
    }

    if missed("Classification") {
        let find = |n: u64| {
            cases.iter().find(|c| {
                c["rules"].as_u64() == Some(1_000)
                    && c["cidrs"]
                        .as_u64()
                        .is_some_and(|x| x.abs_diff(n) <= n / 100 + 6)
            })
        };
        let over = |c: &Value, k: &str, fl: &str| {
            f(&c[k]["median"]).unwrap_or(f64::NAN) - f(&c[fl]["median"]).unwrap_or(f64::NAN)
        };
        if let (Some(a), Some(b)) = (find(1_000), find(100_000)) {
            let cold = over(b, "egress_classify_ns", "empty_once_ns")
                / over(a, "egress_classify_ns", "empty_once_ns");
            let hot = over(b, "egress_classify_hot_ns", "empty_once_hot_ns")
                / over(a, "egress_classify_hot_ns", "empty_once_hot_ns");
            let trie = prof_pct(&b["profile"]["classify"], |x| x.starts_with("trie_"));
            let _ = writeln!(
                s,
                "**Classification.** With the same remote address every run, classifying at 100 000 CIDRs costs {hot:.2}× what it costs at 1 000: the bigger policy costs nothing while the trie path is in the CPU caches. With a new random remote every run it costs {cold:.2}×: the kernel's LPM trie is a binary trie walked one dependent pointer load per level (about 17 levels for 100 000 /32s), and each level is a cache miss once the trie (several MB here) no longer fits; `trie_lookup_elem` is {trie:.0} % of the cold profile. What would change it: look host prefixes (/32, /128; all of the 100 000 here) up in a hash map first (one bucket, one or two cache lines) and keep only shorter prefixes in the trie, or one hash map per prefix length the policy uses. Whether the target should count a cold trie is open: connections to a few popular destinations find their path cached (the hot figures).\n"
            );
        }
    }

    if missed("Connection rate")
        && let Some(e) = section(r, "e2e")
    {
        let b = &e["enforce_bpf_time_per_op"]["connections"];
        let cpu = f(&e["workloads"]["connections"]["none"]["cpu_s_per_op_median"])
            .map(|c| c * 1e9)
            .unwrap_or(f64::NAN);
        let ns = f(&b["ns_per_op"]).unwrap_or(f64::NAN);
        let runs = f(&b["runs_per_op"]).unwrap_or(f64::NAN);
        let per_prog = section(r, "bpf_stats")
            .and_then(|b| b["programs"].as_array().cloned())
            .unwrap_or_default();
        let prog_ns = |name: &str| {
            per_prog
                .iter()
                .find(|p| p["program"] == name)
                .and_then(|p| f(&p["ns_per_run"]))
                .unwrap_or(f64::NAN)
        };
        let net = ns - runs * prog_ns("empty (egress)");
        let measured = f(&e["workloads"]["connections"]["envguard-enforce"]["ratio_median"])
            .unwrap_or(f64::NAN);
        let predicted = cpu / (cpu + net);
        let verdict = if predicted >= 0.97 {
            format!(
                "that predicts {predicted:.3}×, inside the 3 % budget; the measured median is {measured:.3}× with rounds from {:.2} to {:.2}: on this shared VM the end-to-end rate is noise-bound, not program-bound",
                f(&e["workloads"]["connections"]["envguard-enforce"]["ratio_min"])
                    .unwrap_or(f64::NAN),
                f(&e["workloads"]["connections"]["envguard-enforce"]["ratio_max"])
                    .unwrap_or(f64::NAN),
            )
        } else {
            format!(
                "that alone predicts {predicted:.3}× (measured: {measured:.3}×), so the 3 % budget is spent before any noise"
            )
        };
        let _ = writeln!(
            s,
            "**Connection rate.** The enforce arm runs {runs:.0} envguard programs per connection, {net:.0} ns in all once the accounting's own cost is taken off (bpf_stats), against {:.1} µs of CPU per connection with no program: {verdict}. Per run under traffic (1b, accounting included): connect4 {:.0} ns, post_bind4 {:.0} ns, skb_egress {:.0} ns, skb_ingress {:.0} ns, against {:.0} ns for an empty program.\n",
            cpu / 1e3,
            prog_ns("connect4"),
            prog_ns("post_bind4"),
            prog_ns("skb_egress"),
            prog_ns("skb_ingress"),
            prog_ns("empty (egress)"),
        );
    }

    if missed(ESTABLISHED_TARGET)
        && let Some((egress, ingress)) = established_over_floor(r)
    {
        let prof = section(r, "e2e").map(|e| e["skb_egress_rr_profile"].clone());
        let shares = match prof.as_ref() {
            Some(p) if p.is_object() => format!(
                " By the profile of section 2 ({:.0} samples in `skb_egress`: a rough split), the socket's storage read (`bpf_sk_storage_get`) is {:.0} % of `skb_egress` on that path and the program's own code {:.0} %.",
                f(&p["samples"]).unwrap_or(0.0) * f(&p["program_pct"]).unwrap_or(0.0) / 100.0,
                callee_pct(p, "bpf_sk_storage_get").unwrap_or(0.0),
                callee_pct(p, "(its own code)").unwrap_or(0.0),
            ),
            _ => String::new(),
        };
        let mitigations = match r["machine"]["mitigations"]["spec_rstack_overflow"].as_str() {
            Some(m) if m != "unknown" && m != "Not affected" => format!(
                " On this machine every return from a function pays the speculative-return mitigation (`{m}`; see Machine), so a helper call costs tens of nanoseconds whatever it does."
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "**Established flow.** A packet of an established TCP flow costs `skb_egress` +{egress:.0} ns and `skb_ingress` +{ingress:.0} ns over the empty program on the same packets (bpf_stats). That path is one helper call and about 30 BPF instructions: the socket's storage (`bpf_sk_storage_get`, no allocation), the configuration (an array lookup the verifier inlines), the decision's generation, and for a violation its pair's mode.{shares} Nothing but the storage read is left to take out of it, and it is the only way these programs reach a socket's storage.{mitigations} The same path measured +19/+16 ns in the full run at bench commit 1a22161 on this VM.\n"
        );
    }

    if missed("Request/response")
        && let Some(e) = section(r, "e2e")
    {
        let b = &e["enforce_bpf_time_per_op"]["request-response"];
        let floor = empty_egress_ns(r);
        let net = f(&b["ns_per_op"]).unwrap_or(f64::NAN)
            - f(&b["runs_per_op"]).unwrap_or(f64::NAN) * floor;
        let cpu = f(&e["workloads"]["request-response"]["none"]["cpu_s_per_op_median"])
            .map_or(f64::NAN, |c| c * 1e9);
        let w = |name: &str, k: &str| {
            f(&e["workloads"][name]["envguard-enforce"][k]).unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            s,
            "**Request/response and throughput.** A round trip runs envguard's programs for {net:.0} ns (bpf_stats, the accounting's own cost taken off) against {:.1} µs of CPU per round trip with no program: that predicts {:.3}× no program. Measured: request/response {:.3}× (rounds {:.2}–{:.2}), throughput {:.3}× (rounds {:.2}–{:.2}): the rounds spread far wider than the programs' share, so on this shared VM these ratios are noise-bound.\n",
            cpu / 1e3,
            cpu / (cpu + net),
            w("request-response", "ratio_median"),
            w("request-response", "ratio_min"),
            w("request-response", "ratio_max"),
            w("throughput", "ratio_median"),
            w("throughput", "ratio_min"),
            w("throughput", "ratio_max"),
        );
    }

    if missed(PER_CONNECTION_TARGET)
        && let Some((net, _)) = connection_program_ns(r)
        && let Some(e) = section(r, "e2e")
    {
        let progs = &e["enforce_bpf_time_per_op"]["connections"]["programs"];
        let empty = empty_egress_ns(r);
        let connect = f(&progs["connect4"]["ns_per_op"]).unwrap_or(f64::NAN) - empty;
        let prof = &e["connect4_profile"];
        let storage = callee_pct(prof, "bpf_sk_storage_get");
        let freeing = share_pct(&prof["extra_pct"], "bpf_sk_storage_free");
        let storage_text = match storage {
            Some(pct) => format!(
                "By the profile above, {pct:.0} % of `connect4` is creating that storage (`bpf_sk_storage_get` with `F_CREATE`: two kernel allocations, charged to the map's memory cgroup, under two locks), about {:.0} ns; without it the connection would take about {:.0} ns of program time.{}",
                connect * pct / 100.0,
                net - connect * pct / 100.0,
                freeing.map_or(String::new(), |fr| format!(
                    " Freeing it when the socket goes (`bpf_sk_storage_free`, outside program time) takes another {fr:.1} % of the client's CPU."
                )),
            ),
            None => "No profile of `connect4` was taken in this run.".to_owned(),
        };
        let per_packet = |name: &str| {
            f(&progs[name]["ns_per_op"]).unwrap_or(f64::NAN)
                / f(&progs[name]["runs_per_op"]).unwrap_or(f64::NAN)
                - empty
        };
        let _ = writeln!(
            s,
            "**Program time per connection.** {net:.0} ns against 1 500, and `connect4` is {connect:.0} ns of it (accounting taken off); each of the connection's packets costs {:.0} ns (egress) and {:.0} ns (ingress) and finds the decision on the socket. `connect4` judges the destination (cgroup walk, same-host socket lookup, then one `DECIDE_CACHE` lookup for a destination judged before, else the endpoint, host and CIDR maps and the rule tries), counts the decision and, for a client that did not bind() first, creates the socket's storage to keep the decision where its packets find it. {storage_text} Keeping the decision off the socket was built and measured (commit 6b415cf, reverted): an LRU keyed by the socket's cookie cost more, 3050 ns per connection against 2363 in the run before it, because an insert into a full LRU evicts (44 % of `connect4`) and every packet of a client without storage pays a cookie lookup; and it is safe against a workload that flushes the LRU only with a stricter rule for unlabelled sockets. What would close the rest: a per-socket slot that needs no allocation, which these program types do not have (socket storage is the only per-socket map), or fewer program runs per connection.\n",
            per_packet("skb_egress"),
            per_packet("skb_ingress"),
        );
    }

    if missed("100 000-CIDR policy loaded")
        && let Some(p) = section(r, "policy")
        && let Some(big) = p["policies"].as_array().and_then(|v| v.last())
    {
        let ready: Vec<String> = cases
            .iter()
            .filter(|c| c["rules"].as_u64() == Some(1_000))
            .filter_map(|c| {
                Some(format!(
                    "{} CIDRs {:.2} s",
                    thousands(&c["cidrs"]),
                    f(&c["agent_ready_ms"])? / 1e3
                ))
            })
            .collect();
        let prof = &big["check_profile"];
        let _ = writeln!(
            s,
            "**Policy load.** `envguard check` alone (parse and validate, nothing loaded) takes {:.1} s of the {:.1} s; the kernel's share of filling the maps is {:.0} ms ({:.0} ms with batched updates).{}{}{}\n",
            f(&big["check_ms_median"]).unwrap_or(f64::NAN) / 1e3,
            f(&big["start_to_policy_loaded_ms_median"]).unwrap_or(f64::NAN) / 1e3,
            f(&p["lpm_fill"]["single_updates_ms_median"]).unwrap_or(f64::NAN),
            f(&p["lpm_fill"]["batch_updates_ms_median"]).unwrap_or(f64::NAN),
            if ready.is_empty() {
                String::new()
            } else {
                format!(
                    " The agent's start time grows faster than linearly with the CIDR count (section 1a: {}).",
                    ready.join(", ")
                )
            },
            if prof.is_array() {
                format!(
                    " Its profile: `Policy::parse` {:.0} %, `lint` {:.0} %.",
                    prof_pct(prof, |x| x.contains("parse")),
                    prof_pct(prof, |x| x.contains("lint"))
                )
            } else {
                String::new()
            },
            if prof_pct(prof, |x| x.contains("parse") || x.contains("lint")) >= 50.0 {
                " What would change it, in the agent's policy code (both parts grow with the square of the CIDR count): line numbers from a newline index built once (a binary search per item) instead of counting newlines from the start of the file for every CIDR (`line_of`, the hot loop of `parse`), and the CIDR containment lint as one sorted sweep instead of comparing every CIDR with every other. Batched map updates (BPF_MAP_UPDATE_BATCH works on this kernel's LPM tries) would then shave the kernel's share."
            } else {
                " Batched map updates (BPF_MAP_UPDATE_BATCH works on this kernel's LPM tries) would shave the kernel's share."
            }
        );
    }

    if missed(EVENTS_TARGET)
        && let Some(ev) = section(r, "events")
    {
        let p = &ev["agent_profile"];
        let handoff = prof_pct(p, |x| {
            x.contains("finish_task_switch")
                || x.contains("spin_unlock")
                || x.contains("lock_contended")
                || x.contains("futex")
        });
        let alloc = prof_pct(p, |x| {
            x.contains("malloc") || x.contains("_int_free") || x.contains("cfree") || x == "realloc"
        });
        let json_maps = prof_pct(p, |x| {
            x.contains("IndexMap")
                || x.contains("ser::")
                || x.contains("Serialize")
                || x.contains("hash")
                || x.contains("RawTable")
        });
        let mut fixes = Vec::new();
        if handoff >= 15.0 {
            fixes.push("hand records from the ring-buffer reader to the sinks in batches (one queue operation and wake-up per drain, not per record)");
        }
        if alloc + json_maps >= 15.0 {
            fixes.push("serialize each record straight into the output buffer instead of building a JSON map (and its allocations) first");
        }
        let fixes = if fixes.is_empty() {
            String::new()
        } else {
            format!(" What would change it, in the agent: {}.", fixes.join("; "))
        };
        let _ = writeln!(
            s,
            "**Events.** The agent writes {} records/s with {:.0} % of a core ({}{:.2} ms of CPU per 1 000 records) while the sender holds the other vCPU, and loses the rest when the ring buffer fills.{}{}\n",
            si(f(&ev["written_per_s"]).unwrap_or(f64::NAN)),
            f(&ev["agent_cpu_utilisation"]).unwrap_or(f64::NAN) * 100.0,
            ev["agent_threads"]
                .as_u64()
                .map_or(String::new(), |n| format!("{n} threads; ")),
            f(&ev["agent_cpu_ms_per_1000"]).unwrap_or(f64::NAN),
            if p.is_array() {
                format!(
                    " Its profile: context switches and lock hand-offs (`finish_task_switch`, spin unlocks, contended mutexes) {:.0} %, allocation (malloc/free) {:.0} %, building and serializing JSON maps {:.0} %.",
                    handoff, alloc, json_maps,
                )
            } else {
                String::new()
            },
            fixes
        );
    }
    s
}

/// A program's call-graph profile (`profile::callees`) as a sentence.
fn callee_profile_text(p: &Value, prog: &str, workload: &str) -> Option<String> {
    if let Some(why) = p.as_str() {
        return Some(format!("Profile of `{prog}` in {workload}: {why}."));
    }
    let callees: Vec<String> = p["callees"]
        .as_array()?
        .iter()
        .filter_map(|c| Some(format!("{} {:.1} %", c["symbol"].as_str()?, f(&c["pct"])?)))
        .collect();
    let extra: Vec<String> = p["extra_pct"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some(format!(
                "`{}` {:.1} %",
                c["symbol"].as_str()?,
                f(&c["pct"])?
            ))
        })
        .collect();
    Some(format!(
        "Profile of `{prog}` in {workload} (enforce arm, `perf record -g -e cpu-clock` of the client for 2 s, {} samples): `{prog}` is {:.1} % of the client's samples ({:.0} samples); each of its samples goes to the function it called, or to its own code: {}.{}",
        p["samples"],
        f(&p["program_pct"])?,
        f(&p["samples"])? * f(&p["program_pct"])? / 100.0,
        callees.join(", "),
        if extra.is_empty() {
            String::new()
        } else {
            format!(" Share of the client's samples under {}.", extra.join(", "))
        },
    ))
}

/// The share `profile::callees` gave one callee of a program, if it has one.
fn callee_pct(p: &Value, symbol: &str) -> Option<f64> {
    share_pct(&p["callees"], symbol)
}

/// The `pct` of `symbol` in a list of `{"symbol", "pct"}`.
fn share_pct(list: &Value, symbol: &str) -> Option<f64> {
    list.as_array()?
        .iter()
        .find(|c| c["symbol"] == symbol)
        .and_then(|c| f(&c["pct"]))
}

/// The empty egress program's cost per run under bpf_stats (the accounting's
/// own cost), or NaN.
fn empty_egress_ns(r: &Value) -> f64 {
    section(r, "bpf_stats")
        .and_then(|b| b["programs"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .find(|p| p["program"] == "empty (egress)")
        .and_then(|p| f(&p["ns_per_run"]))
        .unwrap_or(f64::NAN)
}
