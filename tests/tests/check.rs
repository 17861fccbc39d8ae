//! `envguard check --policy FILE`: exit 0 for a valid policy (a listed cgroup
//! that does not exist is only a warning), non-zero with `FILE:LINE: message`
//! on stderr for an invalid one, LINE being the line of the offending text.
//! These need no root, only the agent binary.

use std::process::{Command, Output};

use envguard_tests::sys::envguard_bin;
use envguard_tests::{Mode, TempFile, policy::standard_policy};

/// A valid policy, envs in alphabetical order (so "the second occurrence"
/// of a duplicate is the same in file order and in name order).
const BASE: &str = r#"mode = "enforce"

[envs.dev]
cgroups = ["/envguard-check-missing/dev"]
cidrs = ["198.18.20.0/24", "2001:db8:20::/48"]

[envs.prod]
cgroups = ["/envguard-check-missing/prod"]
cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]

[envs.shared]
cidrs = ["198.18.0.0/28", "2001:db8:0:1::/64"]

[[allow]]
from = "*"
to = "shared"
ports = ["53/udp", "53/tcp", "8000-8100/tcp"]
"#;

fn run_check(contents: &str) -> (TempFile, Output) {
    let file = TempFile::new("envguard-check", ".toml", contents);
    let out = Command::new(envguard_bin())
        .arg("check")
        .arg("--policy")
        .arg(file.path())
        .output()
        .expect("cannot run envguard check");
    (file, out)
}

/// `BASE` with the line `old` (which must occur exactly once) replaced by `new`.
fn edit(old: &str, new: &str) -> String {
    assert_eq!(
        BASE.lines().filter(|l| *l == old).count(),
        1,
        "test bug: {old:?} must be one line of BASE"
    );
    BASE.lines()
        .map(|l| if l == old { new } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Line numbers of the `FILE:LINE: message` diagnostics on stderr that are
/// errors, i.e. not warnings.
fn error_lines(stderr: &str, file: &str) -> Vec<usize> {
    let prefix = format!("{file}:");
    stderr
        .lines()
        .filter(|l| !l.to_ascii_lowercase().contains("warn"))
        .filter_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            let (num, msg) = rest.split_once(':')?;
            let n = num.parse().ok()?;
            (!msg.trim().is_empty()).then_some(n)
        })
        .collect()
}

/// Asserts `contents` is rejected with an error on the (single) line that
/// contains `marker`.
#[track_caller]
fn assert_rejected_at(contents: &str, marker: &str, what: &str) {
    let hits: Vec<usize> = contents
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(marker))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "test bug: marker {marker:?} must be on exactly one line"
    );
    let line = hits[0];
    let (file, out) = run_check(contents);
    let path = file.path().display().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: `envguard check` must reject this policy but exited {}\npolicy:\n{contents}\nstderr:\n{stderr}",
        out.status
    );
    let lines = error_lines(&stderr, &path);
    assert!(
        lines.contains(&line),
        "{what}: stderr must hold `{path}:{line}: message` (the line of {marker:?}); error lines found: {lines:?}\npolicy:\n{}\nstderr:\n{stderr}",
        numbered(contents)
    );
}

fn numbered(s: &str) -> String {
    s.lines()
        .enumerate()
        .map(|(i, l)| format!("{:>3} | {l}\n", i + 1))
        .collect()
}

#[test]
fn valid_policy_is_accepted_and_missing_cgroups_only_warn() {
    let (file, out) = run_check(BASE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a valid policy must pass `envguard check`: {}\nstderr:\n{stderr}",
        out.status
    );
    for cg in [
        "/envguard-check-missing/dev",
        "/envguard-check-missing/prod",
    ] {
        assert!(
            stderr.contains(cg),
            "the warning must name the missing cgroup {cg}; stderr:\n{stderr}"
        );
    }
    drop(file);
}

#[test]
fn the_test_policies_are_valid() {
    for mode in [Mode::Enforce, Mode::Audit] {
        let (_file, out) = run_check(&standard_policy(mode, "/envguard-check-missing"));
        assert!(
            out.status.success(),
            "the integration tests' {} policy must pass `envguard check`: {}\nstderr:\n{}",
            mode.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let path = std::env::temp_dir().join(envguard_tests::sys::unique_name("envguard-check-absent"));
    let out = Command::new(envguard_bin())
        .arg("check")
        .arg("--policy")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a missing policy file must fail `envguard check`"
    );
    assert!(
        stderr.contains(&path.display().to_string()),
        "stderr must name {}:\n{stderr}",
        path.display()
    );
}

#[test]
fn toml_syntax_error() {
    let bad = r#"cidrs = ["198.18.10.0/24" "2001:db8:10::/48"]"#;
    assert_rejected_at(
        &edit(r#"cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]"#, bad),
        bad,
        "missing comma in an array",
    );
}

#[test]
fn unknown_top_level_key() {
    let contents = edit(
        r#"mode = "enforce""#,
        "mode = \"enforce\"\ncolour = \"blue\"",
    );
    assert_rejected_at(&contents, "colour", "unknown top-level key");
}

#[test]
fn unknown_env_key() {
    let contents = edit(
        r#"cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]"#,
        r#"cidr = ["198.18.10.0/24"]"#,
    );
    assert_rejected_at(&contents, "cidr =", "unknown key in an env");
}

#[test]
fn unknown_rule_key() {
    let contents = edit(r#"to = "shared""#, "to = \"shared\"\nlog = true");
    assert_rejected_at(&contents, "log = true", "unknown key in an allow rule");
}

#[test]
fn invalid_mode() {
    assert_rejected_at(
        &edit(r#"mode = "enforce""#, r#"mode = "block""#),
        "block",
        "unknown mode",
    );
}

#[test]
fn unknown_env_in_rule() {
    assert_rejected_at(
        &edit(r#"to = "shared""#, r#"to = "staging""#),
        "staging",
        "unknown env in `to`",
    );
    assert_rejected_at(
        &edit(r#"from = "*""#, r#"from = "qa""#),
        "\"qa\"",
        "unknown env in `from`",
    );
}

#[test]
fn invalid_cidrs() {
    let v4 = r#"cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]"#;
    for bad in [
        r#"cidrs = ["198.18.10.0/33", "2001:db8:10::/48"]"#,
        r#"cidrs = ["198.18.10.0/24", "2001:db8:10::/129"]"#,
        r#"cidrs = ["198.18.300.0/24", "2001:db8:10::/48"]"#,
        r#"cidrs = ["prod-net", "2001:db8:10::/48"]"#,
    ] {
        assert_rejected_at(&edit(v4, bad), bad, &format!("invalid CIDR in {bad}"));
    }
}

#[test]
fn invalid_ports() {
    let ports = r#"ports = ["53/udp", "53/tcp", "8000-8100/tcp"]"#;
    for bad in [
        r#"ports = ["53/udp", "53/tcp", "70000/tcp"]"#,
        r#"ports = ["53/udp", "53/bogus", "8000-8100/tcp"]"#,
        r#"ports = ["53/udp", "53/tcp", "8100-8000/tcp"]"#,
        r#"ports = ["53/udp", "fifty/tcp", "8000-8100/tcp"]"#,
    ] {
        assert_rejected_at(&edit(ports, bad), bad, &format!("invalid port in {bad}"));
    }
}

#[test]
fn same_cidr_in_two_envs() {
    let bad = r#"cidrs = ["198.18.10.0/24", "198.18.20.0/24"]"#;
    let contents = edit(r#"cidrs = ["198.18.10.0/24", "2001:db8:10::/48"]"#, bad);
    assert_rejected_at(
        &contents,
        bad,
        "198.18.20.0/24 in dev and in prod (error on the second occurrence)",
    );
}

#[test]
fn same_cgroup_in_two_envs() {
    let bad = r#"cgroups = ["/envguard-check-missing/dev"]  # also dev's"#;
    let contents = edit(r#"cgroups = ["/envguard-check-missing/prod"]"#, bad);
    assert_rejected_at(
        &contents,
        "also dev's",
        "one cgroup in dev and in prod (error on the second occurrence)",
    );
}

#[test]
fn empty_env_name() {
    let contents = edit("[envs.shared]", r#"[envs.""]"#);
    let contents = contents.replace(r#"to = "shared""#, r#"to = "dev""#);
    assert_rejected_at(&contents, r#"[envs.""]"#, "empty env name");
}
