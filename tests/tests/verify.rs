//! `envguard verify` on the integration topology: probes run inside `dev`
//! and `prod` (transient cgroups below the lab's `dev` and `prod`), in the
//! client netns, to every env's `probes` targets (echo servers in the server
//! netns) and to the same-host listeners of `prod` (servers in the client
//! netns, in the `prod` cgroup); then the policy file, the agent's loaded
//! policy and the pinned kernel maps are compared.
//!
//! Checked: a correct setup passes in enforce and in audit mode (exit 0,
//! every probe field by field, the probe records marked `"probe"`); a
//! policy file edited without a reload, and RULES entries changed with
//! `bpftool map update`, fail with the drift named (and the probe that the
//! changed entry lets through named too); `--junit` parses as XML (Python's
//! parser) with one testcase per probe; `--dry-run` needs no agent.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use envguard_tests::control::run_cli;
use envguard_tests::lab::EVENT_TIMEOUT;
use envguard_tests::process::Proto;
use envguard_tests::sinks::{http_get, parse_metrics, samples};
use envguard_tests::{AgentOptions, Client, Lab, Mode, PolicyExtras, TempFile};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

/// Same-host servers of `prod` in the client netns.
const LISTEN_TCP: u16 = 7300;
const LISTEN_UDP: u16 = 7301;

fn extras() -> PolicyExtras {
    PolicyExtras {
        prod: "probes = [\"198.18.10.1:9000/tcp\", \"[2001:db8:10::1]:9000/udp\"]\n".into(),
        dev: "probes = [\"198.18.20.1:9000/tcp\", \"198.18.0.1:53/tcp\"]\n".into(),
        ..Default::default()
    }
}

/// The lab with its agent running, remote echo servers and `prod`'s
/// same-host listeners.
fn lab(mode: Mode) -> Lab {
    let mut lab = Lab::with_policy(EGPROBE, mode, &extras());
    lab.spawn_agent(&AgentOptions::ephemeral().metrics_listen("127.0.0.1:0"));
    lab.mkdir_late();
    lab.serve_remote_sites();
    let prod = lab.client_place(Client::Prod);
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    lab.serve(&prod, Proto::Tcp, &[lo], LISTEN_TCP);
    lab.serve(&prod, Proto::Udp, &[lo], LISTEN_UDP);
    lab
}

/// `envguard verify --netns <client> --json --junit FILE` against the lab's
/// agent: (the run, its JSON report, the JUnit file's text).
fn verify(lab: &Lab) -> (envguard_tests::CliRun, Value, String) {
    let junit = TempFile::new("envguard-verify-junit", ".xml", "");
    let path = junit.path().display().to_string();
    let netns = lab.topo.client.name().to_owned();
    let run = lab.cli(&["verify", "--netns", &netns, "--json", "--junit", &path]);
    let report = run.json();
    check_schema(&report);
    let xml = std::fs::read_to_string(junit.path()).unwrap_or_default();
    (run, report, xml)
}

/// The report matches docs/schemas/verify_report.schema.json, and the
/// schema describes every field it has.
fn check_schema(report: &Value) {
    let schema: Value =
        serde_json::from_str(include_str!("../../docs/schemas/verify_report.schema.json"))
            .expect("docs/schemas/verify_report.schema.json is JSON");
    jsonschema::draft202012::meta::validate(&schema).expect("a draft 2020-12 schema");
    let validator = jsonschema::draft202012::options().build(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| format!("at {:?}: {e}", e.instance_path().as_str()))
        .collect();
    assert!(
        errors.is_empty(),
        "verify --json does not match its schema: {errors:#?}\n{report:#}"
    );
    fn documented(schema: &Value, v: &Value, at: &str) {
        match v {
            Value::Object(o) => {
                for (k, val) in o {
                    let sub = &schema["properties"][k];
                    assert!(
                        !sub.is_null(),
                        "verify --json field {at}.{k} is not in its schema"
                    );
                    documented(sub, val, &format!("{at}.{k}"));
                }
            }
            Value::Array(a) if schema["items"].is_object() => {
                for x in a {
                    documented(&schema["items"], x, &format!("{at}[]"));
                }
            }
            _ => {}
        }
    }
    documented(&schema, report, "");
}

/// The probes of a report by (from, target).
fn by_target(report: &Value) -> BTreeMap<(String, String), Value> {
    report["probes"]
        .as_array()
        .unwrap_or_else(|| panic!("no probes in {report}"))
        .iter()
        .map(|p| {
            (
                (
                    p["from"].as_str().unwrap().to_owned(),
                    p["target"].as_str().unwrap().to_owned(),
                ),
                p.clone(),
            )
        })
        .collect()
}

fn listener(port: u16, proto: &str, lab: &Lab) -> String {
    let pid = lab.server_pids()[lab.server_pids().len() - if proto == "tcp" { 2 } else { 1 }];
    format!("listener 127.0.0.1:{port}/{proto} (prod: pid {pid} egprobe)")
}

/// What each probe of the standard topology must show, per mode:
/// (from, target, to env, expect, observed, outcome).
fn expected(
    lab: &Lab,
    mode: Mode,
) -> Vec<(
    String,
    String,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
)> {
    let violating = |observed: &'static str| match mode {
        Mode::Enforce => ("denied", "eperm", "refused (EPERM)"),
        Mode::Audit => ("audited", observed, "audited (violation record seen)"),
    };
    let allowed = |observed: &'static str| {
        (
            "allowed",
            observed,
            if observed == "sent" {
                "allowed, datagram sent"
            } else {
                "allowed, reachable"
            },
        )
    };
    let rows = [
        ("dev", "198.18.20.1:9000/tcp", "dev", allowed("connected")),
        ("dev", "198.18.0.1:53/tcp", "shared", allowed("connected")),
        (
            "dev",
            "198.18.10.1:9000/tcp",
            "prod",
            violating("connected"),
        ),
        (
            "dev",
            "[2001:db8:10::1]:9000/udp",
            "prod",
            violating("sent"),
        ),
        ("dev", "L7300", "prod", violating("connected")),
        ("dev", "L7301", "prod", violating("sent")),
        (
            "prod",
            "198.18.20.1:9000/tcp",
            "dev",
            violating("connected"),
        ),
        ("prod", "198.18.0.1:53/tcp", "shared", allowed("connected")),
        ("prod", "198.18.10.1:9000/tcp", "prod", allowed("connected")),
        ("prod", "[2001:db8:10::1]:9000/udp", "prod", allowed("sent")),
        ("prod", "L7300", "prod", allowed("connected")),
        ("prod", "L7301", "prod", allowed("sent")),
    ];
    rows.into_iter()
        .map(|(from, target, to, (expect, observed, outcome))| {
            let target = match target {
                "L7300" => listener(LISTEN_TCP, "tcp", lab),
                "L7301" => listener(LISTEN_UDP, "udp", lab),
                t => t.to_owned(),
            };
            (from.to_owned(), target, to, expect, observed, outcome)
        })
        .collect()
}

/// Every probe field by field, and each violating probe's record on the
/// agent's stdout marked with the run id.
fn assert_probes(lab: &Lab, mode: Mode, report: &Value) {
    let probes = by_target(report);
    let want = expected(lab, mode);
    assert_eq!(
        probes.len(),
        want.len(),
        "probes: {:#?}",
        probes.keys().collect::<Vec<_>>()
    );
    let run = report["run"].as_str().unwrap();
    for (from, target, to, expect, observed, outcome) in want {
        let p = probes
            .get(&(from.clone(), target.clone()))
            .unwrap_or_else(|| panic!("no probe {from} -> {target} in {report:#}"));
        let what = format!("{from} -> {target}: {p}");
        assert_eq!(p["to"], to, "{what}");
        assert_eq!(p["expect"], expect, "{what}");
        assert_eq!(p["observed"], observed, "{what}");
        assert_eq!(p["outcome"], outcome, "{what}");
        assert_eq!(p["matched"], true, "{what}");
        let cgroup = lab.cg.rel(if from == "dev" { "dev" } else { "prod" });
        assert_eq!(p["cgroup"], cgroup.as_str(), "{what}");
        assert_eq!(
            p["kind"],
            if target.starts_with("listener") {
                "listener"
            } else {
                "policy"
            },
            "{what}"
        );
        let cg = p["cgroup_id"].as_u64().unwrap_or_else(|| panic!("{what}"));
        assert!(
            !lab.cg
                .abs(from.as_str())
                .join(format!("envguard-{run}-{}", p["id"]))
                .exists(),
            "the transient cgroup of {what} is still there"
        );
        if expect == "allowed" {
            assert_eq!(p["record"], Value::Null, "{what}");
            continue;
        }
        if mode == Mode::Audit {
            assert_eq!(p["record"], "audited", "{what}");
        }
        // The agent's record of the probe: marked, and right.
        let (_, rec) =
            lab.agent()
                .wait_for(&format!("the record of probe {what}"), EVENT_TIMEOUT, |l| {
                    l["kind"] == "violation" && l["process"]["cgroup_id"] == cg
                });
        assert_eq!(rec["probe"], run, "{what}: {rec}");
        assert_eq!(rec["verdict"], mode.verdict(), "{what}: {rec}");
        assert_eq!(rec["direction"], "egress", "{what}: {rec}");
        assert_eq!(rec["source"]["env"], from.as_str(), "{what}: {rec}");
        assert_eq!(rec["destination"]["env"], to, "{what}: {rec}");
        let addr = p["addr"].as_str().unwrap();
        let (ip, port) = addr.rsplit_once(':').unwrap();
        assert_eq!(
            rec["destination"]["ip"],
            ip.trim_start_matches('[').trim_end_matches(']'),
            "{what}: {rec}"
        );
        assert_eq!(
            rec["destination"]["port"],
            port.parse::<u16>().unwrap(),
            "{what}: {rec}"
        );
        assert_eq!(rec["process"]["comm"], "envguard", "{what}: {rec}");
        assert_eq!(
            rec["destination"]["env_from"],
            if target.starts_with("listener") {
                "socket"
            } else {
                "cidr"
            },
            "{what}: {rec}"
        );
    }
    // One record per violating probe, each marked; other records are not.
    let lines = lab.agent().lines(0..lab.agent().len());
    let marked = lines.iter().filter(|l| l.get("probe").is_some()).count();
    let violating = probes.values().filter(|p| p["expect"] != "allowed").count();
    assert_eq!(marked, violating, "marked records:\n{lines:#?}");
    assert!(
        lines
            .iter()
            .filter(|l| l.get("probe").is_some())
            .all(|l| l["probe"] == run && l["kind"] == "violation"),
        "a record carries another run's probe mark"
    );
}

/// `envguard_probe_events_total{kind="violation"}` reaches `want` (the agent
/// refreshes its metrics once a second).
fn assert_probe_metric(lab: &Lab, want: f64) {
    let addr = lab.agent().metrics_addr();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = http_get(addr, "/metrics");
        let all = parse_metrics(&r.body);
        let got: f64 = samples(
            &all,
            "envguard_probe_events_total",
            &[("kind", "violation")],
        )
        .iter()
        .map(|s| s.value)
        .sum();
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "envguard_probe_events_total{{kind=\"violation\"}} is {got}, want {want}:\n{}",
            r.body
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn assert_matrix(report: &Value, cells: &[[&str; 3]]) {
    assert_eq!(report["matrix"]["rows"], serde_json::json!(["dev", "prod"]));
    assert_eq!(
        report["matrix"]["columns"],
        serde_json::json!(["dev", "prod", "shared"])
    );
    assert_eq!(report["matrix"]["cells"], serde_json::json!(cells));
}

/// The JUnit file, parsed by Python's XML parser: per suite (name, tests,
/// failures) and per testcase (classname, name, failure message or null,
/// skipped).
fn junit(xml: &str) -> Value {
    let file = TempFile::new("envguard-verify-parse", ".xml", xml);
    let script = r#"
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
out = {"root": root.tag, "tests": int(root.get("tests")), "failures": int(root.get("failures")), "suites": []}
for s in root.findall("testsuite"):
    cases = []
    for c in s.findall("testcase"):
        f = c.find("failure")
        cases.append({"classname": c.get("classname"), "name": c.get("name"),
                      "failure": None if f is None else f.get("message"),
                      "skipped": c.find("skipped") is not None})
    out["suites"].append({"name": s.get("name"), "tests": int(s.get("tests")),
                          "failures": int(s.get("failures")), "cases": cases})
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(file.path())
        .output()
        .expect("running python3 to parse the JUnit XML");
    assert!(
        out.status.success(),
        "the JUnit XML does not parse: {}\n{xml}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn correct_setup(mode: Mode) {
    let lab = lab(mode);
    let (run, report, xml) = verify(&lab);
    assert!(
        run.success(),
        "verify must pass on a correct setup: {}",
        run.describe()
    );
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["drift"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["mode"], mode.name());
    assert_eq!(report["policy"], lab.policy_path().display().to_string());
    assert!(report["run"].as_str().unwrap().starts_with("verify-"));
    assert_probes(&lab, mode, &report);
    assert_matrix(&report, &[["✓", "✓", "✓"], ["✓", "✓", "✓"]]);
    // Five cross-env probes: dev -> prod (TCP, UDP, both listeners), prod -> dev.
    assert_probe_metric(&lab, 5.0);
    // Figures for the report (no assertion on speed): the whole run, and
    // each probe's attempt as the child measured it.
    let ms: Vec<u64> = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ms"].as_u64().unwrap())
        .collect();
    eprintln!(
        "verify ({}): {} probes in {:.0} ms; per probe attempt (ms): {ms:?}",
        mode.name(),
        ms.len(),
        run.elapsed_ms()
    );

    let j = junit(&xml);
    assert_eq!(j["root"], "testsuites");
    assert_eq!(
        (j["tests"].as_u64(), j["failures"].as_u64()),
        (Some(13), Some(0)),
        "{j}"
    );
    let probes = &j["suites"][0];
    assert_eq!(probes["name"], "envguard.verify.probes");
    assert_eq!(
        (probes["tests"].as_u64(), probes["failures"].as_u64()),
        (Some(12), Some(0))
    );
    let cases = probes["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for (c, p) in cases.iter().zip(report["probes"].as_array().unwrap()) {
        assert_eq!(
            c["classname"],
            format!("envguard.verify.{}", p["from"].as_str().unwrap())
        );
        assert_eq!(
            c["name"],
            format!(
                "{} -> {} {}",
                p["from"].as_str().unwrap(),
                p["to"].as_str().unwrap(),
                p["target"].as_str().unwrap()
            )
        );
        assert_eq!(
            (c["failure"].clone(), c["skipped"].clone()),
            (Value::Null, Value::Bool(false)),
            "{c}"
        );
    }
    assert_eq!(j["suites"][1]["name"], "envguard.verify.drift");
    assert_eq!(j["suites"][1]["cases"][0]["failure"], Value::Null);

    // For people: the matrix and one line per probe.
    let text = lab.cli(&["verify", "--netns", lab.topo.client.name()]);
    text.assert_ok("verify (text)");
    eprintln!("envguard verify ({}):\n{}", mode.name(), text.stdout);
    assert!(
        text.stdout.contains(
            "from \\ to  dev  prod  shared\ndev        ✓    ✓     ✓\nprod       ✓    ✓     ✓\n"
        ),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("12 probes: 12 matched, 0 failed; drift: none; OK"),
        "{}",
        text.stdout
    );
}

#[test]
fn enforce_correct_setup_passes() {
    correct_setup(Mode::Enforce);
}

#[test]
fn audit_correct_setup_passes() {
    correct_setup(Mode::Audit);
}

#[test]
fn policy_file_edited_without_reload_is_drift() {
    let lab = lab(Mode::Enforce);
    let loaded = lab.status()["revision"].as_str().unwrap().to_owned();
    let mut edited = extras();
    edited.allow = "\n[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"9000/tcp\"]\n".into();
    lab.set_policy(&edited);
    let (run, report, xml) = verify(&lab);
    run.assert_failed("verify after an edit without reload");
    assert_eq!(report["ok"], false);
    let drift = report["drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert_eq!(drift[0]["kind"], "policy_file");
    let msg = drift[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("policy file changed since the agent loaded it (reload?): ")
            && msg.ends_with(&format!("the agent loaded {loaded}")),
        "{msg}"
    );
    // The policy in force did not change: every probe still matches it.
    assert_probes(&lab, Mode::Enforce, &report);
    let j = junit(&xml);
    assert_eq!(j["failures"], 1, "{j}");
    assert_eq!(j["suites"][1]["cases"][0]["failure"], msg);

    let text = lab.cli(&["verify", "--netns", lab.topo.client.name()]);
    text.assert_failed("verify (text) after an edit without reload");
    eprintln!(
        "envguard verify after an edit without reload:\n{}",
        text.stdout
    );
    assert!(
        text.stdout.contains(&format!("drift:\n  {msg}\n")),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("12 probes: 12 matched, 0 failed; drift: 1; FAILED"),
        "{}",
        text.stdout
    );

    let r = lab.cli(&["reload"]);
    r.assert_ok("reload");
    let (run, report, _) = verify(&lab);
    assert!(run.success(), "after the reload: {}", run.describe());
    assert_eq!(report["drift"], serde_json::json!([]));
    let p = &by_target(&report)[&("dev".to_owned(), "198.18.10.1:9000/tcp".to_owned())];
    assert_eq!(
        (p["expect"].as_str(), p["observed"].as_str()),
        (Some("allowed"), Some("connected")),
        "{p}"
    );
}

/// `bpftool -j ARGS...`'s JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("bpftool is missing (`cargo xtask setup` installs it): {e}"));
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

fn maps_dir(lab: &Lab) -> PathBuf {
    let dirs = lab.pin_root().layout_dirs();
    assert_eq!(dirs.len(), 1, "one pinned layout: {dirs:?}");
    dirs[0].join("maps")
}

/// The slot in force, from the pinned CONFIG (generation's low bit).
fn slot(maps: &Path) -> &'static str {
    let dump = bpftool(&[
        "map",
        "dump",
        "pinned",
        &maps.join("CONFIG").display().to_string(),
    ]);
    let value: Vec<u8> = dump[0]["value"]
        .as_array()
        .unwrap_or_else(|| panic!("CONFIG dump: {dump}"))
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    if value[0] & 1 == 0 { "A" } else { "B" }
}

/// An LPM key of RULES: prefix length, then the big-endian rule key.
fn rule_key(src: u32, dst: u32, proto: u8, port: u16) -> Vec<u8> {
    let mut k = 88u32.to_le_bytes().to_vec();
    k.extend(src.to_be_bytes());
    k.extend(dst.to_be_bytes());
    k.push(proto);
    k.extend(port.to_be_bytes());
    k.push(0);
    k
}

#[test]
fn map_entries_changed_with_bpftool_are_drift() {
    let lab = lab(Mode::Enforce);
    let envs = lab.status()["envs"].clone();
    assert_eq!(
        envs,
        serde_json::json!(["host", "world", "dev", "prod", "shared"]),
        "env ids"
    );
    let (dev, prod, shared) = (2, 3, 4);
    let maps = maps_dir(&lab);
    let slot = slot(&maps);
    let rules = maps.join(format!("RULES_{slot}")).display().to_string();
    let update = |key: Vec<u8>, rule: u32| {
        let mut args = vec![
            "map".to_owned(),
            "update".into(),
            "pinned".into(),
            rules.clone(),
            "key".into(),
            "hex".into(),
        ];
        args.extend(
            hex(&key)
                .iter()
                .map(|h| h.trim_start_matches("0x").to_owned()),
        );
        args.extend(["value".to_owned(), "hex".into()]);
        args.extend(
            hex(&rule.to_le_bytes())
                .iter()
                .map(|h| h.trim_start_matches("0x").to_owned()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bpftool(&args);
    };
    // An allow entry the policy does not have (it lets dev reach prod on
    // 9000/tcp), and an existing entry with another rule id.
    update(rule_key(dev, prod, 6, 9000), 0);
    update(rule_key(dev, shared, 6, 53), 7);
    // And a CIDR entry gone (dev's IPv6 /48: no probe goes there).
    let cidrs = maps
        .join(format!("CIDR_ENVS_V6_{slot}"))
        .display()
        .to_string();
    let mut key = 48u32.to_le_bytes().to_vec();
    key.extend(
        "2001:db8:20::"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    let mut args = vec![
        "map".to_owned(),
        "delete".into(),
        "pinned".into(),
        cidrs,
        "key".into(),
        "hex".into(),
    ];
    args.extend(
        hex(&key)
            .iter()
            .map(|h| h.trim_start_matches("0x").to_owned()),
    );
    bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let (run, report, xml) = verify(&lab);
    run.assert_failed("verify after bpftool map update");
    let map = format!("RULES_{slot}");
    let drift: Vec<(String, String, String, String)> = report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["map"].as_str().unwrap_or_default().to_owned(),
                d["change"].as_str().unwrap_or_default().to_owned(),
                d["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let prefix = format!("kernel map {map} differs from the loaded policy: ");
    let v6 = format!("CIDR_ENVS_V6_{slot}");
    assert_eq!(
        drift,
        [
            (
                "kernel_map".to_owned(),
                v6.clone(),
                "missing".to_owned(),
                format!(
                    "kernel map {v6} differs from the loaded policy: entry 2001:db8:20::/48 (env dev) is missing"
                ),
            ),
            (
                "kernel_map".to_owned(),
                map.clone(),
                "changed".to_owned(),
                format!(
                    "{prefix}entry dev -> shared tcp/53 (prefix 88) is rule 7 in the kernel, rule 0 in the policy"
                ),
            ),
            (
                "kernel_map".to_owned(),
                map.clone(),
                "extra".to_owned(),
                format!(
                    "{prefix}entry dev -> prod tcp/9000 (prefix 88) (rule 0) is not in the policy"
                ),
            ),
        ],
        "{report:#}"
    );
    // The extra entry lets the probe through: named as a mismatch.
    let probes = by_target(&report);
    let p = &probes[&("dev".to_owned(), "198.18.10.1:9000/tcp".to_owned())];
    assert_eq!(p["expect"], "denied", "{p}");
    assert_eq!(p["observed"], "connected", "{p}");
    assert_eq!(p["matched"], false, "{p}");
    assert_eq!(
        p["outcome"], "not refused (connected), but the policy refuses it",
        "{p}"
    );
    let failed: Vec<&Value> = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["matched"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(
        report["matrix"]["cells"][0],
        serde_json::json!(["✓", "✗", "✓"])
    );

    let j = junit(&xml);
    assert_eq!(j["failures"], 2, "{j}");
    assert_eq!(
        j["suites"][1]["cases"][0]["failure"],
        format!(
            "kernel map {v6} differs from the loaded policy: entry 2001:db8:20::/48 (env dev) is missing"
        )
    );
    let failing: Vec<&Value> = j["suites"][0]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["failure"].is_null())
        .collect();
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0]["name"], "dev -> prod 198.18.10.1:9000/tcp");
    assert_eq!(
        failing[0]["failure"],
        "not refused (connected), but the policy refuses it"
    );

    let text = lab.cli(&["verify", "--netns", lab.topo.client.name()]);
    text.assert_failed("verify (text) after bpftool map update");
    eprintln!("envguard verify after bpftool map update:\n{}", text.stdout);
    assert!(
        text.stdout.contains("dev        ✓    ✗     ✓\n")
            && text.stdout.contains("\nfailed:\n  dev -> prod  198.18.10.1:9000/tcp: not refused (connected), but the policy refuses it (expected denied)\n\ndrift:\n"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains(&format!("\n  {prefix}entry dev -> shared")),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("12 probes: 11 matched, 1 failed; drift: 3; FAILED"),
        "{}",
        text.stdout
    );
}

/// A pair switched at runtime (`envguard mode audit --from dev --to prod`)
/// is part of the policy in force: verify expects dev -> prod audited, and
/// the runtime entry in PAIR_MODES is no drift.
#[test]
fn runtime_pair_mode_is_the_policy_in_force() {
    let lab = lab(Mode::Enforce);
    lab.cli(&["mode", "audit", "--from", "dev", "--to", "prod"])
        .assert_ok("mode audit --from dev --to prod");
    let (run, report, _) = verify(&lab);
    assert!(run.success(), "{}", run.describe());
    assert_eq!(report["drift"], serde_json::json!([]));
    for p in report["probes"].as_array().unwrap() {
        let want = match (p["from"].as_str().unwrap(), p["to"].as_str().unwrap()) {
            ("dev", "prod") => ("audited", Some("audited")),
            ("prod", "dev") => ("denied", None),
            _ => ("allowed", None),
        };
        assert_eq!(
            (p["expect"].as_str(), p["record"].as_str()),
            (Some(want.0), want.1),
            "{p}"
        );
        assert_eq!(p["matched"], true, "{p}");
    }
}

/// A stopped agent (SIGSTOP: it accepts connections but never answers) is
/// drift; the probes still run, judged by the policy file, against the
/// pinned programs that keep enforcing.
#[test]
fn stale_agent_is_drift() {
    let lab = lab(Mode::Enforce);
    lab.agent().pause();
    let netns = lab.topo.client.name().to_owned();
    // Without an answering agent verify needs the policy file to judge by.
    let policy = lab.policy_path().display().to_string();
    let run = lab.cli(&["verify", "--policy", &policy, "--netns", &netns, "--json"]);
    lab.agent().resume();
    run.assert_failed("verify with a stopped agent");
    let report = run.json();
    check_schema(&report);
    let drift = report["drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{drift:#?}");
    assert_eq!(drift[0]["kind"], "agent");
    let msg = drift[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("agent is stale or not running: no answer on ")
            && msg.contains(" within 5s; its last heartbeat is ")
            && msg.ends_with(" old"),
        "{msg}"
    );
    let probes = by_target(&report);
    assert_eq!(probes.len(), 12);
    for p in probes.values() {
        assert_eq!(p["matched"], true, "{p}");
        assert_eq!(p["record"], Value::Null, "{p}");
    }
    let p = &probes[&("dev".to_owned(), "198.18.10.1:9000/tcp".to_owned())];
    assert_eq!(
        (p["expect"].as_str(), p["observed"].as_str()),
        (Some("denied"), Some("eperm")),
        "{p}"
    );
}

#[test]
fn dry_run_needs_no_agent() {
    let cg = envguard_tests::CgroupTree::create();
    let policy = TempFile::new(
        "envguard-verify-policy",
        ".toml",
        &envguard_tests::policy::standard_policy_with(Mode::Enforce, &cg.rel(""), &extras()),
    );
    let path = policy.path().display().to_string();
    let r = run_cli(
        &[
            "verify".into(),
            "--policy".into(),
            path.clone(),
            "--dry-run".into(),
            "--json".into(),
        ],
        None,
    );
    r.assert_ok("verify --dry-run");
    let report = r.json();
    check_schema(&report);
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["ok"], true);
    assert_eq!(report["policy"], path);
    let got: Vec<(String, String, String, String, Value)> = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["from"].as_str().unwrap().to_owned(),
                p["target"].as_str().unwrap().to_owned(),
                p["to"].as_str().unwrap().to_owned(),
                p["expect"].as_str().unwrap().to_owned(),
                p["observed"].clone(),
            )
        })
        .collect();
    let row = |f: &str, t: &str, to: &str, e: &str| {
        (
            f.to_owned(),
            t.to_owned(),
            to.to_owned(),
            e.to_owned(),
            Value::Null,
        )
    };
    assert_eq!(
        got,
        [
            row("dev", "198.18.20.1:9000/tcp", "dev", "allowed"),
            row("dev", "198.18.0.1:53/tcp", "shared", "allowed"),
            row("dev", "198.18.10.1:9000/tcp", "prod", "denied"),
            row("dev", "[2001:db8:10::1]:9000/udp", "prod", "denied"),
            row("prod", "198.18.20.1:9000/tcp", "dev", "denied"),
            row("prod", "198.18.0.1:53/tcp", "shared", "allowed"),
            row("prod", "198.18.10.1:9000/tcp", "prod", "allowed"),
            row("prod", "[2001:db8:10::1]:9000/udp", "prod", "allowed"),
        ]
    );
    assert_matrix(
        &report,
        &[["allow", "deny", "allow"], ["deny", "allow", "allow"]],
    );
    let text = run_cli(
        &["verify".into(), "--policy".into(), path, "--dry-run".into()],
        None,
    );
    text.assert_ok("verify --dry-run (text)");
    eprintln!("envguard verify --dry-run:\n{}", text.stdout);
    assert!(text.stdout.contains("from \\ to  dev    prod   shared\ndev        allow  deny   allow\nprod       deny   allow  allow\n"), "{}", text.stdout);
    assert!(text.stdout.contains("- dev -> prod  198.18.10.1:9000/tcp: expect denied  [default:cross-env (no allow rule for dev -> prod)]\n"), "{}", text.stdout);
    assert!(
        text.stdout
            .contains("8 probes planned (dry run: nothing sent)"),
        "{}",
        text.stdout
    );
}
