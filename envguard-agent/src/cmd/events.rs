//! `envguard events`: the running agent's event stream.
use anyhow::Context as _;
use std::io::Write as _;

use tokio::io::AsyncBufReadExt as _;

use crate::control::{Request, SocketArg, call};

/// Print the running agent's event stream: the same JSON lines as its stdout,
/// from now on. Without --follow it prints what arrives within a second and
/// exits. A reader that falls behind loses records and gets a
/// `{"kind":"lost_events","source":"queue:subscriber","count":N}` line.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep printing until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn events(args: &EventsArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (response, mut reader) = call(&args.socket.path(), &Request::Events {}).await?;
        if !response.ok {
            anyhow::bail!("{}", response.error.unwrap_or_default());
        }
        let mut out = std::io::stdout().lock();
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line);
            let n = if args.follow {
                read.await?
            } else {
                match tokio::time::timeout(std::time::Duration::from_secs(1), read).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                }
            };
            if n == 0 {
                return Ok(());
            }
            out.write_all(line.as_bytes())
                .context("writing to stdout")?;
            out.flush()?;
        }
    })
}
