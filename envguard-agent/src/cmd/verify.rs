//! `envguard verify`: probe from inside each env, compare with the policy in
//! force, and look for drift between file, agent and kernel maps.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    control::SocketArg,
    policy::probe::ProbeProto,
    verify::{
        probe,
        run::{self, Options},
    },
};

/// Prove that the kernel does what the policy says: for every local env (by
/// its first listed cgroup) and every env's `probes` target — and every
/// same-host listener of an env — run a short probe inside the env (a
/// process in a transient child cgroup, made and removed here), and compare
/// with the decision of the policy in force: refused flows must fail with
/// EPERM at once (enforce) or produce a violation record (audit); allowed
/// flows must not be refused (a timeout or connection refused from the
/// network is "allowed, unreachable"). Then compare the policy file, the
/// policy the agent loaded and the kernel's policy maps, entry by entry.
///
/// Exit status 0 only when every probe matched and no drift was found.
///
/// Examples:
///   envguard verify
///   envguard verify --netns app --junit verify.xml
///   envguard verify --policy /etc/envguard/policy.toml --dry-run
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct VerifyArgs {
    /// The policy file (or directory) to compare with [default: the one the
    /// agent runs]. With --dry-run, the policy to plan from (required).
    #[arg(long, short)]
    pub policy: Option<PathBuf>,
    /// List what would be probed and the expected matrix; send nothing, need
    /// no agent (and no root).
    #[arg(long, requires = "policy")]
    pub dry_run: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write a JUnit XML report (one testcase per probe) to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run the probes in this network namespace (a name under /run/netns),
    /// and look for same-host listeners there [default: verify's own].
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Do not probe same-host listeners.
    #[arg(long)]
    pub no_listeners: bool,
    /// How long a TCP probe waits for the connection.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub timeout_ms: u64,
    /// How long to wait for the violation record of an audited probe.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub record_timeout_ms: u64,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// The hidden child: `envguard verify-probe` (see `verify::probe`).
#[derive(Debug, clap::Args)]
pub struct ProbeChildArgs {
    #[arg(long)]
    pub cgroup: PathBuf,
    #[arg(long)]
    pub netns: Option<String>,
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub proto: String,
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

pub fn probe_child(args: &ProbeChildArgs) -> anyhow::Result<()> {
    let proto = match args.proto.as_str() {
        "tcp" => ProbeProto::Tcp,
        "udp" => ProbeProto::Udp,
        p => anyhow::bail!("--proto must be tcp or udp, not {p:?}"),
    };
    let r = probe::child(
        &args.cgroup,
        args.netns.as_deref(),
        args.addr,
        proto,
        Duration::from_millis(args.timeout_ms),
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn options(args: &VerifyArgs) -> Options {
    Options {
        policy: args.policy.clone(),
        netns: args.netns.clone(),
        no_listeners: args.no_listeners,
        timeout: Duration::from_millis(args.timeout_ms),
        record_timeout: Duration::from_millis(args.record_timeout_ms),
        socket: args.socket.path(),
        pin_root: args.socket.pin_root.clone(),
    }
}

/// Exit status: 0 when the report is OK, 1 otherwise (errors too).
pub fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    let opts = options(args);
    let report = if args.dry_run {
        run::dry_run(&opts)?
    } else {
        run::live(&opts)?
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = &args.junit {
        std::fs::write(path, report.junit())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(report.ok)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: VerifyArgs,
    }

    #[test]
    fn dry_run_plans_from_the_file_alone() {
        let path =
            std::env::temp_dir().join(format!("envguard-verify-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "mode = \"enforce\"\n[envs.prod]\ncgroups = [\"/prod.slice\"]\ncidrs = [\"198.18.10.0/24\"]\nprobes = [\"198.18.10.5:5432/tcp\"]\n[envs.dev]\ncgroups = [\"/dev.slice\"]\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["verify", "--policy", path.to_str().unwrap(), "--dry-run"])
            .unwrap();
        let r = run::dry_run(&options(&cli.args)).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(r.ok && r.dry_run);
        assert_eq!(r.mode, "enforce");
        let got: Vec<(&str, &str, &str)> = r
            .probes
            .iter()
            .map(|p| {
                (
                    p.planned.from.as_str(),
                    p.planned.to.as_str(),
                    p.planned.expect.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("dev", "prod", "denied"), ("prod", "prod", "allowed")]
        );
        assert!(
            r.probes
                .iter()
                .all(|p| p.matched.is_none() && p.observed.is_none())
        );
        assert!(
            Cli::try_parse_from(["verify", "--dry-run"]).is_err(),
            "--dry-run needs --policy"
        );
    }
}
