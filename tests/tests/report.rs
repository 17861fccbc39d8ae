//! `envguard report` over the history a real agent keeps (`--state-dir`,
//! `--history-interval 1s`):
//!
//! - known traffic (allowed prod→prod, dev→prod refused in enforce,
//!   dev→staging audited by a `[[pair_mode]]`) before the agent is
//!   SIGKILLed (and a torn temp file is left next to the history),
//!   while no agent runs (the pinned programs still refuse and count), after
//!   a restart that adopts the pinned maps, and after a detach that replaces
//!   the maps (counters from 0): the report over a window spanning all of it
//!   has exactly the counters the kernel counted (scraped from
//!   `envguard_decisions_total` before each stop) and the traffic the test
//!   made; its matrix, "what enforce would have refused", silent pairs, text,
//!   CSV and Graphviz (`dot -Tsvg` renders it) say the same;
//! - a state directory someone else could write or redirect (world-writable,
//!   a symbolic link, another user's directory or a directory above it,
//!   another user's file inside) is refused by `envguard run` before
//!   anything is loaded, and by `envguard report`, naming the problem.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envguard_tests::sinks::{TempDir, http_get, parse_metrics, samples};
use envguard_tests::{AgentOptions, Client, Family, Lab, Mode, PolicyExtras, Proto, Site, sys};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const WAIT: Duration = Duration::from_secs(10);

fn at(site: Site, port: u16) -> SocketAddr {
    SocketAddr::new(site.addr(Family::V4), port)
}

/// A decision counter's labels: src, dst, verdict, mode, direction, proto.
type Labels = [String; 6];

/// `envguard_decisions_total`, every series, as the agent serves it now.
fn kernel_decisions(addr: SocketAddr) -> BTreeMap<Labels, u64> {
    let r = http_get(addr, "/metrics");
    assert!(
        r.status_line.starts_with("HTTP/1.1 200"),
        "GET /metrics: {}",
        r.status_line
    );
    let all = parse_metrics(&r.body);
    samples(&all, "envguard_decisions_total", &[])
        .into_iter()
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (
                [
                    l("src_env"),
                    l("dst_env"),
                    l("verdict"),
                    l("mode"),
                    l("direction"),
                    l("proto"),
                ],
                s.value as u64,
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Sums per (src, dst, verdict).
fn by_pair(m: &BTreeMap<Labels, u64>) -> BTreeMap<(String, String, String), u64> {
    let mut out = BTreeMap::new();
    for (l, n) in m {
        *out.entry((l[0].clone(), l[1].clone(), l[2].clone()))
            .or_default() += n;
    }
    out
}

fn pair(s: &str, d: &str, v: &str) -> (String, String, String) {
    (s.into(), d.into(), v.into())
}

/// Scrapes until the kernel's counters per pair are `want` (the agent
/// refreshes them every second); returns every series.
fn kernel_until(
    addr: SocketAddr,
    want: &BTreeMap<(String, String, String), u64>,
) -> BTreeMap<Labels, u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let k = kernel_decisions(addr);
        if &by_pair(&k) == want {
            return k;
        }
        assert!(
            Instant::now() < deadline,
            "after {WAIT:?} the kernel's counters are {:?}, expected {want:?}",
            by_pair(&k)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test's traffic, one kind of each.
#[derive(Clone, Copy)]
struct Traffic {
    allowed: usize,
    refused: usize,
    audited: usize,
}

fn make(lab: &Lab, t: Traffic, why: &str) {
    for _ in 0..t.allowed {
        let r = lab.probe(Client::Prod, Proto::Tcp, at(Site::Prod, 9000), 3000);
        assert!(r.ok, "prod -> prod must connect {why}: {}", r.raw);
    }
    for _ in 0..t.refused {
        let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Prod, 9000), 3000);
        assert!(
            r.is_refused(),
            "dev -> prod must be refused {why}: {}",
            r.raw
        );
    }
    for _ in 0..t.audited {
        let r = lab.probe(Client::Dev, Proto::Tcp, at(Site::Staging, 9000), 3000);
        assert!(
            r.ok,
            "dev -> staging is audited, so it connects {why}: {}",
            r.raw
        );
    }
}

fn expected(ts: &[Traffic]) -> BTreeMap<(String, String, String), u64> {
    let mut m = BTreeMap::new();
    let (a, r, u) = ts.iter().fold((0, 0, 0), |(a, r, u), t| {
        (a + t.allowed, r + t.refused, u + t.audited)
    });
    for (k, n) in [
        (pair("prod", "prod", "allowed"), a),
        (pair("dev", "prod", "denied"), r),
        (pair("dev", "staging", "audited"), u),
    ] {
        if n > 0 {
            m.insert(k, n as u64);
        }
    }
    m
}

fn report(args: &[&str]) -> sys::CmdOutput {
    let mut all = vec!["report"];
    all.extend_from_slice(args);
    sys::run_envguard(&sys::envguard_bin(), &all, Duration::from_secs(20))
}

fn report_ok(args: &[&str]) -> String {
    let out = report(args);
    assert!(out.success(), "envguard report {args:?} failed: {out:?}");
    out.stdout
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[test]
fn report_counts_exactly_what_the_kernel_counted_across_restarts_and_a_reset() {
    let since = now_secs() - 1;
    let extras = PolicyExtras::dev_to_staging_audited();
    let mut lab = Lab::with_policy(EGPROBE, Mode::Enforce, &extras);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    let tmp = TempDir::new();
    let state = tmp.join("state");
    // Made 0755 by root (an older install): accepted, narrowed to 0700.
    std::fs::create_dir(&state).expect("mkdir state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let opts = |o: AgentOptions| o.metrics_listen("127.0.0.1:0").history(&state, "1s");

    // 1. First agent, fresh maps.
    let t1 = Traffic {
        allowed: 3,
        refused: 4,
        audited: 2,
    };
    lab.spawn_agent(&opts(AgentOptions::pinned()));
    assert_eq!(
        std::fs::metadata(&state).expect("state dir").mode() & 0o7777,
        0o700,
        "the agent narrows its state directory to 0700"
    );
    make(&lab, t1, "(first agent)");
    let k1 = kernel_until(lab.agent().metrics_addr(), &expected(&[t1]));
    lab.agent()
        .wait_lines(WAIT, |l| {
            l.iter().filter(|e| e["kind"] == "violation").count() >= t1.refused + t1.audited
        })
        .unwrap_or_else(|l| panic!("violation records expected; got {l:?}"));
    // A crash: SIGKILL (no shutdown sample) once a periodic sample has the
    // records, then a write cut short (a torn temp file next to the history).
    let saved = wait_history(&state, |h| {
        sum_of(h, "violations") == (t1.refused + t1.audited) as u64
            && sum_of(h, "counts") == (t1.allowed + t1.refused + t1.audited) as u64
    });
    lab.kill_agent();
    std::fs::write(state.join("history.json.tmp"), &saved[..saved.len() / 2])
        .expect("write a torn temp file");

    // 2. No agent: the pinned programs still refuse, and count.
    let t2 = Traffic {
        allowed: 1,
        refused: 2,
        audited: 0,
    };
    make(&lab, t2, "(no agent running)");

    // 3. A restart that adopts the pinned maps.
    let t3 = Traffic {
        allowed: 2,
        refused: 1,
        audited: 3,
    };
    lab.spawn_agent(&opts(AgentOptions::pinned().adopting()));
    make(&lab, t3, "(adopting agent)");
    let k3 = kernel_until(lab.agent().metrics_addr(), &expected(&[t1, t2, t3]));
    for (l, n) in &k1 {
        assert!(
            k3.get(l).is_some_and(|m| m >= n),
            "the adopted counters go on from the first agent's: {l:?} {n} -> {:?}",
            k3.get(l)
        );
    }
    lab.stop_agent();

    // 4. The maps replaced (detach, then a fresh start): counters from 0.
    let detach = sys::envguard_detach(&sys::envguard_bin(), lab.pin_root().path());
    assert!(detach.success(), "envguard detach: {detach:?}");
    let t4 = Traffic {
        allowed: 1,
        refused: 2,
        audited: 1,
    };
    lab.spawn_agent(&opts(AgentOptions::pinned()));
    make(&lab, t4, "(after the maps were replaced)");
    let k4 = kernel_until(lab.agent().metrics_addr(), &expected(&[t4]));
    lab.agent()
        .wait_lines(WAIT, |l| {
            l.iter().filter(|e| e["kind"] == "violation").count() >= t4.refused + t4.audited
        })
        .unwrap_or_else(|l| panic!("violation records expected; got {l:?}"));
    lab.stop_agent();

    // What the kernel counted: the adopted map's last values plus the new map's.
    let mut kernel = k3.clone();
    for (l, n) in &k4 {
        *kernel.entry(l.clone()).or_default() += n;
    }
    let state_s = state.display().to_string();
    // From just before the first agent to now.
    let since_s = format!("{}s", now_secs() - since + 1);
    let window = ["--state-dir", &state_s, "--since", &since_s];
    let json: Value = {
        let mut a = window.to_vec();
        a.push("--json");
        serde_json::from_str(&report_ok(&a)).expect("report --json is JSON")
    };
    let reported: BTreeMap<Labels, u64> = json["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                [
                    s("src_env"),
                    s("dst_env"),
                    s("verdict"),
                    s("mode"),
                    s("direction"),
                    s("proto"),
                ],
                r["count"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(
        reported, kernel,
        "the report's counters are exactly what the kernel counted\n{json:#}"
    );
    assert_eq!(
        by_pair(&reported),
        expected(&[t1, t2, t3, t4]),
        "and exactly the traffic the test made"
    );
    println!("envguard report --json:\n{json:#}");
    check_schema(&json);
    assert_eq!(json["coverage"]["counter_resets"], 1, "one map replacement");
    assert_eq!(json["coverage"]["complete"], true);

    // The matrix: every ordered pair of the policy's envs.
    let envs = ["dev", "prod", "shared", "staging"];
    let matrix = json["matrix"].as_array().expect("matrix");
    assert_eq!(matrix.len(), envs.len() * envs.len(), "{json:#}");
    let total = expected(&[t1, t2, t3, t4]);
    for c in matrix {
        let (s, d) = (
            c["src_env"].as_str().expect("src"),
            c["dst_env"].as_str().expect("dst"),
        );
        for v in ["allowed", "denied", "audited"] {
            assert_eq!(
                c[v].as_u64(),
                Some(total.get(&pair(s, d, v)).copied().unwrap_or(0)),
                "matrix {s} -> {d} {v}"
            );
        }
    }
    let never: Vec<(String, String)> = json["never_seen"]
        .as_array()
        .expect("never_seen")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or("").into(),
                p[1].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(never.len(), 16 - 3, "{never:?}");
    assert!(!never.contains(&("dev".into(), "prod".into())));
    assert!(never.contains(&("prod".into(), "dev".into())));

    // What enforce would have refused: dev -> staging, from the records.
    let would = json["would_refuse"].as_array().expect("would_refuse");
    assert_eq!(would.len(), 1, "{json:#}");
    let w = &would[0];
    let audited = (t1.audited + t3.audited + t4.audited) as u64;
    assert_eq!(
        (&w["src_env"], &w["dst_env"], w["decisions"].as_u64()),
        (&"dev".into(), &"staging".into(), Some(audited))
    );
    assert_eq!(
        w["attempts"].as_u64(),
        Some(audited),
        "one record per attempt (no dedup)"
    );
    let top = |list: &str| -> Vec<(String, u64)> {
        w[list]["top"]
            .as_array()
            .expect("top")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or("").into(),
                    e["count"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(
        top("destinations"),
        [(format!("{}", at(Site::Staging, 9000)), audited)]
    );
    assert_eq!(top("ports"), [("9000/tcp".to_owned(), audited)]);
    assert_eq!(top("processes"), [("egprobe".to_owned(), audited)]);
    assert_eq!(top("cgroups"), [(lab.cg.rel("dev"), audited)]);
    let refused = json["refused"].as_array().expect("refused");
    assert_eq!(refused.len(), 1, "{json:#}");
    assert_eq!(
        refused[0]["decisions"].as_u64(),
        Some((t1.refused + t2.refused + t3.refused + t4.refused) as u64)
    );

    // --pair keeps one cell.
    let mut a = window.to_vec();
    a.extend(["--pair", "dev:prod", "--json"]);
    let one: Value = serde_json::from_str(&report_ok(&a)).expect("JSON");
    assert_eq!(one["matrix"].as_array().map(Vec::len), Some(1), "{one:#}");

    // Text: the matrix row of dev, the audited pair's destination.
    let text = report_ok(&window);
    println!("envguard report (text):\n{text}");
    let dev_row: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&"dev"))
        .unwrap_or_else(|| panic!("no dev row in\n{text}"));
    let refused_n = t1.refused + t2.refused + t3.refused + t4.refused;
    assert_eq!(
        dev_row,
        [
            "dev",
            "·",
            &format!("0/{refused_n}/0"),
            "·",
            &format!("0/0/{audited}")
        ],
        "{text}"
    );
    assert!(
        text.contains(&format!("dev -> staging: {audited} decisions")),
        "{text}"
    );

    // CSV: one line per counter, the same numbers.
    let mut a = window.to_vec();
    a.push("--csv");
    let csv = report_ok(&a);
    println!("envguard report --csv:\n{csv}");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("src_env,dst_env,verdict,mode,direction,proto,count")
    );
    let from_csv: BTreeMap<Labels, u64> = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 7, "{l}");
            (
                [f[0], f[1], f[2], f[3], f[4], f[5]].map(String::from),
                f[6].parse().expect("count"),
            )
        })
        .collect();
    assert_eq!(from_csv, kernel, "CSV\n{csv}");

    // Graphviz: violations red, and dot renders it.
    let mut a = window.to_vec();
    a.extend(["--format", "dot"]);
    let dot = report_ok(&a);
    println!("envguard report --format dot:\n{dot}");
    assert!(
        dot.contains(&format!(
            "\"dev\" -> \"prod\" [label=\"refused {refused_n}\""
        )) && dot.contains("color=red"),
        "{dot}"
    );
    let svg = render_dot(&dot);
    assert!(
        svg.contains("<svg") && svg.contains(">dev<"),
        "dot -Tsvg:\n{svg}"
    );

    // The state directory: root's, 0700, the history file 0600.
    let meta = std::fs::metadata(state.join("history.json")).expect("history.json");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
}

/// Validates `report` against docs/schemas/report.schema.json, and fails on
/// a field it does not describe.
fn check_schema(report: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas/report.schema.json");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("the report schema is JSON");
    let v = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the report schema compiles");
    let errors: Vec<String> = v
        .iter_errors(report)
        .map(|e| format!("at {:?}: {e}", e.instance_path().as_str()))
        .collect();
    assert!(
        errors.is_empty(),
        "report --json does not match report.schema.json:\n{}\n{report:#}",
        errors.join("\n")
    );
    fn undocumented(root: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
        let schema = match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .strip_prefix('#')
                .and_then(|p| root.pointer(p))
                .unwrap_or(schema),
            None => schema,
        };
        if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
            for (i, v) in arr.iter().enumerate() {
                undocumented(root, items, v, &format!("{at}/{i}"), out);
            }
        }
        let (Some(obj), Some(props)) = (
            value.as_object(),
            schema.get("properties").and_then(Value::as_object),
        ) else {
            return;
        };
        for (k, v) in obj {
            match props.get(k) {
                Some(sub) => undocumented(root, sub, v, &format!("{at}/{k}"), out),
                None => out.push(format!("{at}/{k}")),
            }
        }
    }
    let mut out = Vec::new();
    undocumented(&schema, &schema, report, "", &mut out);
    assert!(
        out.is_empty(),
        "report --json has fields report.schema.json does not describe: {out:?}"
    );
}

/// history.json's bytes once `want` holds for it (the agent samples every
/// second; the file is replaced whole, so each read is one sample's).
fn wait_history(state: &Path, want: impl Fn(&Value) -> bool) -> Vec<u8> {
    let file = state.join("history.json");
    let deadline = Instant::now() + WAIT;
    loop {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let h: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if want(&h) {
            return bytes;
        }
        assert!(
            Instant::now() < deadline,
            "after {WAIT:?} {} does not hold what the agent saw: {h:#}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counts in a history's buckets: of the counter rows (`counts`) or of
/// the violation rollups (`violations`).
fn sum_of(h: &Value, what: &str) -> u64 {
    h["buckets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b[what].as_array().into_iter().flatten())
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum()
}

/// `dot -Tsvg` of `text` (graphviz, which `cargo xtask setup` installs).
fn render_dot(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run dot ({e}): install graphviz with `cargo xtask setup`")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to dot");
    let out = child.wait_with_output().expect("wait for dot");
    assert!(
        out.status.success(),
        "dot -Tsvg failed: {}\non:\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `envguard run` with `--state-dir state`, expected to refuse it.
fn assert_run_refuses(lab: &Lab, state: &Path, problem: &str) {
    let (policy, cg, pin, state_s) = (
        lab.policy_path().display().to_string(),
        lab.cg.rel(""),
        lab.pin_root().path().display().to_string(),
        state.display().to_string(),
    );
    let out = sys::run_envguard(
        &sys::envguard_bin(),
        &[
            "run",
            "--policy",
            &policy,
            "--cgroup-root",
            &cg,
            "--pin-root",
            &pin,
            "--detach-on-exit",
            "--state-dir",
            &state_s,
        ],
        Duration::from_secs(15),
    );
    assert!(
        out.status.is_some_and(|s| !s.success()),
        "envguard run must refuse {}: {out:?}",
        state.display()
    );
    assert!(
        out.stderr.contains("refusing state directory") && out.stderr.contains(problem),
        "envguard run must say \"refusing state directory ... {problem}\": {out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is loaded (no policy_loaded): {out:?}"
    );
    assert!(
        lab.pin_root().pins().is_empty(),
        "nothing was pinned: {:?}",
        lab.pin_root().pins()
    );
    let report = report(&["--state-dir", &state_s]);
    assert!(
        !report.success() && report.stderr.contains(problem),
        "envguard report must refuse {} too, saying {problem:?}: {report:?}",
        state.display()
    );
}

const NOBODY: u32 = 65_534;

#[test]
fn a_state_directory_others_could_write_or_redirect_is_refused() {
    let lab = Lab::new(EGPROBE, Mode::Enforce);
    let tmp = TempDir::new();
    let chown = |p: &Path, uid: u32| {
        std::os::unix::fs::lchown(p, Some(uid), None)
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()))
    };
    let mkdir = |name: &str, mode: u32| {
        let p = tmp.join(name);
        std::fs::create_dir(&p).expect("mkdir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    };

    // Pre-created world-writable: anyone could have planted or swapped files.
    let open = mkdir("open", 0o777);
    assert_run_refuses(&lab, &open, "is writable by group or others");

    // A symbolic link to a good directory: not followed.
    let good = mkdir("good", 0o700);
    let link = tmp.join("link");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    assert_run_refuses(&lab, &link, "is a symbolic link");

    // Someone else's directory, and a directory above it that is theirs.
    let theirs = mkdir("theirs", 0o700);
    chown(&theirs, NOBODY);
    assert_run_refuses(&lab, &theirs, "is not owned by root");
    let above = mkdir("above", 0o755);
    chown(&above, NOBODY);
    assert_run_refuses(&lab, &above.join("state"), "is not owned by root");
    assert!(
        !above.join("state").exists(),
        "nothing is created below a refused directory"
    );

    // A file inside that someone else owns (a planted history).
    let planted = mkdir("planted", 0o700);
    std::fs::write(planted.join("history.json"), "{\"format\":1}").expect("write");
    chown(&planted.join("history.json"), NOBODY);
    assert_run_refuses(&lab, &planted, "is not owned by root");

    // Where there is no history, report says so.
    let out = report(&["--state-dir", &good.display().to_string()]);
    assert!(
        !out.success() && out.stderr.contains("no history in"),
        "{out:?}"
    );
}
