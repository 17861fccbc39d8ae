//! One module per subcommand.
pub mod check;
pub mod detach;
pub mod events;
pub mod explain;
pub mod mode;
pub mod oci_hook;
pub mod reload;
pub mod report;
pub mod run;
pub mod status;
pub mod verify;

// Shared with the daemon, which warns at every load; they live with the
// cgroup-path logic so that the daemon never imports a subcommand.
pub use crate::cgroups::{missing_cgroups, policy_warnings};
