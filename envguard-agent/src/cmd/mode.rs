//! `envguard mode`: switch audit/enforce at runtime.
use std::time::Duration;

use crate::control::{Request, SocketArg, call_blocking};

/// Switch the global mode, or one env pair's, in the running agent. It takes
/// effect in the kernel before the command returns (a map update, no reload).
/// With --for it reverts by itself when the time is up (break-glass); `status`
/// shows the pending revert. Needs root or CAP_NET_ADMIN.
#[derive(Debug, clap::Args)]
pub struct ModeArgs {
    /// `audit` (report, let through) or `enforce` (refuse, report).
    #[arg(value_parser = ["audit", "enforce"])]
    pub mode: String,
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
    let r = call_blocking(
        &args.socket.path(),
        &Request::Mode {
            mode: args.mode.clone(),
            from: args.from.clone(),
            to: args.to.clone(),
            for_secs: args.duration.map(|d| d.as_secs().max(1)),
        },
    )?;
    if args.json {
        println!("{r}");
    } else {
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
        match r["expires_at"].as_str() {
            Some(at) => println!("{}: {} -> {} until {at}", s("scope"), s("from"), s("to")),
            None => println!("{}: {} -> {}", s("scope"), s("from"), s("to")),
        }
    }
    Ok(())
}
