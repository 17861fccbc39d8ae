//! `envguard check`: validate a policy without loading it.
use std::path::PathBuf;

use crate::{
    policy::{Policy, compile::compile},
    sys,
};

/// Validate a policy file and print what it declares; changes nothing.
///
/// Exits 0 when the file is valid (warnings included), non-zero with one
/// `FILE:LINE: message` per problem otherwise. Needs no root.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The policy file (TOML).
    #[arg(long, short)]
    pub policy: PathBuf,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let policy = Policy::load(&args.policy)?;
    let compiled = compile(&policy)?;
    let mount = sys::cgroup2_mount().ok();
    for w in super::policy_warnings(&policy, mount.as_deref()) {
        eprintln!("warning: {}: {w}", args.policy.display());
    }
    println!(
        "{}: valid; mode {}, envs: {}; {} allow rules ({} kernel entries), {} cgroups, {} CIDRs; revision {}",
        args.policy.display(),
        policy.mode,
        policy.env_names().join(", "),
        policy.rules.len(),
        compiled.rules.len(),
        compiled.cgroups.len(),
        compiled.cidrs_v4.len() + compiled.cidrs_v6.len(),
        policy.revision
    );
    Ok(())
}
