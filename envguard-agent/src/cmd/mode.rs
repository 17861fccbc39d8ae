//! `envguard mode`: switch audit/enforce at runtime.
use std::time::Duration;

use crate::{
    control::{ModeReply, ModeRequest, Request, Scope, SocketArg, call_typed},
    policy::{Mode, parse_mode},
};

/// Switch the global mode, or one env pair's, in the running agent. It takes
/// effect in the kernel before the command returns (a map update, no reload).
/// With --for it reverts by itself when the time is up (break-glass); `status`
/// shows the pending revert. Needs root, or membership of the agent's
/// --control-group together with CAP_NET_ADMIN (CAP_NET_ADMIN alone is not
/// enough: the socket is not open to other users).
#[derive(Debug, clap::Args)]
pub struct ModeArgs {
    /// `audit` (report, let through) or `enforce` (refuse, report).
    #[arg(value_parser = parse_mode)]
    pub mode: Mode,
    /// Source env of the pair to switch (with --to).
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// Destination env of the pair to switch (with --from).
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Revert after this long, e.g. 15m, 1h30m.
    #[arg(long = "for", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub socket: SocketArg,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn mode(args: &ModeArgs) -> anyhow::Result<()> {
    let scope = match (&args.from, &args.to) {
        (Some(from), Some(to)) => Scope::Pair {
            from: from.clone(),
            to: to.clone(),
        },
        _ => Scope::Global,
    };
    let r: ModeReply = call_typed(
        &args.socket.path(),
        &Request::Mode(ModeRequest {
            mode: args.mode,
            scope,
            for_secs: args.duration.map(|d| d.as_secs().max(1)),
        }),
    )?;
    if args.json {
        println!("{}", serde_json::to_value(&r)?);
    } else {
        match &r.expires_at {
            Some(at) => println!("{}: {} -> {} until {at}", r.scope, r.from, r.to),
            None => println!("{}: {} -> {}", r.scope, r.from, r.to),
        }
    }
    Ok(())
}
