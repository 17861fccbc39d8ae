//! The monitoring contrib files, checked like code:
//!
//! - `contrib/prometheus/envguard.rules.yml` passes `promtool check rules`
//!   and its unit tests (`promtool test rules envguard.rules.test.yml`);
//!   promtool missing is a failure, not a skip (`cargo xtask setup`
//!   installs it);
//! - `contrib/grafana/envguard.json` is a JSON dashboard whose panels have
//!   unique ids, a position and PromQL targets;
//! - every `envguard_*` / `process_*` metric either file names is one a real
//!   agent serves (scraped from `--metrics-listen`), so a renamed metric
//!   cannot leave the alerts silently empty.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use envguard_tests::sinks::http_get;
use envguard_tests::{AgentOptions, Lab, Mode};
use serde_json::Value;

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): the alert rules are checked with it; install it with \
                 `cargo xtask setup` (Debian package prometheus)"
            )
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{said}",
        out.status
    );
    said
}

/// The metric-like names (`envguard_*`, `process_*`) in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for c in text.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if word.starts_with("envguard_") || word.starts_with("process_") {
                out.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("contrib/prometheus");
    let check = promtool(&["check", "rules", "envguard.rules.yml"], &dir);
    assert!(check.contains("SUCCESS: 8 rules found"), "{check}");
    let test = promtool(&["test", "rules", "envguard.rules.test.yml"], &dir);
    assert!(test.contains("SUCCESS"), "{test}");
}

#[test]
fn dashboard_and_rules_use_only_metrics_the_agent_serves() {
    let dash_text =
        std::fs::read_to_string(repo().join("contrib/grafana/envguard.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&dash_text).expect("the dashboard is valid JSON");
    assert_eq!(dash["uid"], "envguard");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "gridPos of {p}");
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    let kinds: BTreeSet<&str> = panels.iter().filter_map(|p| p["type"].as_str()).collect();
    for k in ["heatmap", "table", "timeseries", "stat"] {
        assert!(kinds.contains(k), "a {k} panel: {kinds:?}");
    }
    let rules = std::fs::read_to_string(repo().join("contrib/prometheus/envguard.rules.yml"))
        .expect("rules");
    let used: BTreeSet<String> = metric_names(&exprs.join("\n"))
        .into_iter()
        .chain(metric_names(&rules))
        .collect();

    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    lab.spawn_agent(&AgentOptions::ephemeral().metrics_listen("127.0.0.1:0"));
    let body = http_get(lab.agent().metrics_addr(), "/metrics").body;
    let served: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let unknown: Vec<&String> = used.difference(&served).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard or the rules use metrics the agent does not serve: {unknown:?}\nserved: {served:?}"
    );
    for m in [
        "envguard_decisions_total",
        "envguard_events_lost_total",
        "envguard_events_emitted_total",
        "envguard_heartbeat_timestamp_seconds",
    ] {
        assert!(used.contains(m), "{m} is used");
    }
}
