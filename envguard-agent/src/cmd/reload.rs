//! `envguard reload`: swap in the policy file atomically.
use crate::control::{ReloadReply, Request, SocketArg, call_typed};

/// Make the running agent read its policy file again, validate it, and swap it
/// in atomically. A bad file changes nothing: the old policy stays in force and
/// this exits non-zero with the file:line errors. SIGHUP does the same.
#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn reload(args: &ReloadArgs) -> anyhow::Result<()> {
    let r: ReloadReply = call_typed(&args.socket.path(), &Request::Reload {})?;
    if args.json {
        println!("{}", serde_json::to_value(&r)?);
    } else {
        println!("reloaded: {}", r.revision);
    }
    Ok(())
}
