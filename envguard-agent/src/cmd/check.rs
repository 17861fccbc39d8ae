//! `envguard check`: validate and lint a policy without loading it.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::{
    policy::{Action, Policy, compile::compile, lint::lint},
    sys,
};

/// Validate a policy file, lint it, and print what it declares; changes nothing.
///
/// A file with errors is refused: one `FILE:LINE: message` per problem, exit
/// non-zero. A valid file exits 0; its lint warnings (rules that never match
/// or that another rule shadows, duplicates, nested CIDRs, pair modes without
/// effect, envs that match nothing) are printed as `warning: FILE:LINE:
/// message` on stderr, as are listed cgroups that do not exist on this host
/// yet. Needs no root.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The policy file (TOML).
    #[arg(long, short)]
    pub policy: PathBuf,
    /// Exit non-zero when the lint pass warns. Cgroups missing on this host do
    /// not count: they are expected where the policy is written, not run.
    #[arg(long)]
    pub strict: bool,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let mount = sys::cgroup2_mount().ok();
    check_with(
        args,
        mount.as_deref(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// `check` with the cgroup2 mount (`None`: do not look for cgroups) and the
/// output streams given. `Err` is the exit status: an invalid policy, or lint
/// warnings under `--strict`.
pub fn check_with(
    args: &CheckArgs,
    cgroup_mount: Option<&Path>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> anyhow::Result<()> {
    let policy = Policy::load(&args.policy)?;
    let compiled = compile(&policy)?;
    let warnings = lint(&policy);
    let missing = cgroup_mount.map_or_else(Vec::new, |m| super::missing_cgroups(&policy, m));
    let mut all: Vec<_> = warnings.iter().chain(&missing).collect();
    all.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
    for w in all {
        writeln!(err, "warning: {w}").context("writing to stderr")?;
    }
    let allow = policy
        .rules
        .iter()
        .filter(|r| r.action == Action::Allow)
        .count();
    writeln!(
        out,
        "{}: valid; mode {}, envs: {}; {} allow and {} deny rules ({} kernel entries), {} pair modes, {} cgroups, {} CIDRs; revision {}",
        args.policy.display(),
        policy.mode,
        policy.env_names().join(", "),
        allow,
        policy.rules.len() - allow,
        compiled.rules.len() + compiled.deny_rules.len(),
        policy.pair_modes.len(),
        compiled.cgroups.len(),
        compiled.cidrs_v4.len() + compiled.cidrs_v6.len(),
        policy.revision
    )
    .context("writing to stdout")?;
    if args.strict && !warnings.is_empty() {
        anyhow::bail!(
            "{}: --strict and {} lint warning{} (above): fix {} or check without --strict",
            args.policy.display(),
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" },
            if warnings.len() == 1 { "it" } else { "them" },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy file in the temp dir, removed on drop.
    struct TempPolicy(PathBuf);

    impl TempPolicy {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("envguard-check-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempPolicy(path)
        }
    }

    impl Drop for TempPolicy {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run(file: &TempPolicy, strict: bool, mount: Option<&Path>) -> (anyhow::Result<()>, String) {
        let args = CheckArgs {
            policy: file.0.clone(),
            strict,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let result = check_with(&args, mount, &mut out, &mut err);
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(": valid; mode"), "{out}");
        (result, String::from_utf8(err).unwrap())
    }

    const LINTED: &str = "[envs.dev]\ncidrs = [\"198.18.20.0/24\"]\n[envs.ghost]\n";

    #[test]
    fn warnings_print_with_file_and_line_and_fail_only_under_strict() {
        let file = TempPolicy::new("linted", LINTED);
        let (result, err) = run(&file, false, None);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            err,
            format!(
                "warning: {}:3: env ghost lists no cgroups and no CIDRs: it matches nothing but containers registered into it (envguard oci-hook)\n",
                file.0.display()
            )
        );

        let (result, _) = run(&file, true, None);
        let e = result
            .expect_err("--strict with a warning fails")
            .to_string();
        assert!(
            e.contains("--strict and 1 lint warning (above)"),
            "the last line says why: {e}"
        );
    }

    #[test]
    fn strict_passes_a_clean_policy_and_ignores_missing_cgroups() {
        let file = TempPolicy::new("clean", include_str!("../../../examples/policy.toml"));
        let (result, err) = run(&file, true, None);
        assert!(result.is_ok() && err.is_empty(), "{result:?} {err}");

        // A mount without the listed cgroups: warned about, still accepted.
        let mount =
            std::env::temp_dir().join(format!("envguard-no-cgroups-{}", std::process::id()));
        let (result, err) = run(&file, true, Some(&mount));
        assert!(result.is_ok(), "{result:?}");
        assert!(
            err.contains(&format!(
                "warning: {}:13: cgroup /prod.slice of env prod does not exist yet",
                file.0.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn an_invalid_policy_is_an_error_whatever_strict_says() {
        let file = TempPolicy::new("invalid", "mode = \"block\"\n");
        for strict in [false, true] {
            let args = CheckArgs {
                policy: file.0.clone(),
                strict,
            };
            let e = check_with(&args, None, &mut Vec::new(), &mut Vec::new()).expect_err("invalid");
            assert!(e.to_string().contains(":1: mode must be"), "{e}");
        }
    }
}
