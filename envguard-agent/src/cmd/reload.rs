//! `envguard reload`: swap in the policy file atomically.
use crate::control::{Request, SocketArg, call_blocking};

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
    let r = call_blocking(&args.socket.path(), &Request::Reload {})?;
    if args.json {
        println!("{r}");
    } else {
        println!("reloaded: {}", r["revision"].as_str().unwrap_or("?"));
    }
    Ok(())
}
