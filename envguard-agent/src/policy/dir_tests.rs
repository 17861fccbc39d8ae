//! Policy directories: `*.toml` files merged in name order.
use std::path::{Path, PathBuf};

use super::*;
use crate::policy::lint::lint;

const BASE: &str = r#"mode = "enforce"

[defaults]
host = "allow"

[envs.prod]
cgroups = ["/prod.slice"]
cidrs = ["198.18.10.0/24"]
"#;

const TEAM: &str = r#"# the dev team's file
[envs.dev]
cgroups = ["/dev.slice"]
cidrs = ["198.18.20.0/24"]

[[allow]]
from = "dev"
to = "prod"
ports = ["5432/tcp"]
"#;

fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    list.iter()
        .map(|(n, t)| (Path::new("/etc/envguard/policy.d").join(n), (*t).to_owned()))
        .collect()
}

fn dir(list: &[(&str, &str)]) -> Result<Policy, PolicyError> {
    Policy::parse_dir(Path::new("/etc/envguard/policy.d"), &files(list))
}

fn errors(list: &[(&str, &str)]) -> Vec<String> {
    match dir(list) {
        Ok(_) => panic!("directory unexpectedly valid: {list:?}"),
        Err(PolicyError::Invalid(errs)) => errs.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn merged_like_one_file() {
    let p = dir(&[("00-base.toml", BASE), ("10-dev.toml", TEAM)]).unwrap();
    let one = Policy::parse(Path::new("p.toml"), &format!("{BASE}{TEAM}")).unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.env_names(), one.env_names());
    assert_eq!(
        p.envs.iter().map(|e| &e.cidrs).collect::<Vec<_>>(),
        one.envs.iter().map(|e| &e.cidrs).collect::<Vec<_>>()
    );
    assert_eq!(p.rules.len(), 1);
    assert_eq!(
        p.rules[0].to_string(),
        "allow dev -> prod [5432/tcp] (10-dev.toml:6)"
    );
    assert_eq!(
        p.locate(p.rules[0].line),
        (
            Path::new("/etc/envguard/policy.d/10-dev.toml").to_owned(),
            6
        )
    );
    let dev = p.envs.iter().find(|e| e.name == "dev").unwrap();
    assert_eq!(p.locate(dev.lines.cidrs[0]).1, 4);
    assert_eq!(p.sources.len(), 2);
    // Rule ids: allow rules of every file before deny rules, files in order.
    let deny = "[[deny]]\nfrom = \"prod\"\nto = \"dev\"\n";
    let allow = "[[allow]]\nfrom = \"prod\"\nto = \"dev\"\nports = [\"80/tcp\"]\n";
    let p = dir(&[
        ("00-base.toml", BASE),
        ("10-dev.toml", TEAM),
        ("20-x.toml", deny),
        ("30-y.toml", allow),
    ])
    .unwrap();
    let labels: Vec<String> = p.rules.iter().map(ToString::to_string).collect();
    assert_eq!(
        labels,
        [
            "allow dev -> prod [5432/tcp] (10-dev.toml:6)",
            "allow prod -> dev [80/tcp] (30-y.toml:1)",
            "deny prod -> dev (20-x.toml:1)"
        ]
    );
}

#[test]
fn revision_is_sha256sum_of_the_listing() {
    let p = dir(&[("00-base.toml", BASE), ("10-dev.toml", TEAM)]).unwrap();
    let listing = format!(
        "{:x}  00-base.toml\n{:x}  10-dev.toml\n",
        Sha256::digest(BASE.as_bytes()),
        Sha256::digest(TEAM.as_bytes())
    );
    assert_eq!(
        p.revision,
        format!("sha256:{:x}", Sha256::digest(listing.as_bytes()))
    );
    // A rename changes it; so does a byte.
    let renamed = dir(&[("00-base.toml", BASE), ("20-dev.toml", TEAM)]).unwrap();
    assert_ne!(renamed.revision, p.revision);
    let edited = dir(&[
        ("00-base.toml", BASE),
        ("10-dev.toml", &format!("{TEAM}\n")),
    ])
    .unwrap();
    assert_ne!(edited.revision, p.revision);
}

#[test]
fn errors_name_the_file_and_its_line() {
    let bad = "[[allow]]\nfrom = \"dev\"\nto = \"staging\"\n";
    assert_eq!(
        errors(&[
            ("00-base.toml", BASE),
            ("10-dev.toml", TEAM),
            ("20-bad.toml", bad)
        ]),
        [
            "/etc/envguard/policy.d/20-bad.toml:3: unknown env \"staging\" in rule; known: dev, host, prod, world, *"
        ]
    );
    // A syntax error in one file and a validation error in another: both.
    let syntax = "[envs.qa\ncidrs = []\n";
    let errs = errors(&[
        ("00-base.toml", BASE),
        ("05-qa.toml", syntax),
        ("10-dev.toml", TEAM),
    ]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("/etc/envguard/policy.d/05-qa.toml:1: "),
        "{errs:?}"
    );
    let no_nl = "[envs.qa]\ncidrs = [\"198.18.300.0/24\"]";
    assert_eq!(
        errors(&[
            ("00-base.toml", BASE),
            ("01-qa.toml", no_nl),
            ("10-dev.toml", TEAM)
        ])[0],
        "/etc/envguard/policy.d/01-qa.toml:2: invalid CIDR \"198.18.300.0/24\": invalid address: 198.18.300.0/24"
    );
}

#[test]
fn one_owner_per_env_mode_and_default() {
    let twice = "[envs.prod]\ncidrs = [\"198.18.11.0/24\"]\n";
    assert_eq!(
        errors(&[("00-base.toml", BASE), ("10-prod.toml", twice)]),
        [
            "/etc/envguard/policy.d/10-prod.toml:1: env prod is already defined at /etc/envguard/policy.d/00-base.toml:6; an env is defined in one file"
        ]
    );
    assert_eq!(
        errors(&[
            ("00-base.toml", BASE),
            ("10-mode.toml", "mode = \"audit\"\n")
        ]),
        [
            "/etc/envguard/policy.d/10-mode.toml:1: mode is already set at /etc/envguard/policy.d/00-base.toml:1; set it in one file"
        ]
    );
    assert_eq!(
        errors(&[
            ("00-base.toml", BASE),
            (
                "10-d.toml",
                "[defaults]\nworld = \"deny\"\nhost = \"deny\"\n"
            )
        ]),
        [
            "/etc/envguard/policy.d/10-d.toml:3: [defaults] host is already set at /etc/envguard/policy.d/00-base.toml:4; set it in one file"
        ]
    );
    // world alone is fine: each key has one owner.
    let p = dir(&[
        ("00-base.toml", BASE),
        ("10-d.toml", "[defaults]\nworld = \"deny\"\n"),
    ])
    .unwrap();
    assert_eq!(p.default_world, Default::Deny);
    assert_eq!(p.default_host, Default::Allow);
}

#[test]
fn lint_warnings_name_the_file() {
    let dup = "[[allow]]\nfrom = \"dev\"\nto = \"prod\"\nports = [\"5432/tcp\"]\n";
    let p = dir(&[
        ("00-base.toml", BASE),
        ("10-dev.toml", TEAM),
        ("20-dup.toml", dup),
    ])
    .unwrap();
    let warnings: Vec<String> = lint(&p).iter().map(ToString::to_string).collect();
    assert!(!warnings.is_empty());
    assert!(
        warnings
            .iter()
            .all(|w| w.starts_with("/etc/envguard/policy.d/20-dup.toml:1: ")),
        "{warnings:#?}"
    );
}

#[test]
fn empty_directory_is_an_error() {
    assert_eq!(
        errors(&[]),
        [
            "/etc/envguard/policy.d: policy directory holds no *.toml file (names starting with '.' are skipped)"
        ]
    );
}

#[test]
fn load_reads_toml_files_in_name_order_only() {
    let d = std::env::temp_dir().join(format!("envguard-policy-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("..data")).unwrap();
    std::fs::create_dir_all(d.join("sub.toml")).unwrap();
    std::fs::write(d.join("..data/10-dev.toml"), TEAM).unwrap();
    // A ConfigMap volume: the visible name is a symlink into ..data.
    std::os::unix::fs::symlink("..data/10-dev.toml", d.join("10-dev.toml")).unwrap();
    std::fs::write(d.join("00-base.toml"), BASE).unwrap();
    std::fs::write(d.join(".hidden.toml"), "garbage").unwrap();
    std::fs::write(d.join("README"), "garbage").unwrap();
    std::fs::write(d.join("x.toml.bak"), "garbage").unwrap();
    let p = Policy::load(&d);
    let _ = std::fs::remove_dir_all(&d);
    let p = p.unwrap();
    let names: Vec<_> = p
        .sources
        .iter()
        .map(|s| s.path.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["00-base.toml", "10-dev.toml"]);
    assert_eq!(p.path, d);
}
