//! `envguard detach`: remove what envguard left in the kernel.
use std::path::PathBuf;

use crate::{error::Error, loader, sys};

/// Remove every program, link and pin that envguard made under a pin root,
/// and nothing else; traffic flows unguarded afterwards.
///
/// Refuses while an agent runs on that pin root: stop it first.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The pin root the agent ran with.
    #[arg(long, value_name = "DIR", default_value = loader::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
}

pub fn detach(args: &DetachArgs) -> anyhow::Result<()> {
    if !sys::is_root() {
        return Err(Error::NotRoot.into());
    }
    let removed = loader::detach(&args.pin_root)?;
    if removed == 0 {
        eprintln!("nothing pinned under {}", args.pin_root.display());
    } else {
        eprintln!(
            "detached: removed {removed} pinned layout(s) under {}",
            args.pin_root.display()
        );
    }
    Ok(())
}
