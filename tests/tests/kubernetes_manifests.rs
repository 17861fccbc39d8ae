//! The Kubernetes manifests in `contrib/kubernetes/`, checked offline with
//! the tools `cargo xtask setup` puts in `target/venv` (pinned, from PyPI):
//!
//! - `kubernetes-validate --strict` against Kubernetes 1.35 (its bundled
//!   schemas; unknown fields are errors) passes on every manifest, and fails
//!   on a DaemonSet with a misspelt field and one with a wrongly typed value
//!   (so the check is not vacuous);
//! - `yamllint -s` with `contrib/kubernetes/.yamllint.yaml` passes;
//! - the DaemonSet keeps what the README promises: not privileged, exactly
//!   the README's capabilities, hostPID, the bpffs/cgroup2/`/run/envguard`
//!   host paths, the policy ConfigMap as a directory without subPath (so the
//!   kubelet updates it), a liveness probe through `envguard status`, a
//!   rolling update with `maxSurge: 0`, a toleration for every taint;
//! - the ConfigMap's policy files, written out as the volume would hold
//!   them, pass `envguard check --policy DIR`.
//!
//! Needs neither root nor a cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use envguard_tests::sinks::TempDir;
use envguard_tests::sys;

const K8S_VERSION: &str = "1.35.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Vec<PathBuf> {
    let dir = root().join("contrib/kubernetes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    v.sort();
    assert!(
        v.len() >= 4,
        "expected the Namespace, ServiceAccount, ConfigMap and DaemonSet manifests: {v:?}"
    );
    v
}

fn tool(name: &str) -> PathBuf {
    let p = root().join("target/venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: `cargo xtask setup` installs kubernetes-validate and yamllint in target/venv",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn validate(files: &[PathBuf]) -> Output {
    run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", K8S_VERSION])
        .args(files))
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() {
    let files = manifests();
    let out = validate(&files);
    assert!(
        out.status.success(),
        "kubernetes-validate {K8S_VERSION}: {}",
        text(&out)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    for f in &files {
        assert!(
            report.contains(&format!("{} passed", f.display())),
            "{} not reported as passed: {report}",
            f.display()
        );
    }
    // Not vacuous: a misspelt field and a wrongly typed value are caught.
    let ds =
        std::fs::read_to_string(root().join("contrib/kubernetes/daemonset.yaml")).expect("read");
    let tmp = TempDir::new();
    for (what, from, to) in [
        ("a misspelt field", "hostPID: true", "hostPid: true"),
        ("a wrongly typed value", "maxSurge: 0", "maxSurge: [0]"),
    ] {
        assert!(ds.contains(from), "daemonset.yaml must contain {from:?}");
        let bad = tmp.join("bad.yaml");
        std::fs::write(&bad, ds.replace(from, to)).expect("write");
        let out = validate(&[bad]);
        assert!(
            !out.status.success(),
            "kubernetes-validate must reject {what} ({to}): {}",
            text(&out)
        );
    }
}

#[test]
fn manifests_pass_yamllint() {
    let dir = root().join("contrib/kubernetes");
    let out = run(Command::new(tool("yamllint"))
        .arg("-s")
        .arg("-c")
        .arg(dir.join(".yamllint.yaml"))
        .arg(&dir));
    assert!(out.status.success(), "yamllint: {}", text(&out));
}

#[test]
fn daemonset_keeps_the_documented_shape() {
    let ds =
        std::fs::read_to_string(root().join("contrib/kubernetes/daemonset.yaml")).expect("read");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README");
    for want in [
        "hostPID: true",
        "privileged: false",
        "path: /sys/fs/bpf",
        "path: /sys/fs/cgroup",
        "path: /run/envguard",
        "mountPath: /etc/envguard/policy.d",
        "name: envguard-policy",
        "command: [\"/usr/bin/envguard\", \"status\"]",
        "maxUnavailable: 1",
        "maxSurge: 0",
        "- operator: Exists",
        "containerPort: 9477",
    ] {
        assert!(ds.contains(want), "daemonset.yaml must have {want:?}");
    }
    assert!(
        !ds.contains("subPath"),
        "a subPath mount would never see ConfigMap updates"
    );
    // The capabilities: the README's list, the DaemonSet's, the unit's.
    let unit = std::fs::read_to_string(root().join("contrib/envguard.service")).expect("read unit");
    let unit_caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit's CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let ds_caps: Vec<String> = ds
        .split("add:")
        .nth(1)
        .expect("capabilities add")
        .lines()
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .collect();
    assert_eq!(
        ds_caps, unit_caps,
        "the DaemonSet must add exactly the unit's capabilities"
    );
    for c in &ds_caps {
        assert!(
            readme.contains(&format!("CAP_{c}")),
            "the README must list CAP_{c}"
        );
    }
}

#[test]
fn configmap_policy_passes_envguard_check() {
    let cm =
        std::fs::read_to_string(root().join("contrib/kubernetes/configmap.yaml")).expect("read");
    // `data:` keys at two spaces, each a `|` block at four.
    let tmp = TempDir::new();
    let mut files: Vec<(String, String)> = Vec::new();
    let mut in_data = false;
    for line in cm.lines() {
        if line == "data:" {
            in_data = true;
        } else if in_data
            && let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(": |"))
        {
            files.push((key.to_owned(), String::new()));
        } else if in_data && let Some((_, body)) = files.last_mut() {
            body.push_str(line.strip_prefix("    ").unwrap_or(line.trim()));
            body.push('\n');
        }
    }
    assert!(
        files.len() >= 2,
        "the ConfigMap must hold the policy as several files: {files:?}"
    );
    for (name, body) in &files {
        assert!(
            name.ends_with(".toml"),
            "ConfigMap key {name} must end in .toml to be read"
        );
        std::fs::write(tmp.join(name), body).expect("write");
    }
    let bin = sys::envguard_bin();
    let out = run(Command::new(&bin)
        .args(["check", "--policy"])
        .arg(tmp.path()));
    assert!(
        out.status.success(),
        "envguard check --policy <the ConfigMap's files>: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mode audit"),
        "the shipped ConfigMap policy must start in audit mode: {}",
        text(&out)
    );
}
