//! `envguard explain`: what-if for one flow.
use std::path::PathBuf;

use crate::{
    control::{Request, SocketArg, call_blocking},
    explain::{self as ex, Endpoint, Explanation, PortProto},
    modes::Modes,
    policy::{Policy, compile::compile},
};

/// Explain the decision for one flow: each side's env and why (which CIDR or
/// cgroup matched, or the default), the decision, the rule that took it (named
/// as in `violation` events), and what the mode does with it.
///
/// With --policy the file is read and nothing else: no agent, no root. The
/// modes are the file's (global and [[pair_mode]]).
///
/// Examples:
///   envguard explain --policy policy.toml --from /dev.slice/app.service --to 198.18.10.5 --port 5432/tcp
///   envguard explain --policy policy.toml --from 198.18.20.7 --to prod --port 53/udp --json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ExplainArgs {
    /// Where the flow starts: an IP address (its env by longest-prefix CIDR
    /// match, else world), a cgroup path below the cgroup2 mount such as
    /// /prod.slice/app.service (the env of its deepest listed ancestor, else
    /// host), an env name (host, world, or one the policy declares), or
    /// iface:NAME, traffic entering the host through that interface (the env
    /// whose `interfaces` match it).
    #[arg(long, value_name = "IP|CGROUP|ENV|iface:NAME")]
    pub from: Endpoint,
    /// Where it goes, in the same forms. A cgroup stands for a socket on this
    /// host that the cgroup's processes bound; iface:NAME traffic leaving
    /// through that interface.
    #[arg(long, value_name = "IP|CGROUP|ENV|iface:NAME")]
    pub to: Endpoint,
    /// The destination port and protocol: 443/tcp, 53/udp, or icmp / icmpv6.
    #[arg(long, value_name = "PORT/PROTO")]
    pub port: PortProto,
    /// Explain against this policy file, offline. Without it, ask the running
    /// agent (its live policy and modes).
    #[arg(long, short)]
    pub policy: Option<PathBuf>,
    /// Print the explanation as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let explanation = match &args.policy {
        Some(path) => offline(path, args)?,
        None => online(args)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&explanation)?);
    } else {
        println!("{explanation}");
    }
    Ok(())
}

/// Against a policy file, with the modes it sets.
pub fn offline(path: &std::path::Path, args: &ExplainArgs) -> anyhow::Result<Explanation> {
    let policy = Policy::load(path)?;
    let compiled = compile(&policy)?;
    let modes = Modes::from_policy(&policy);
    Ok(ex::explain(
        &policy,
        &compiled,
        &args.from,
        &args.to,
        args.port.proto,
        args.port.port,
        &ex::State::offline(&modes),
    )?)
}

/// Against the running agent, through its control socket: its live policy
/// and modes (runtime switches included).
pub fn online(args: &ExplainArgs) -> anyhow::Result<Explanation> {
    let answer = call_blocking(
        &args.socket.path(),
        &Request::Explain {
            from: args.from.to_string(),
            to: args.to.to_string(),
            port: args.port.to_string(),
        },
    )?;
    Ok(serde_json::from_value(answer)?)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExplainArgs,
    }

    #[test]
    fn arguments_parse_and_offline_answers() {
        let path =
            std::env::temp_dir().join(format!("envguard-explain-{}.toml", std::process::id()));
        std::fs::write(&path, include_str!("../../../examples/policy.toml")).unwrap();
        let cli = Cli::try_parse_from([
            "explain",
            "--policy",
            path.to_str().unwrap(),
            "--from",
            "/dev.slice/app.service",
            "--to",
            "198.18.0.3",
            "--port",
            "53/udp",
        ])
        .unwrap();
        let e = offline(&path, &cli.args).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(e.decision, "allowed");
        assert_eq!(e.to.env, "shared");

        for bad in [
            ["--from", "*", "--to", "prod", "--port", "53/udp"],
            ["--from", "dev", "--to", "prod", "--port", "53"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("explain").chain(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn without_a_policy_it_says_what_is_missing() {
        let cli = Cli::try_parse_from([
            "explain",
            "--from",
            "dev",
            "--to",
            "prod",
            "--port",
            "443/tcp",
            "--control-socket",
            "/nonexistent/envguard.sock",
        ])
        .unwrap();
        let e = format!("{:#}", online(&cli.args).unwrap_err());
        assert!(
            e.contains("connecting to the agent's control socket /nonexistent/envguard.sock"),
            "{e}"
        );
    }
}
